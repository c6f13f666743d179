"""Decode: frames at the generation fps and size, picked by presentation timestamp (PyAV).

Decoding picks output frames by presentation timestamp (sample-and-hold: output time t shows the
last source frame shown at or before t), so variable-frame-rate, 29.97 and 59.94 sources come out
at exactly the requested rate. Only the frames that are picked are converted to RGB and resized:
at 12 fps from a 60 fps source that is 1 in 5, which is where most of the decode cost goes.
Frames leave in fixed-size chunks so memory stays bounded for long inputs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av.error
import numpy as np
from pydantic import BaseModel, Field, model_validator

from deployments.errors import CorruptVideoError
from deployments.video.probing import InputLimits, VideoInfo, open_input, probe


class DecodeSettings(BaseModel):
    """How to turn a source into generation frames; part of the decode stage's cache key."""

    fps: float = Field(default=12.0, gt=0, le=120, description="Output frame rate.")
    width: int | None = Field(
        default=512,
        ge=16,
        le=4096,
        description="Output width; None derives it from height and the source aspect.",
    )
    height: int | None = Field(
        default=None,
        ge=16,
        le=4096,
        description="Output height; None derives it from width and the source aspect.",
    )
    fit: Literal["letterbox", "crop"] = Field(
        default="crop",
        description="When both sides are given and the aspect differs: 'letterbox' pads with "
        "black, 'crop' fills the frame and cuts the centre.",
    )
    multiple_of: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Derived sides are rounded to this multiple (8 for SD latents).",
    )
    chunk_frames: int = Field(
        default=16, ge=1, le=1024, description="Frames per yielded chunk (memory bound)."
    )
    max_frames: int | None = Field(
        default=None, ge=1, description="Stop after this many output frames (previews)."
    )

    @model_validator(mode="after")
    def _needs_a_side(self) -> DecodeSettings:
        if self.width is None and self.height is None:
            raise ValueError("give width, height or both")
        return self


@dataclass(frozen=True)
class VideoChunk:
    """`frames` (n, H, W, 3) RGB uint8 shown at `times_s`, starting at output frame `start`."""

    index: int
    start: int
    frames: np.ndarray
    times_s: np.ndarray


def output_size(source_w: int, source_h: int, settings: DecodeSettings) -> tuple[int, int]:
    """The (width, height) frames come out at, for a source displayed at source_w x source_h."""
    if settings.width is not None and settings.height is not None:
        return settings.width, settings.height
    aspect = source_w / source_h
    step = settings.multiple_of
    if settings.width is not None:
        height = max(step, round(settings.width / aspect / step) * step)
        return settings.width, height
    width = max(step, round(settings.height * aspect / step) * step)
    return width, settings.height


def decoded_frame_count(duration_s: float, fps: float) -> int:
    """Frames `decode_chunks` yields for `duration_s` at `fps` (before `max_frames`): those
    whose time k/fps falls inside [0, duration)."""
    # The small epsilon keeps 10 s at 12 fps at 120 frames despite float error.
    return max(1, math.ceil(duration_s * fps - 1e-6))


def decode_chunks(
    path: str | os.PathLike,
    settings: DecodeSettings,
    limits: InputLimits | None = None,
    info: VideoInfo | None = None,
) -> Iterator[VideoChunk]:
    """Yield RGB frames at `settings.fps` and size, `settings.chunk_frames` at a time.

    Probes first (limits, truncation) unless `info` from an earlier probe is given.
    """
    limits = limits or InputLimits()
    info = info or probe(path, limits)
    out_w, out_h = output_size(info.width, info.height, settings)
    total = decoded_frame_count(info.duration_s, settings.fps)
    if settings.max_frames is not None:
        total = min(total, settings.max_frames)
    deadline = time.monotonic() + limits.decode_timeout_s
    picks = _pick_frames(path, info, settings.fps, total, deadline)
    batch: list[np.ndarray] = []
    chunk_index = 0
    produced = 0
    for frame in picks:
        batch.append(_to_rgb(frame, info, out_w, out_h, settings.fit))
        produced += 1
        if len(batch) == settings.chunk_frames or produced == total:
            start = produced - len(batch)
            times = np.arange(start, produced, dtype=np.float64) / settings.fps
            yield VideoChunk(chunk_index, start, np.stack(batch), times)
            chunk_index += 1
            batch = []


def decode_all(path: str | os.PathLike, settings: DecodeSettings, **kwargs) -> np.ndarray:
    """All output frames in one array; for short clips and tests (long inputs: `decode_chunks`)."""
    return np.concatenate([chunk.frames for chunk in decode_chunks(path, settings, **kwargs)])


def _pick_frames(path, info: VideoInfo, fps: float, total: int, deadline: float):
    """Source frames shown at output times k/fps, k < total (repeats allowed when upsampling)."""
    next_k = 0
    previous = None
    with open_input(Path(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        origin = None
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                if time.monotonic() > deadline:
                    raise CorruptVideoError("decoding took too long: the file is damaged")
                t = float(frame.pts * stream.time_base)
                origin = t if origin is None else origin
                t -= origin
                # Emit the held frame for every output time before this frame appears.
                while next_k < total and previous is not None and next_k / fps < t - 1e-9:
                    yield previous
                    next_k += 1
                if next_k >= total:
                    return
                previous = frame
        except av.error.FFmpegError as exc:
            if previous is None:
                raise CorruptVideoError(f"the video cannot be decoded ({exc.strerror})") from exc
            # A damaged tail after a good prefix: hold the last good frame (probe already
            # rejected files that are missing a real part of their duration).
    while next_k < total and previous is not None:
        yield previous
        next_k += 1
    if previous is None:
        raise CorruptVideoError("no frame of the video could be decoded")


def _to_rgb(frame, info: VideoInfo, out_w: int, out_h: int, fit: str) -> np.ndarray:
    """Convert one picked frame: scale in swscale (pre-rotation axes), rotate, then fit."""
    disp_w, disp_h = info.width, info.height
    if fit == "crop":
        scale = max(out_w / disp_w, out_h / disp_h)
    else:
        scale = min(out_w / disp_w, out_h / disp_h)
    scaled_w = max(out_w if fit == "crop" else 1, round(disp_w * scale))
    scaled_h = max(out_h if fit == "crop" else 1, round(disp_h * scale))
    swapped = info.rotation % 180 != 0
    coded_w, coded_h = (scaled_h, scaled_w) if swapped else (scaled_w, scaled_h)
    rgb = frame.reformat(
        width=coded_w, height=coded_h, format="rgb24", interpolation="AREA"
    ).to_ndarray()
    if info.rotation:
        rgb = np.rot90(rgb, k=info.rotation // 90)
    return _fit(rgb, out_w, out_h)


def _fit(rgb: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Centre-crop whatever exceeds the output and pad whatever falls short with black."""
    h, w = rgb.shape[:2]
    top, left = max(0, (h - out_h) // 2), max(0, (w - out_w) // 2)
    rgb = rgb[top : top + out_h, left : left + out_w]
    h, w = rgb.shape[:2]
    if (h, w) == (out_h, out_w):
        return np.ascontiguousarray(rgb)
    canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)
    y, x = (out_h - h) // 2, (out_w - w) // 2
    canvas[y : y + h, x : x + w] = rgb
    return canvas
