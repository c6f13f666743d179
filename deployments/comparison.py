"""The edit at a glance: source | edited skeleton | generated frames, one row, one timeline. CPU.

`make demo` writes it beside the edited MP4 (serve/demo.py). Three videos in, one out:

- the result MP4 sets the timeline: its frame rate and its frame count (one output frame per
  result frame) and the panels' aspect;
- the source is decoded at each output frame's time (sample-and-hold, as every decode here);
- the edited skeleton is the right half of the motion preview (deployments/motion_preview.py
  drew it: the edited pose over the source frame it stands on; for a retimed motion that is the
  source at the edited time), sampled at each output frame's time the same way. The preview runs
  at the generation rate, so each of its frames stands for the output frames until the next.

Panels are scaled to one height; a stream that ends before the result holds its last frame.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from deployments import video
from deployments.motion_preview import label

PANEL_LABELS = ("source", "generated")  # the middle panel keeps the preview's own label
DEFAULT_HEIGHT = 360
COMPARISON_CRF = 23  # a look at the edit, not a deliverable


@dataclass(frozen=True)
class Comparison:
    """What `compose_comparison` wrote."""

    path: Path
    frames: int
    fps: float
    panel_width: int
    panel_height: int


def panel_size(width: int, height: int, max_height: int = DEFAULT_HEIGHT) -> tuple[int, int]:
    """(width, height) of one panel for a result of width x height: at most `max_height` high,
    the result's aspect, even sides (yuv420p)."""
    out_h = min(height, max_height)
    out_h -= out_h % 2
    out_w = max(2, round(out_h * width / height / 2) * 2)
    return out_w, max(2, out_h)


def compose_comparison(
    source: str | os.PathLike,
    preview: str | os.PathLike,
    result: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_height: int = DEFAULT_HEIGHT,
    crf: int = COMPARISON_CRF,
    limits: video.InputLimits | None = None,
) -> Comparison:
    """Write `out`: one row of three panels per frame of `result`, at `result`'s frame rate,
    each panel at most `max_height` high."""
    limits = limits or video.InputLimits()
    info = video.probe(result, limits)
    rate = video.exact_rate(info.fps)
    width, height = panel_size(info.width, info.height, max_height)
    panel = video.DecodeSettings(
        fps=float(rate), width=width, height=height, fit="letterbox", multiple_of=2
    )
    generated = _frames(video.decode_chunks(result, panel, limits, info))
    sources = _held(_frames(video.decode_chunks(source, panel, limits)))
    preview_native = _native(preview, float(rate), limits)
    skeletons = _held(_right_half(preview_native, width, height))

    def rows() -> Iterator[np.ndarray]:
        for frame in generated:
            left, right = next(sources).copy(), frame.copy()
            label(left, PANEL_LABELS[0])
            label(right, PANEL_LABELS[1])
            yield np.concatenate([left, next(skeletons), right], axis=1)

    settings = video.EncodeSettings(fps=float(rate), crf=crf)
    count = video.encode_mp4(rows(), out, settings)
    return Comparison(Path(out), count, float(rate), width, height)


def _native(path, fps: float, limits: video.InputLimits) -> Iterator[np.ndarray]:
    """A video's frames at its own size, sampled at `fps`."""
    info = video.probe(path, limits)
    settings = video.DecodeSettings(fps=fps, width=info.width, height=info.height)
    return _frames(video.decode_chunks(path, settings, limits, info))


def _right_half(frames: Iterator[np.ndarray], width: int, height: int) -> Iterator[np.ndarray]:
    for frame in frames:
        half = frame[:, frame.shape[1] // 2 :]
        shrink = half.shape[0] > height
        yield cv2.resize(half, (width, height), interpolation=cv2.INTER_AREA if shrink
                         else cv2.INTER_LINEAR)  # fmt: skip


def _frames(chunks: Iterator[video.VideoChunk]) -> Iterator[np.ndarray]:
    for chunk in chunks:
        yield from chunk.frames


def _held(frames: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """The frames, then the last one for ever (a stream shorter than the result's timeline)."""
    last = None
    for last in frames:
        yield last
    if last is None:
        raise ValueError("a video of the comparison has no frames")
    while True:
        yield last
