"""Requests leaving a running batch: which rows are still computed, and the per-row state
that goes with them (see DiffusionEngine.generate's `cancelled`).

Decisions (the why):
- Rows are dropped between steps, never inside one: a step's forwards are already queued on the
  device, and between steps the state to cut is small (latents, text, control images, the
  scheduler's per-sample history, per-frame generators).
- The rows left compute exactly what they computed with the others there (each frame's maths is
  its own; only tensor batch sizes change, which CPU kernels may round differently).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from deployments.diffusion.keyframes import BatchLayout
from deployments.diffusion.settings import ChunkRequest

# Asked before each denoising step (0..steps-1) and before decoding (step `steps`): the indices,
# into the batch as submitted, of requests nobody waits for any more. Their rows leave the batch
# at once; when none is left the batch stops. Called from the thread that runs `generate`.
CancelledRows = Callable[[int], Collection[int]]


def no_rows(step: int) -> Collection[int]:
    """A `CancelledRows` for a batch that nobody cancels."""
    return ()


class LiveRows:
    """The requests still computed in a running batch and the layout of their frames.

    The layout's owners stay indices into the batch as submitted, so work is counted on the
    right request after others left.
    """

    def __init__(self, requests: Sequence[ChunkRequest], every: int):
        self.requests, self.every = list(requests), every
        self.live = list(range(len(requests)))
        self.layout = self._layout()

    def _layout(self) -> BatchLayout:
        layout = BatchLayout([self.requests[i] for i in self.live], self.every)
        index = np.asarray(self.live, dtype=np.int64)
        layout.owner = index[layout.owner]
        layout.keyframe_owner = index[layout.keyframe_owner]
        return layout

    def drop(self, cancelled: Collection[int], step: int, dropped: dict[int, int]):
        """Remove the live requests in `cancelled` (recording `step` for each); returns the
        positions of the frames that stay (an int array), or None when nothing changed."""
        leaving = set(cancelled).intersection(self.live)
        if not leaving:
            return None
        for index in leaving:
            dropped[index] = step
        owners = self.layout.owner
        self.live = [i for i in self.live if i not in leaving]
        if self.live:
            self.layout = self._layout()
        return np.flatnonzero(~np.isin(owners, sorted(leaving)))


def keep_scheduler_rows(scheduler: Any, step_kwargs: dict[str, Any], keep: Any, before: int):
    """Keep only rows `keep` of a scheduler's per-sample state (the multistep history of
    DPM-Solver and UniPC: `model_outputs`, `last_sample`) and of the per-frame generators.

    Generic on purpose: any 4-d tensor attribute with one row per frame is per-sample state;
    the rows left compute exactly what they would have (each frame's maths is its own).
    """
    import torch

    def cut(value: Any) -> Any:
        if torch.is_tensor(value) and value.dim() == 4 and value.shape[0] == before:
            return value[keep]
        return value

    for name, value in list(vars(scheduler).items()):
        if isinstance(value, list) and any(cut(v) is not v for v in value):
            setattr(scheduler, name, [cut(v) for v in value])
        elif cut(value) is not value:
            setattr(scheduler, name, cut(value))
    if "generator" in step_kwargs:
        generators = step_kwargs["generator"]
        step_kwargs["generator"] = [generators[i] for i in keep.tolist()]
