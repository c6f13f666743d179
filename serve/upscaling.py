"""`motionserve upscale`'s core: upscale one image or video file with a named or given model.

Model names resolve through `serve.weights` (converted Real-ESRGAN files, fetched once), so the
stage itself (`deployments.upscale`) never needs to know about registries or caches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deployments.model_loading import s3_fetcher
from deployments.upscale import (
    IMAGE_SUFFIXES,
    Upscaler,
    UpscaleSettings,
    parse_size,
    upscale_image_file,
    upscale_video_file,
)
from serve.config import Settings
from serve.weights import (
    default_upscaler_model,
    upscaler_output_scale,
    upscaler_weights_source,
)


def upscale_file(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    scale: float | None = None,
    size: tuple[int, int] | str | None = None,
    model: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    tile_size: int | None = None,
) -> dict[str, Any]:
    """Upscale a PNG/JPEG image or a video (to H.264 MP4, audio kept) and return a report.

    `size`: (width, height) or "WIDTHxHEIGHT". `model`: an ncnn model name (see
    `serve.weights.upscaler_names`), a .safetensors/.pth path, an s3:// URI, or "lanczos"; None
    picks the default for the device. Without `scale` and `size` the model's own scale is used
    (2 and 3 for the animevideov3 x2/x3 aliases).
    """
    settings = Settings()
    cache_dir = settings.cache_dir if cache_dir is None else cache_dir
    if isinstance(size, str):
        size = parse_size(size)
    model = model or default_upscaler_model(device)
    weights = upscaler_weights_source(model, Path(cache_dir), settings.upscaler_dir)
    if scale is None and size is None:
        scale = upscaler_output_scale(model)
    options: dict[str, Any] = {"weights": weights, "device": device}
    if tile_size is not None:
        options["tile_size"] = tile_size
    if weights and weights.startswith("s3://"):
        options["weights_cache_dir"] = Path(cache_dir) / "weights" / "remote"
    fetch = s3_fetcher(endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    upscaler = Upscaler(UpscaleSettings(**options), fetch=fetch)
    if Path(in_path).suffix.lower() in IMAGE_SUFFIXES:
        report = upscale_image_file(upscaler, in_path, out_path, scale=scale, size=size)
    else:
        report = upscale_video_file(upscaler, in_path, out_path, scale=scale, size=size)
    return report | {"model": model}
