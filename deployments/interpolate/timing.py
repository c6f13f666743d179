"""Timing rule of the interpolation stage: which source frames make each output frame.

Source frame i is shown at i/in_fps, output frame k at exactly k/out_fps (times
are exact fractions, so 12->25 never drifts). Output frame k sits at source position
p = k * in_fps / out_fps: when p is a whole number the source frame is returned unchanged
(bit-exact: frame 0 always, and every source frame that lands on the output grid); otherwise the
frames floor(p) and floor(p)+1 are interpolated at t = p - floor(p). Nothing is extrapolated past
the last source frame: n frames give floor((n - 1) * out / in) + 1 interpolated outputs, the last
one at the last source frame's time when that time is on the output grid. A source clip lasts
n / in_fps (its last frame is shown for one interval), so with `pad_tail` (the default) the last
source frame is then held for the output times still inside that span: ceil(n * out / in)
frames in all, and the encoded duration count / out_fps equals n / in_fps rounded up to one
output frame. That keeps an MP4's duration, and the audio carried over to it, whole: without it
12 frames at 12 fps (1.00 s) would come out as 23 frames at 25 fps (0.92 s).

With motion-aware keyframe density (deployments/density.py) only some grid frames are generated
(`frames_at`: their grid indices, the first and the last grid frame among them). The rule is the
same: output frame k still sits at grid position p = k * in_fps / out_fps and the output frame
count still follows from the n grid frames; p is then placed between the generated frames
around it, at t = (p - a) / (b - a) for generated grid frames a <= p < b (t == 0 on a generated
frame), so only the source frames change, never an output time.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from fractions import Fraction

from deployments.video import exact_rate

# One rule for exact frame rates, shared with the encoder so output timestamps agree.
exact_fps = exact_rate


def output_frame_count(
    n_source: int, in_fps: float | Fraction, out_fps: float | Fraction, pad_tail: bool = True
) -> int:
    """Output frames for `n_source` frames: floor((n-1)*out/in)+1, or ceil(n*out/in) padded."""
    if n_source <= 0:
        return 0
    ratio = exact_fps(out_fps) / exact_fps(in_fps)
    if pad_tail:
        return math.ceil(n_source * ratio)
    return math.floor((n_source - 1) * ratio) + 1


def output_positions(
    n_source: int,
    in_fps: float | Fraction,
    out_fps: float | Fraction,
    pad_tail: bool = True,
    frames_at: Sequence[int] | None = None,
) -> list[tuple[int, Fraction]]:
    """(source index, t) of every output frame: the frames index and index+1 mixed at t.

    t == 0 means "source frame `index` unchanged". Padded tail frames hold the last frame.
    With `frames_at` (the grid indices of the frames that exist, increasing, from 0 to
    n_source - 1), the index is a position in `frames_at` and t is measured between the two
    existing frames around the output time; without it every grid frame exists.
    """
    if frames_at is not None:
        return _sparse_positions(n_source, in_fps, out_fps, pad_tail, list(frames_at))
    step = exact_fps(in_fps) / exact_fps(out_fps)
    positions = []
    for k in range(output_frame_count(n_source, in_fps, out_fps, pad_tail)):
        p = k * step
        index = math.floor(p)
        positions.append((index, p - index) if index < n_source - 1 else (n_source - 1, 0))
    return positions


def _sparse_positions(
    n_source: int, in_fps, out_fps, pad_tail: bool, frames_at: list[int]
) -> list[tuple[int, Fraction]]:
    if n_source <= 0:
        return []
    if not frames_at or frames_at[0] != 0 or frames_at[-1] != n_source - 1:
        raise ValueError("frames_at must start at grid frame 0 and end at the last grid frame")
    if any(b <= a for a, b in zip(frames_at, frames_at[1:], strict=False)):
        raise ValueError("frames_at must be increasing")
    step = exact_fps(in_fps) / exact_fps(out_fps)
    positions = []
    for k in range(output_frame_count(n_source, in_fps, out_fps, pad_tail)):
        p = k * step
        slot = bisect.bisect_right(frames_at, math.floor(p)) - 1
        left = frames_at[slot]
        if p == left or slot == len(frames_at) - 1:  # on a generated frame, or the held tail
            positions.append((slot, Fraction(0)))
        else:
            positions.append((slot, (p - left) / (frames_at[slot + 1] - left)))
    return positions
