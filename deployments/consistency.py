"""Temporal consistency of a clip: flow-warp error and chunk seam ratio (CPU, no Ray, no weights).

Diffusion generates a job's frames in chunks (16 generated frames each); a chunk that does not
continue its neighbour shows as a seam, and frames that disagree with their motion show as
flicker. Two figures measure both on the delivered video, cheaply:

- **warp error**: for each pair of consecutive frames (t, t+1), the optical flow from t+1 to t
  (the interpolation stage's DIS flow, `FlowBackend.flow`) warps frame t onto frame t+1, and the
  mean absolute grey-level difference that remains is the pair's error; the figure is the mean
  over all pairs. Units: grey levels, 0-255, at the working width. Motion the flow explains
  costs nothing; flicker, popping texture and cuts do. No occlusion mask: uncovered background
  adds a little error in every clip alike, so compare clips of the same content.
- **seam ratio**: the mean frame change across chunk boundaries over the mean frame change
  within chunks; 1.0 means a boundary looks like any other moment (no visible seam). Frame change
  of a pair is its mean absolute grey-level difference (no warp: a seam the flow could explain
  away is still a seam). Chunks are counted in generated frames, but the video is delivered at
  another rate (12 fps generated, interpolated to 25), so boundaries are mapped by time: the
  change per *generated interval* [i/G, (i+1)/G] is the sum of the output pairs' changes, each
  pair weighted by the share of its time span inside the interval (so an interval covered by 2
  or by 3 output pairs is measured alike). Interval i crosses a chunk boundary when (i + 1) is
  a multiple of `chunk_frames`. Only intervals the clip covers fully are counted (the held tail
  frame is not).

Frames are measured grey at `working_width` (256 px by default): the real sample clip (7.7 s of
1768x994 VP9 at 30 fps, 230 frames) takes 1.8 s on one core, most of it decoding. On real footage
without seams the ratio scatters around 1 (the sample clip's exposure flicker, 14 boundaries:
0.69), so compare an output with its source (`motionserve consistency OUT --source IN`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Sequence
from fractions import Fraction

import cv2
import numpy as np
from pydantic import BaseModel, Field

from deployments.interpolate import FlowBackend, InterpolationSettings
from deployments.video import DecodeSettings, InputLimits, decode_chunks, exact_rate, probe

# Part of the metric's cache key: bump when the same video and settings would give other figures.
CONSISTENCY_CODE_VERSION = "consistency-1"

# Added to both means of the seam ratio (grey levels), so a still clip scores 1.0, not 0/0.
_RATIO_EPSILON = 1e-3


class ConsistencySettings(BaseModel):
    """How a clip's consistency is measured; part of the metric's cache key."""

    chunk_frames: int = Field(
        default=16, ge=1, le=1024, description="Generated frames per chunk (the job's plan)."
    )
    generation_fps: float | None = Field(
        default=None,
        gt=0,
        le=120,
        description="Rate the frames were generated at; chunk k starts at time "
        "k * chunk_frames / generation_fps. None: the clip's own rate (every frame generated).",
    )
    working_width: int = Field(
        default=256,
        ge=32,
        le=1024,
        description="Frames are measured grey at this width (never above the clip's own).",
    )


class ConsistencyFigures(BaseModel):
    """The consistency of one clip. Differences are mean absolute grey levels (0-255)."""

    frames: int = Field(description="Frames measured.")
    fps: float = Field(description="Frame rate the clip was measured at (its own).")
    warp_error: float | None = Field(
        description="Mean over consecutive pairs of |frame t+1 - frame t warped onto it by the "
        "optical flow|, grey levels 0-255; None below 2 frames."
    )
    frame_change: float | None = Field(
        description="Mean over consecutive pairs of |frame t+1 - frame t| (no warp), grey levels."
    )
    seam_ratio: float | None = Field(
        description="Mean change per generated interval across chunk boundaries over the mean "
        "within chunks; 1.0 = no visible seam. None when the clip holds no boundary or no "
        "interval within a chunk."
    )
    boundary_change: float | None = Field(
        description="Mean change (grey levels, summed over an interval) across chunk boundaries."
    )
    within_change: float | None = Field(
        description="Mean change (grey levels, summed over an interval) within chunks."
    )
    boundaries: int = Field(description="Chunk boundaries the clip covers (seam ratio's sample).")


def measure_frames(
    chunks: Iterable[np.ndarray], fps: float | Fraction, settings: ConsistencySettings
) -> ConsistencyFigures:
    """Consistency of frames shown at `fps`: RGB or grey arrays, or chunks (n, H, W[, 3]) of
    them, already at working size. Streams: only the previous frame is held."""
    backend = FlowBackend(InterpolationSettings(flow_scale=1.0))
    previous: np.ndarray | None = None
    warp_errors: list[float] = []
    changes: list[float] = []
    frames = 0
    for frame in _frames(chunks):
        grey = _grey(frame)
        if previous is not None:
            if grey.shape != previous.shape:
                raise ValueError("all frames must have one size")
            changes.append(float(cv2.absdiff(grey, previous).mean()))
            warp_errors.append(_warp_error(backend, previous, grey))
        previous = grey
        frames += 1
    rate = exact_rate(fps)
    generation = exact_rate(settings.generation_fps) if settings.generation_fps else rate
    boundary, within, count = seam_changes(changes, rate, generation, settings.chunk_frames)
    ratio = None
    if boundary is not None and within is not None:
        ratio = (boundary + _RATIO_EPSILON) / (within + _RATIO_EPSILON)
    return ConsistencyFigures(
        frames=frames,
        fps=float(rate),
        warp_error=_mean(warp_errors),
        frame_change=_mean(changes),
        seam_ratio=ratio,
        boundary_change=boundary,
        within_change=within,
        boundaries=count,
    )


def measure_video(
    path: str | os.PathLike,
    settings: ConsistencySettings | None = None,
    limits: InputLimits | None = None,
) -> ConsistencyFigures:
    """Consistency of a video file, decoded at its own rate (the project's decoder, which
    enforces `limits` and raises the typed input errors on a bad file)."""
    settings = settings or ConsistencySettings()
    limits = limits or InputLimits()
    info = probe(path, limits)
    rate = exact_rate(info.fps)
    width = min(settings.working_width, info.width)
    decode = DecodeSettings(fps=float(rate), width=max(16, width), multiple_of=2, chunk_frames=64)
    chunks = (chunk.frames for chunk in decode_chunks(path, decode, limits, info))
    return measure_frames(chunks, rate, settings)


def seam_changes(
    changes: Sequence[float], fps: Fraction, generation_fps: Fraction, chunk_frames: int
) -> tuple[float | None, float | None, int]:
    """(mean change across chunk boundaries, mean change within chunks, boundaries counted)
    from the per-pair changes of a clip at `fps` whose frames were generated at
    `generation_fps` in chunks of `chunk_frames` (see the module docstring)."""
    if not changes:
        return None, None, 0
    end = len(changes) / fps  # time of the last frame: pairs cover [0, end]
    intervals = math.floor(end * generation_fps)  # generated intervals the clip fully covers
    per_interval = [0.0] * intervals
    for pair, change in enumerate(changes):
        start, stop = pair / fps, (pair + 1) / fps
        first = math.floor(start * generation_fps)
        last = min(math.ceil(stop * generation_fps), intervals)
        for i in range(first, last):
            overlap = min(stop, (i + 1) / generation_fps) - max(start, i / generation_fps)
            if overlap > 0:
                per_interval[i] += change * float(overlap * fps)
    across = [c for i, c in enumerate(per_interval) if (i + 1) % chunk_frames == 0]
    inside = [c for i, c in enumerate(per_interval) if (i + 1) % chunk_frames != 0]
    return _mean(across), _mean(inside), len(across)


def _frames(chunks: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    for item in chunks:
        item = np.asarray(item)
        is_frame = item.ndim == 2 or (item.ndim == 3 and item.shape[-1] == 3)
        yield from [item] if is_frame else item


def _grey(frame: np.ndarray) -> np.ndarray:
    frame = np.ascontiguousarray(frame, dtype=np.uint8)
    return frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def _warp_error(backend: FlowBackend, before: np.ndarray, after: np.ndarray) -> float:
    """|after - before warped onto after| along the flow from after to before, mean grey."""
    flow = backend.flow(after, before)
    coords = _grid(*after.shape) + flow
    warped = cv2.remap(before, coords, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return float(cv2.absdiff(after, warped).mean())


@functools.lru_cache(maxsize=4)
def _grid(height: int, width: int) -> np.ndarray:
    """(H, W, 2) float32 map of each pixel's own (x, y)."""
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    grid = np.dstack([xs, ys])
    grid.flags.writeable = False
    return grid


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None
