"""Upscale stage: Real-ESRGAN through spandrel (CPU or a GPU share), Lanczos when no weights.

`Upscaler.upscale(frames, out_size)` runs the model at its own scale, tile by tile, then resamples
to the exact size asked for (area when shrinking, Lanczos when enlarging). Tiles overlap and are
stitched by cropping the overlap: a tile's output is kept only where its input had `tile_overlap`
pixels of real context on every side (or the image border, where the full-frame model sees zero
padding too). With an overlap at least the model's receptive-field radius (SRVGGNetCompact) the
stitched result is the untiled one; RRDB's field is wider and its default overlap was chosen by
measurement (`RRDB_TILE_OVERLAP`). Memory is bounded by the tile size at any frame size, so a
replica holding a fraction of a GPU never needs the whole frame's activations at once.

Why PyTorch (spandrel) on CPU too, not the ncnn runtime: measured on the 2-core dev machine
(shared with other jobs: best of 3-5 runs, each runtime in its own process), one 512x288 frame
-> x4 with realesr-animevideov3 cost, on one thread, 1.15-1.25 CPU-s in PyTorch with the
channels-last layout, 1.31-1.37 in ncnn and 1.74-1.94 in PyTorch's NCHW layout; on two threads
(`benchmarks/upscale.py`) 0.68 s / 1.22 CPU-s in PyTorch with 256-pixel tiles against 0.91 s /
1.60 CPU-s in ncnn. RRDB x4plus on a 128x72 input: 1.20 s against 1.78 s. ncnn's 2x lead on a
146x97 input (weights.md) is per-call overhead that vanishes at generation size. So one runtime,
PyTorch, serves CPU and GPU, user-brought `.pth` files and converted ones alike, with one code
path to test. A second runtime would also bring a hazard measured here: ncnn's OpenMP workers
spin-wait, and beside torch's pool in one process on a busy machine a 0.3 s run took 10-25 s.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, Field, field_validator

from deployments.errors import (
    InvalidSettingError,
    InvalidWeightsError,
    LimitExceededError,
    NotAnImageError,
)
from deployments.model_loading import s3_fetcher
from deployments.stopping import ShouldStop, check_stop
from deployments.video import (
    DecodeSettings,
    EncodeSettings,
    InputLimits,
    decode_chunks,
    encode_mp4,
    probe,
)

# Bump when anything that changes the output pixels for the same inputs and settings changes.
UPSCALE_CODE_VERSION = "upscale-1"

# spandrel architecture id -> the name the Real-ESRGAN papers and reports use.
SUPPORTED_ARCHITECTURES = {"ESRGAN": "RRDB", "Compact": "SRVGGNetCompact"}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# RRDB's receptive field spans hundreds of pixels, so tiles are never exact; measured on a real
# frame with x4plus and 64-pixel tiles (many seams) against untiled output, mean / 99th
# percentile / max 8-bit differences were 1.11 / 10 / 46 at overlap 24, 0.60 / 4 / 25 at 32 and
# 0.20 / 1 / 10 at 48: no visible seam at 48 (and on a GPU a 512x288 frame is one tile).
RRDB_TILE_OVERLAP = 48
# Compact x4 on a 512x288 frame, 2 threads, best of 5 (benchmarks/upscale.py): 256-pixel tiles
# took 0.68 s / 1.22 CPU-s, the whole frame 0.85 s / 1.56 CPU-s and 128-pixel tiles 0.85 s /
# 1.56 CPU-s: activations of a 256 tile stay in cache, smaller ones pay too much overlap.
CPU_TILE_SIZE = 256
GPU_TILE_SIZE = 512
MAX_OUTPUT_SIDE = 16384
MAX_OUTPUT_PIXELS = 7680 * 4320  # 8K UHD

WeightsFetch = Callable[[str, Path], None]
"""Downloads an ``s3://bucket/key`` URI to a local path (injected so callers choose the
endpoint and client; the default is `model_loading.s3_fetcher()`)."""


class UpscaleSettings(BaseModel):
    """How the upscale stage runs; every field but `device` takes part in its cache key."""

    weights: str | None = Field(
        default=None,
        description="Real-ESRGAN weights (RRDB or SRVGGNetCompact): a local .safetensors/.pth "
        "path or an s3://bucket/key URI. None resamples with Lanczos instead of a model.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the model runs; 'auto' takes CUDA when visible."
    )
    half_precision: bool = Field(
        default=True,
        description="Run in float16 on CUDA (halves VRAM and time); CPU always uses float32.",
    )
    tile_size: int | None = Field(
        default=None,
        ge=0,
        le=4096,
        description="Largest tile side in input pixels (0: whole frames). Bounds memory: lower "
        f"it on a small GPU share. None: {CPU_TILE_SIZE} on CPU (cache-sized tiles ran fastest), "
        f"{GPU_TILE_SIZE} on CUDA (a 512x288 generation frame in one tile).",
    )
    tile_overlap: int | None = Field(
        default=None,
        ge=0,
        le=256,
        description="Input pixels of context read around each tile and cropped after the model. "
        "None: the receptive-field radius for SRVGGNetCompact (seams identical to untiled "
        f"output), {RRDB_TILE_OVERLAP} for RRDB (see RRDB_TILE_OVERLAP).",
    )
    channels_last: bool = Field(
        default=True,
        description="Run convolutions in NHWC memory layout (measured 35% fewer CPU-seconds than "
        "NCHW on CPU; the layout tensor cores prefer on GPU).",
    )
    batch_frames: int = Field(
        default=4, ge=1, le=64, description="Frames per forward pass on one tile (GPU throughput)."
    )
    sharpen_amount: float = Field(
        default=0.0,
        ge=0.0,
        le=3.0,
        description="Unsharp-mask strength after resampling when no model runs (0: none).",
    )
    sharpen_sigma: float = Field(
        default=1.0, gt=0.0, le=10.0, description="Gaussian sigma of the unsharp mask, pixels."
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="torch intra-op threads on CPU (process-wide); None keeps torch's default.",
    )
    weights_cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "motionserve" / "weights" / "remote",
        description="Where s3:// weights are downloaded once; objects are assumed immutable.",
    )

    @field_validator("tile_size")
    @classmethod
    def _tile_not_tiny(cls, value: int | None) -> int | None:
        if value is not None and 0 < value < 16:
            raise ValueError("tile_size must be 0 (no tiling) or at least 16 pixels")
        return value


# ------------------------------------------------------------------------------------ weights


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key or key.endswith("/"):
        raise InvalidWeightsError(f"not an s3://bucket/key URI of a weights file: {uri}")
    return bucket, key


def local_weights_path(source: str, cache_dir: Path, fetch: WeightsFetch | None = None) -> Path:
    """The local file for `source`: a path as is, an s3:// URI downloaded once into `cache_dir`."""
    if not source.startswith("s3://"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise InvalidWeightsError(f"upscaler weights not found: {source}")
        return path
    _, key = split_s3_uri(source)
    # One folder per URI keeps the object's file name (spandrel reads the format from it)
    # without letting a key's path segments reach outside the cache.
    folder = hashlib.sha256(source.encode()).hexdigest()[:24]
    target = Path(cache_dir) / folder / PurePosixPath(key).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        (fetch or s3_fetcher())(source, partial)
        os.replace(partial, target)
    except InvalidWeightsError:
        raise
    except Exception as exc:  # botocore's error types vary by failure; all mean "not fetched"
        raise InvalidWeightsError(f"cannot download upscaler weights {source}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_upscaler_model(path: Path):
    """Load `path` with spandrel and check it is a Real-ESRGAN RRDB or Compact RGB model."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise InvalidWeightsError(
            f"upscaler weights must be one of {', '.join(WEIGHT_SUFFIXES)} files, not {path.name}"
        )
    try:
        descriptor = ModelLoader().load_from_file(path)
    except UnsupportedModelError as exc:
        raise InvalidWeightsError(
            f"{path.name} holds no model architecture spandrel recognises; the upscaler needs "
            "Real-ESRGAN RRDB or SRVGGNetCompact weights"
        ) from exc
    except Exception as exc:  # torch/safetensors raise many types for a damaged file
        raise InvalidWeightsError(f"cannot read upscaler weights {path.name}: {exc}") from exc
    arch_id = descriptor.architecture.id
    if arch_id not in SUPPORTED_ARCHITECTURES:
        raise InvalidWeightsError(
            f"{path.name} is a {descriptor.architecture.name} model; the upscaler runs "
            "Real-ESRGAN RRDB (x4plus) and SRVGGNetCompact (animevideov3, general-x4v3) models"
        )
    if not isinstance(descriptor, ImageModelDescriptor) or (
        descriptor.input_channels,
        descriptor.output_channels,
    ) != (3, 3):
        raise InvalidWeightsError(f"{path.name} is not an RGB-to-RGB upscaler")
    return descriptor


def resolve_device(choice: str) -> torch.device:
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise InvalidSettingError("device 'cuda' was requested but no CUDA GPU is visible")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and cuda) else "cpu")


# ------------------------------------------------------------------------------ tiles, resize


@dataclass(frozen=True)
class TileSpan:
    """One tile along an axis: the output it owns [core) and the input it reads [input)."""

    core_start: int
    core_end: int
    input_start: int
    input_end: int


def tile_spans(length: int, tile: int, overlap: int) -> list[TileSpan]:
    """Split an axis into equal cores of at most `tile`, each read with `overlap` of context."""
    count = 1 if tile <= 0 or length <= tile else math.ceil(length / tile)
    bounds = [round(i * length / count) for i in range(count + 1)]
    return [
        TileSpan(start, end, max(0, start - overlap), min(length, end + overlap))
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def resize_rgb(rgb: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Resize to exactly (width, height): area averaging to shrink, Lanczos to enlarge."""
    width, height = out_size
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    shrink = width <= rgb.shape[1] and height <= rgb.shape[0]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4
    return cv2.resize(rgb, (width, height), interpolation=interpolation)


def unsharp_mask(rgb: np.ndarray, amount: float, sigma: float) -> np.ndarray:
    if amount <= 0:
        return rgb
    blurred = cv2.GaussianBlur(rgb, (0, 0), sigma)
    return cv2.addWeighted(rgb, 1.0 + amount, blurred, -amount, 0)  # saturates to uint8


def check_out_size(out_size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = (int(side) for side in out_size)
    except (TypeError, ValueError):
        raise InvalidSettingError("the output size must be (width, height)") from None
    if width < 1 or height < 1 or max(width, height) > MAX_OUTPUT_SIDE:
        raise InvalidSettingError(
            f"output size {width}x{height} is out of range (1 to {MAX_OUTPUT_SIDE} per side)"
        )
    if width * height > MAX_OUTPUT_PIXELS:
        raise LimitExceededError(
            f"output size {width}x{height} is beyond the {MAX_OUTPUT_PIXELS / 1e6:.0f} MP limit"
        )
    return width, height


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InvalidSettingError("frames must be an RGB uint8 array of shape (N, H, W, 3)")
    if frames.shape[0] and min(frames.shape[1:3]) < 1:
        raise InvalidSettingError("frames must be at least 1x1 pixels")
    return frames


# ---------------------------------------------------------------------------------- the stage


class Upscaler:
    """The upscale stage's core: load once (`load`), then `upscale` batches of frames.

    Ray-free; `serve/app.py` wraps it in a deployment. `fetch` downloads s3:// weights.
    """

    def __init__(
        self, settings: UpscaleSettings | None = None, *, fetch: WeightsFetch | None = None
    ):
        self.settings = settings or UpscaleSettings()
        self._fetch = fetch
        self._descriptor = None
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._weights_sha256: str | None = None
        self._loaded = False

    @property
    def ready(self) -> bool:
        return self._loaded

    def load(self) -> None:
        """Resolve, download (s3://) and load the weights; idempotent."""
        if self._loaded:
            return
        settings = self.settings
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        if settings.weights is not None:
            device = resolve_device(settings.device)
            path = local_weights_path(settings.weights, settings.weights_cache_dir, self._fetch)
            descriptor = load_upscaler_model(path)
            half = device.type == "cuda" and settings.half_precision and descriptor.supports_half
            self._dtype = torch.float16 if half else torch.float32
            descriptor.to(device, dtype=self._dtype).eval()
            if settings.channels_last:
                descriptor.model.to(memory_format=torch.channels_last)
            self._descriptor, self._device = descriptor, device
            self._weights_sha256 = file_sha256(path)
        self._loaded = True

    def unload(self) -> None:
        """Drop the model (idle replicas); the next `upscale` loads it again."""
        self._descriptor = None
        self._loaded = False
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def model_scale(self) -> int | None:
        self.load()
        return int(self._descriptor.scale) if self._descriptor is not None else None

    @property
    def tile_size(self) -> int:
        """The tile size in use: the setting, or the device's default."""
        if self.settings.tile_size is not None:
            return self.settings.tile_size
        self.load()
        return GPU_TILE_SIZE if self._device.type == "cuda" else CPU_TILE_SIZE

    @property
    def tile_overlap(self) -> int:
        """The overlap in use: the setting, or the architecture's default."""
        if self.settings.tile_overlap is not None:
            return self.settings.tile_overlap
        self.load()
        if self._descriptor is None:
            return 0
        if self._descriptor.architecture.id == "Compact":
            # One pixel of context per 3x3 convolution: body convs plus the first and last.
            return int(self._descriptor.model.num_conv) + 2
        return RRDB_TILE_OVERLAP

    def describe(self) -> dict[str, Any]:
        """What actually runs, for the job report (backend, architecture, device, dtype...)."""
        self.load()
        settings = self.settings
        common = {
            "tile_size": self.tile_size,
            "tile_overlap": self.tile_overlap,
            "code_version": UPSCALE_CODE_VERSION,
        }
        descriptor = self._descriptor
        if descriptor is None:
            return common | {
                "backend": "lanczos",
                "architecture": None,
                "spandrel_architecture": None,
                "model_scale": None,
                "parameters": 0,
                "device": "cpu",
                "dtype": "uint8",
                "weights": None,
                "weights_sha256": None,
                "sharpen_amount": settings.sharpen_amount,
            }
        return common | {
            "backend": "spandrel",
            "architecture": SUPPORTED_ARCHITECTURES[descriptor.architecture.id],
            "spandrel_architecture": descriptor.architecture.id,
            "model_scale": int(descriptor.scale),
            "parameters": sum(p.numel() for p in descriptor.model.parameters()),
            "device": self._device.type,
            "dtype": str(self._dtype).removeprefix("torch."),
            "weights": settings.weights,
            "weights_sha256": self._weights_sha256,
            "sharpen_amount": None,
        }

    def cache_identity(self) -> dict[str, Any]:
        """What determines the output pixels (for content keys); not where they are computed."""
        identity = self.describe()
        for name in ("device", "weights", "parameters"):
            identity.pop(name)  # the sha256 names the weights; device shows through dtype
        return identity

    def upscale(
        self,
        frames: np.ndarray,
        out_size: tuple[int, int],
        should_stop: ShouldStop | None = None,
    ) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB -> (N, out_h, out_w, 3) uint8 RGB at exactly `out_size`.

        The model runs only when the target is larger than the input on some side: shrinking
        gains nothing from a super-resolution model, so it is plain area resampling. Frames go
        `batch_frames` at a time; `should_stop` is asked before each batch, and once it answers
        True `Stopped` is raised (the caller is gone: the device stops after that batch).
        """
        frames = _check_frames(frames)
        width, height = check_out_size(out_size)
        count, in_h, in_w = frames.shape[:3]
        result = np.empty((count, height, width, 3), dtype=np.uint8)
        if count == 0:
            return result
        self.load()
        step = self.settings.batch_frames
        model = self._descriptor is not None and (width > in_w or height > in_h)
        for start in range(0, count, step):
            check_stop(should_stop, "upscaling")
            if not model:
                for index in range(start, min(start + step, count)):
                    result[index] = self._resample(frames[index], (width, height))
                continue
            scaled = self.model_upscale(frames[start : start + step])
            for offset, frame in enumerate(scaled):
                result[start + offset] = resize_rgb(frame, (width, height))
        return result

    def _resample(self, frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        settings = self.settings
        return unsharp_mask(
            resize_rgb(frame, size), settings.sharpen_amount, settings.sharpen_sigma
        )

    def model_upscale(self, frames: np.ndarray) -> np.ndarray:
        """Frames at the model's own scale, tiled; (n, H*s, W*s, 3) uint8."""
        self.load()
        if self._descriptor is None:
            raise InvalidSettingError("no upscaler weights are configured")
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(frames)).to(self._device)
            layout = torch.channels_last if self.settings.channels_last else torch.contiguous_format
            batch = batch.permute(0, 3, 1, 2).to(self._dtype).div_(255.0)
            batch = batch.contiguous(memory_format=layout)
            output = self._forward_tiled(batch)
            output = output.float().clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
            return output.permute(0, 2, 3, 1).cpu().numpy()

    def _forward_tiled(self, batch: torch.Tensor) -> torch.Tensor:
        count, _, height, width = batch.shape
        scale = int(self._descriptor.scale)
        tile, overlap = self.tile_size, self.tile_overlap
        output = torch.empty(
            (count, 3, height * scale, width * scale), dtype=batch.dtype, device=batch.device
        )
        for rows in tile_spans(height, tile, overlap):
            for cols in tile_spans(width, tile, overlap):
                tile_out = self._descriptor(
                    batch[
                        :, :, rows.input_start : rows.input_end, cols.input_start : cols.input_end
                    ]
                )
                top = (rows.core_start - rows.input_start) * scale
                left = (cols.core_start - cols.input_start) * scale
                core_h = (rows.core_end - rows.core_start) * scale
                core_w = (cols.core_end - cols.core_start) * scale
                output[
                    :,
                    :,
                    rows.core_start * scale : rows.core_end * scale,
                    cols.core_start * scale : cols.core_end * scale,
                ] = tile_out[:, :, top : top + core_h, left : left + core_w]
        return output


# -------------------------------------------------------------------------- image/video files


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise InvalidSettingError(f"a size is WIDTHxHEIGHT, e.g. 1920x1080, not {text!r}")
    return check_out_size((int(width), int(height)))


def target_size(
    width: int,
    height: int,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    default_scale: float | None = None,
) -> tuple[int, int]:
    """The output size for a width x height input: `size`, or `scale` (or the default) times it."""
    if scale is not None and size is not None:
        raise InvalidSettingError("give a scale or a size, not both")
    if size is not None:
        return check_out_size(size)
    scale = scale if scale is not None else default_scale
    if scale is None:
        raise InvalidSettingError("give a scale or an output size")
    if not 0 < scale <= 16:
        raise InvalidSettingError(f"scale must be in (0, 16], not {scale}")
    return check_out_size((max(1, round(width * scale)), max(1, round(height * scale))))


def upscale_image_file(
    upscaler: Upscaler,
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Upscale a PNG/JPEG image file (alpha is dropped). Returns a small report."""
    out_path = Path(out_path)
    if out_path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InvalidSettingError(f"an image output must end in {', '.join(IMAGE_SUFFIXES)}")
    started = time.perf_counter()
    bgr = cv2.imread(str(in_path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise NotAnImageError(f"{Path(in_path).name} is not a PNG or JPEG image we can read")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    height, width = rgb.shape[:2]
    out_size = target_size(width, height, scale, size, upscaler.model_scale)
    result = upscaler.upscale(rgb[None], out_size)[0]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.stem}.partial{out_path.suffix}")
    if not cv2.imwrite(str(partial), cv2.cvtColor(result, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {out_path}")
    os.replace(partial, out_path)
    return _file_report("image", (width, height), out_size, 1, None, started, upscaler)


def upscale_video_file(
    upscaler: Upscaler,
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    chunk_frames: int = 16,
    limits: InputLimits | None = None,
) -> dict[str, Any]:
    """Upscale a video chunk by chunk at its own fps into an H.264 MP4, keeping its audio."""
    started = time.perf_counter()
    info = probe(in_path, limits)
    out_size = target_size(info.width, info.height, scale, size, upscaler.model_scale)
    fps = min(info.fps, 120.0)  # the decoder's ceiling; faster sources are resampled
    decode = DecodeSettings(
        fps=fps, width=info.width, height=info.height, chunk_frames=chunk_frames
    )
    chunks = decode_chunks(in_path, decode, limits, info)
    upscaled = (upscaler.upscale(chunk.frames, out_size) for chunk in chunks)
    audio = str(in_path) if info.has_audio else None
    count = encode_mp4(upscaled, out_path, EncodeSettings(fps=fps, audio_from=audio))
    return _file_report("video", (info.width, info.height), out_size, count, fps, started, upscaler)


def _file_report(kind, in_size, out_size, frames, fps, started, upscaler) -> dict[str, Any]:
    return {
        "kind": kind,
        "input_size": list(in_size),
        "output_size": list(out_size),
        "frames": frames,
        "fps": round(fps, 3) if fps is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
        "upscaler": upscaler.describe(),
    }
