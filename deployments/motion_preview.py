"""The motion preview's frames: the source with its original skeleton beside the same source
frames with the edited skeleton (side by side), at the generation fps and size. CPU only.

What a person checks before paying for the GPU: does the edited motion (smoothing, styles,
retiming) do what they wanted? The right half shows exactly the poses the ControlNet maps of the
job are drawn from, over the source frames they stand on (for a retimed motion, the source
frame at each edited frame's time).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np

from deployments.motion import MotionEditor, RetimeStyle, retime_source_times
from deployments.pose import PoseSequence
from deployments.pose_maps import render_pose_maps

PREVIEW_RENDER_VERSION = "motion-preview-1"
"""Part of the preview's cache key: bump when the same poses and frames would draw otherwise."""
BACKGROUND_DIMMING = 0.7  # the source is dimmed a little so the skeleton stands out
LABELS = ("original", "edited")
BATCH_FRAMES = 16  # frames drawn per render call (bounded memory on long clips)
_DIM = (np.arange(256) * BACKGROUND_DIMMING).astype(np.uint8)


def edited_source_frames(styles: Sequence[Any], frames: int) -> np.ndarray:
    """Index of the source frame each edited frame stands on: identity unless the styles
    retime the motion (then the nearest source frame at the edited frame's time; retimes
    compose). Non-decreasing, of length `MotionEditor(styles).edited_frame_count(frames)`."""
    times = np.arange(frames, dtype=np.float64)
    for style in MotionEditor(styles).styles:
        if isinstance(style, RetimeStyle) and len(times):
            source = retime_source_times(len(times), style.speed)
            times = np.interp(source, np.arange(len(times)), times)
    if frames == 0:
        return np.zeros(0, dtype=np.intp)
    return np.clip(np.floor(times + 0.5), 0, frames - 1).astype(np.intp)


def overlay(frames: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Pose maps (black background) drawn over dimmed frames of the same size."""
    dimmed = _DIM[frames]
    drawn = maps.any(axis=-1, keepdims=True)
    return np.where(drawn, maps, dimmed)


def label(panel: np.ndarray, text: str) -> None:
    """Write `text` in the panel's top-left corner (in place), white on a dark outline."""
    scale = max(0.35, panel.shape[0] / 720)
    thickness = max(1, round(scale * 2))
    origin = (max(4, round(8 * scale)), max(12, round(24 * scale)))
    cv2.putText(panel, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2,
                cv2.LINE_AA)  # fmt: skip
    cv2.putText(panel, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)  # fmt: skip


def side_by_side(
    source_chunks: Iterable[np.ndarray],
    original: PoseSequence,
    edited: PoseSequence,
    sources: np.ndarray,
    *,
    labels: bool = True,
) -> Iterator[np.ndarray]:
    """Preview frames (N, H, 2W, 3) uint8 RGB, a batch at a time, one per edited frame.

    `source_chunks` are the decoded source frames in order (any chunking), the frames the
    poses were extracted from; `sources[t]` is the source frame edited frame t stands on
    (`edited_source_frames`). Left: source frame `sources[t]` with its original skeleton;
    right: the same frame with edited frame t's skeleton. Streams: only one decoded chunk is
    held at a time.
    """
    sources = np.asarray(sources, dtype=np.intp)
    if len(sources) != len(edited):
        raise ValueError(f"{len(sources)} source indices for {len(edited)} edited frames")
    if len(sources) and np.any(np.diff(sources) < 0):
        raise ValueError("source indices must not decrease (frames are decoded in order)")
    done, offset = 0, 0
    for chunk in source_chunks:
        end = offset + len(chunk)
        stop = int(np.searchsorted(sources, end, side="left"))
        height, width = chunk.shape[1:3]
        for start in range(done, stop, BATCH_FRAMES):
            edited_idx = np.arange(start, min(stop, start + BATCH_FRAMES))
            source_idx = sources[edited_idx]
            background = chunk[source_idx - offset]
            left = overlay(background, _maps(original, source_idx, width, height))
            right = overlay(background, _maps(edited, edited_idx, width, height))
            if labels:
                for panel in left:
                    label(panel, LABELS[0])
                for panel in right:
                    label(panel, LABELS[1])
            yield np.concatenate([left, right], axis=2)
        done, offset = stop, end
    if done < len(sources):
        raise ValueError(
            f"the source ended after {offset} frames; the poses need frame {int(sources[done])}"
        )


def _maps(poses: PoseSequence, index: np.ndarray, width: int, height: int) -> np.ndarray:
    return render_pose_maps(
        poses.landmarks[index], width, height, source_size=(poses.width, poses.height)
    )
