"""Keyframe ControlNet: which frames of a batch ControlNet sees and how the others blend.

Decisions (the why):
- ControlNet runs on every K-th frame of a chunk *and on the chunk's last frame*, so every
  other frame lies between two keyframes and its residuals (each down-block residual and the
  mid-block residual) are linearly interpolated at every step; nothing is extrapolated or held.
  The extra keyframe costs at most one ControlNet evaluation (two with CFG) per chunk per step.
  A keyframe's residuals are exactly its own evaluation (lerp weight 0).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from deployments.diffusion.settings import ChunkRequest
from deployments.diffusion.work_units import keyframe_indices


def keyframe_blend(frames: int, every: int) -> list[tuple[int, int, float]]:
    """For each frame: (left keyframe slot, right keyframe slot, weight of the right one).

    A keyframe blends with itself at weight 0, so it gets exactly its own residuals (lerp
    at weight 1 would round: a + (b - a) is not always b).
    """
    keys = keyframe_indices(frames, every)
    blend = []
    for frame in range(frames):
        slot = bisect.bisect_right(keys, frame) - 1
        left = keys[slot]
        if left == frame:
            blend.append((slot, slot, 0.0))
        else:
            right = keys[slot + 1]
            blend.append((slot, slot + 1, (frame - left) / (right - left)))
    return blend


class BatchLayout:
    """Where each frame of a batch comes from and which keyframes its residuals blend."""

    def __init__(self, requests: Sequence[ChunkRequest], every: int):
        owner, keyframes, left, right, weight = [], [], [], [], []
        start = 0
        for index, request in enumerate(requests):
            first = len(keyframes)
            keyframes.extend(start + k for k in keyframe_indices(request.frames, every))
            for a, b, w in keyframe_blend(request.frames, every):
                left.append(first + a)
                right.append(first + b)
                weight.append(w)
            owner.extend([index] * request.frames)
            start += request.frames
        self.owner = np.asarray(owner)
        self.keyframes = keyframes
        self.keyframe_owner = self.owner[keyframes]
        self.left, self.right, self.weight = left, right, weight
        self.frames = start
