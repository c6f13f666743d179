"""Interpolation stage: retime frames from the generation fps to the output fps on CPU.

Diffusion makes frames at a low rate (12 fps); this stage makes the frames between, so the GPU
pays only for the frames it must.

**Timing rule.** Source frame i is shown at i/in_fps, output frame k at exactly k/out_fps (times
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

**Default backend ("flow", no weights).** Chosen by measurement (benchmarks/interpolation.py,
one core, shared machine): tuned on the first half of the real sample clip (frames 0-114),
evaluated on the second half (115-229); numbers below are from the evaluation half.
- Motion: OpenCV DIS dense optical flow, both directions, on a grey copy scaled by 0.75. DIS
  'medium' gave the best quality per millisecond of the OpenCV methods (per flow at 512x288 /
  plain half-warp PSNR on tuning triples: DIS medium 11 ms / 39.7 dB, DIS fast 2 ms / 39.0,
  Farneback 22 ms / 39.2, PCAFlow 78 ms / 38.7, DeepFlow 347 ms / 39.6, dense RLOF 207 ms /
  35.2; TV-L1 1.4 s was left out). Two variational refinement iterations instead of the
  preset's five were faster and as good. Flow on full-size frames gains 0.1-0.2 dB but runs at
  17 instead of 26 frames/s; on half-size frames it loses up to 0.45 dB.
- Flow at time t: each output pixel takes, among candidate motions (the forward flow, the
  negated backward flow, and both read 2 px away diagonally), the one along which the two
  frames agree best (a symmetric matching cost, box-filtered). Assuming "flow at time t = flow
  at time 0" is what smears moving limbs; on the same flows the choice gains 0.4-0.5 dB over
  the plain half-flow warp (tuning frames).
- Both frames are warped backwards to t along that motion (cv2.remap, bicubic) and blended
  (1-t, t). Bilinear sampling blurs detail at half-pixel offsets: its frames keep 95% of the
  true frames' fine detail (mean |Laplacian|) against 98% for bicubic, so every other frame of
  a 12->25 clip would look softer (bilinear: within 0.15 dB in PSNR, lower SSIM, 20% faster).
- Occlusion weights (`occlusion=True`: per-side visibility from a forward-backward consistency
  check, blend weighted by (1-t)*vis0 and t*vis1, only where the two warps disagree) cost
  0.1 dB on real frames and were neutral on a synthetic occluder: DIS smears flow across
  motion boundaries, so the check marks bands on both sides of an edge, and averaging two
  partly wrong samples beats picking one. So they are off by default; the candidate choice
  above is what handles edges.
- Scene cuts: a normalised correlation of small blurred thumbnails below 0.5 means the frames
  are unrelated (sample frames up to 5 apart: >= 0.91, unrelated pictures: < 0.05); across a cut
  nothing is morphed, the nearer frame is held. Correlation, unlike a plain difference, is
  blind to the exposure flicker the sample clip has.
Result (eval, PSNR / SSIM): skip-one triples 36.20 dB / 0.9827 against 33.58 / 0.9743 for the
average of the neighbours and 36.15 / 0.9825 for a plain full-size DIS half-flow warp; skip-three
(t = 1/4, 1/2, 3/4) 32.97 / 0.9724 against 32.01 / 0.9685 and 32.83 / 0.9711. Speed, 512x512, one
core: 26 interpolated frames/s at t=1/2 (38 ms each; the plain warp: 22/s); a 12->25 retime runs
at 41 output frames/s, the flow of a source pair serving both frames made between them.

**Before or after upscaling.** After: measure the motion on the generation-size frames and
apply it to the upscaled ones (`interpolate_with_flow_from`, bilinear there since upscaled
frames are smooth at pixel scale). Per output frame at 4x (2048x1152) that costs 0.060 s
against 0.023 s at generation size, for the same quality (-0.04 dB against a bicubic-upscaled
truth), but interpolating first would make the upscaler process 25 instead of 12 frames a
second, and a learned upscaler costs far more per frame (Real-ESRGAN compact architecture, one
core: 3.9 s at 512x288). Break-even is an upscaler cheaper than about 0.04 s per frame. Flow
measured on the large frames themselves is 0.75 dB better but costs 0.43 s per frame.

Learned models (RIFE, FILM) plug in as an `InterpolationBackend` registered under their name;
`make_backend` needs their weights path configured and fails clearly otherwise.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, Field, model_validator

from deployments.errors import InvalidSettingError, NotAVideoError
from deployments.video import exact_rate

INTERPOLATE_CODE_VERSION = "interpolate-1"

_DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
_SAMPLING = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}
# DIS needs a few patches per side; below this the pair is blended without motion.
_MIN_FLOW_SIDE = 16
# Side of the thumbnails the scene-cut test correlates (small: it judges layout, not detail).
_CUT_THUMB_WIDTH = 64


class InterpolationSettings(BaseModel):
    """How frames between generated frames are made; part of the stage's cache key."""

    backend: Literal["flow", "rife"] = Field(
        default="flow",
        description="'flow': OpenCV optical flow on CPU, no weights. 'rife': a learned model, "
        "needs `rife_weights` and a registered implementation.",
    )
    rife_weights: str | None = Field(
        default=None, description="Path of the RIFE weights file; required by backend 'rife'."
    )
    flow_preset: Literal["ultrafast", "fast", "medium"] = Field(
        default="medium", description="OpenCV DIS preset: speed against flow accuracy."
    )
    flow_refinement_iterations: int = Field(
        default=2,
        ge=0,
        le=20,
        description="DIS variational refinement iterations per pyramid level (the 'medium' "
        "preset uses 5; 2 measured faster and as accurate here).",
    )
    flow_scale: float = Field(
        default=0.75,
        gt=0,
        le=1,
        description="Motion is estimated on frames scaled by this factor (grey), then "
        "upsampled: the main speed knob.",
    )
    candidate_shift_px: int = Field(
        default=2,
        ge=0,
        le=16,
        description="Also try the flows found this many pixels (at flow scale) away from each "
        "pixel, diagonally both ways; fixes flow smeared across moving edges. 0 disables.",
    )
    match_window: int = Field(
        default=5,
        ge=1,
        le=15,
        description="Side of the box (at flow scale) over which the matching cost that picks "
        "each pixel's motion is averaged.",
    )
    occlusion: bool = Field(
        default=False,
        description="Weight each frame by its forward-backward flow consistency where the two "
        "warps disagree (content hidden in one frame comes from the other).",
    )
    occlusion_sigma_px: float = Field(
        default=2.0,
        gt=0,
        description="Forward-backward flow error (pixels at flow scale) at which a pixel's "
        "visibility falls to 1/e.",
    )
    disagreement_range: tuple[float, float] = Field(
        default=(6.0, 20.0),
        description="Grey-level disagreement of the two warps over which occlusion weighting "
        "fades in (below: plain time-weighted blend; above: full occlusion weighting).",
    )
    scene_cut_correlation: float = Field(
        default=0.5,
        ge=-1,
        le=1,
        description="Thumbnail correlation below which two frames are a scene cut: the "
        "nearer frame is held instead of morphing.",
    )
    sampling: Literal["auto", "linear", "cubic"] = Field(
        default="auto",
        description="Resampling of the colour frames when warping. Bilinear blurs fine detail "
        "at fractional offsets, so interpolated frames would look softer than generated ones "
        "(a visible pulse of sharpness); bicubic keeps it. 'auto': bicubic, except bilinear "
        "on frames at least twice the size the motion was measured on (upscaled frames are "
        "smooth at pixel scale, and bicubic costs 6x more there for no gain).",
    )
    pad_tail: bool = Field(
        default=True,
        description="Hold the last source frame for output times inside its display interval "
        "(after the last source time), so the retimed clip lasts as long as the source.",
    )

    @model_validator(mode="after")
    def _ordered_range(self) -> InterpolationSettings:
        low, high = self.disagreement_range
        if not 0 <= low < high:
            raise ValueError("disagreement_range must be (low, high) with 0 <= low < high")
        return self


# ----------------------------------------------------------------------------- timing rule


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
    n_source: int, in_fps: float | Fraction, out_fps: float | Fraction, pad_tail: bool = True
) -> list[tuple[int, Fraction]]:
    """(source index, t) of every output frame: the frames index and index+1 mixed at t.

    t == 0 means "source frame `index` unchanged". Padded tail frames hold the last frame.
    """
    step = exact_fps(in_fps) / exact_fps(out_fps)
    positions = []
    for k in range(output_frame_count(n_source, in_fps, out_fps, pad_tail)):
        p = k * step
        index = math.floor(p)
        positions.append((index, p - index) if index < n_source - 1 else (n_source - 1, 0))
    return positions


# ---------------------------------------------------------------------------- backends


class InterpolationBackend(ABC):
    """Makes frames between two frames; implementations: `FlowBackend`, learned models."""

    name: str = "abstract"

    @abstractmethod
    def interpolate(
        self, frame0: np.ndarray, frame1: np.ndarray, times: Sequence[float]
    ) -> list[np.ndarray]:
        """Frames at each t in `times` (0 < t < 1) between RGB uint8 frames of equal size."""

    def interpolate_with_flow_from(
        self,
        guide0: np.ndarray,
        guide1: np.ndarray,
        frame0: np.ndarray,
        frame1: np.ndarray,
        times: Sequence[float],
    ) -> list[np.ndarray]:
        """Frames between `frame0` and `frame1`, motion measured on smaller `guide` copies.
        A backend that cannot reuse motion across sizes works on the frames themselves."""
        return self.interpolate(frame0, frame1, times)


@dataclass(frozen=True)
class PairMotion:
    """Motion between two frames at analysis resolution (grey, scaled by `flow_scale`)."""

    cut: bool
    source_width: int = 0
    grey0: np.ndarray | None = None
    grey1: np.ndarray | None = None
    flow01: np.ndarray | None = None
    flow10: np.ndarray | None = None


class FlowBackend(InterpolationBackend):
    """Bidirectional DIS optical flow, per-pixel motion choice, occlusion-aware blending."""

    name = "flow"

    def __init__(self, settings: InterpolationSettings | None = None):
        self.settings = settings or InterpolationSettings()
        # One DIS object per backend: it keeps buffers between calls and is not thread-safe.
        self._dis = cv2.DISOpticalFlow_create(_DIS_PRESETS[self.settings.flow_preset])
        self._dis.setVariationalRefinementIterations(self.settings.flow_refinement_iterations)

    def interpolate(
        self, frame0: np.ndarray, frame1: np.ndarray, times: Sequence[float]
    ) -> list[np.ndarray]:
        return self.interpolate_with_flow_from(frame0, frame1, frame0, frame1, times)

    def interpolate_with_flow_from(
        self,
        guide0: np.ndarray,
        guide1: np.ndarray,
        frame0: np.ndarray,
        frame1: np.ndarray,
        times: Sequence[float],
    ) -> list[np.ndarray]:
        """Frames between `frame0` and `frame1`, with the motion measured on the guides.

        Guides are the same pictures at another size (e.g. the generation-size frames of
        upscaled ones): the flow is cheap to measure there and is upsampled to the frames.
        """
        _check_pair(frame0, frame1)
        _check_pair(guide0, guide1)
        motion = self.estimate(guide0, guide1)
        return [self.render(motion, frame0, frame1, t) for t in times]

    def estimate(self, frame0: np.ndarray, frame1: np.ndarray) -> PairMotion:
        """Grey copies, scene-cut test and flows in both directions, at flow scale."""
        grey0, grey1 = self._analysis_grey(frame0), self._analysis_grey(frame1)
        width = frame0.shape[1]
        if is_scene_cut(grey0, grey1, self.settings.scene_cut_correlation):
            return PairMotion(cut=True, source_width=width)
        if min(grey0.shape) < _MIN_FLOW_SIDE:
            return PairMotion(False, width, grey0, grey1)
        flow01 = self._dis.calc(grey0, grey1, None)
        flow10 = self._dis.calc(grey1, grey0, None)
        return PairMotion(False, width, grey0, grey1, flow01, flow10)

    def render(self, motion: PairMotion, frame0: np.ndarray, frame1: np.ndarray, t: float):
        """The frame at time t, applying `motion` (measured at any size) to these frames."""
        if motion.cut:
            return frame0 if t < 0.5 else frame1
        if motion.flow01 is None:
            return cv2.addWeighted(frame0, 1.0 - t, frame1, t, 0.0)
        velocity, weight0 = self._motion_at(motion, t)
        height, width = frame0.shape[:2]
        velocity = resize_flow(velocity, width, height)
        grid = _grid(height, width)
        sampling = self._sampling(width, motion.source_width)
        warped0 = _warp(frame0, cv2.scaleAdd(velocity, -t, grid), sampling)
        warped1 = _warp(frame1, cv2.scaleAdd(velocity, 1.0 - t, grid), sampling)
        if weight0 is None:
            return cv2.addWeighted(warped0, 1.0 - t, warped1, t, 0.0)
        weight0 = cv2.resize(weight0, (width, height), interpolation=cv2.INTER_LINEAR)
        return cv2.blendLinear(warped0, warped1, weight0, 1.0 - weight0)

    # -- internals -------------------------------------------------------------------------

    def _sampling(self, width: int, source_width: int) -> int:
        choice = self.settings.sampling
        if choice == "auto":
            choice = "linear" if width >= 2 * source_width else "cubic"
        return _SAMPLING[choice]

    def _analysis_grey(self, frame: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        scale = self.settings.flow_scale
        if scale == 1.0:
            return grey
        height, width = grey.shape
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return cv2.resize(grey, size, interpolation=cv2.INTER_AREA)

    def _motion_at(self, motion: PairMotion, t: float) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-pixel motion (frame 0 -> 1, at analysis scale) of the content at time t, and the
        weight of frame 0 (None: plain (1-t, t) blend).

        Each pixel takes the candidate motion along which the two frames agree best; the
        running minimum avoids stacking all candidates' costs (this is the hot loop).
        """
        s = self.settings
        grey0, grey1 = motion.grey0, motion.grey1
        grid = _grid(*grey0.shape)
        best_cost = best_velocity = None
        for candidate in _motion_candidates(motion.flow01, motion.flow10, s.candidate_shift_px):
            cost = _matching_cost(grey0, grey1, candidate, t, grid, s.match_window)
            if best_cost is None:
                best_cost, best_velocity = cost, candidate.copy()
                continue
            better = cv2.compare(cost, best_cost, cv2.CMP_LT)
            cv2.copyTo(candidate, better, best_velocity)
            best_cost = cv2.min(cost, best_cost)
        if not s.occlusion:
            return best_velocity, None
        return best_velocity, self._frame0_weight(motion, best_velocity, best_cost, t, grid)

    def _frame0_weight(self, motion, velocity, cost, t, grid) -> np.ndarray:
        s = self.settings
        # consistent0: the frame-0 pixel has a match in frame 1 (it is not about to be hidden).
        consistent0 = _consistency(motion.flow01, motion.flow10, grid, s.occlusion_sigma_px)
        consistent1 = _consistency(motion.flow10, motion.flow01, grid, s.occlusion_sigma_px)
        # Content at time t comes from x - t*v in frame 0 and x + (1-t)*v in frame 1. If that
        # frame-0 pixel is hidden in frame 1, frame 1's sample shows the occluder: trust frame 0.
        visible1 = _warp(consistent0, cv2.scaleAdd(velocity, -t, grid))
        visible0 = _warp(consistent1, cv2.scaleAdd(velocity, 1.0 - t, grid))
        low, high = s.disagreement_range
        mean_cost = cost.astype(np.float32) / (s.match_window * s.match_window)
        gate = np.clip((mean_cost - low) / max(high - low, 1e-6), 0.0, 1.0)
        visible0 = 1.0 - gate * (1.0 - visible0)
        visible1 = 1.0 - gate * (1.0 - visible1)
        w0 = (1.0 - t) * (visible0 + 1e-3)
        w1 = t * (visible1 + 1e-3)
        return (w0 / (w0 + w1)).astype(np.float32)


_BackendFactory = Callable[[InterpolationSettings], InterpolationBackend]
_REGISTRY: dict[str, _BackendFactory] = {}


def register_backend(name: str, factory: _BackendFactory) -> None:
    """Make a learned backend (e.g. 'rife') available to `make_backend` under `name`."""
    _REGISTRY[name] = factory


def make_backend(settings: InterpolationSettings | None = None) -> InterpolationBackend:
    """The backend `settings` ask for; 'flow' unless a learned model is configured."""
    settings = settings or InterpolationSettings()
    if settings.backend == "flow":
        return FlowBackend(settings)
    if not settings.rife_weights:
        raise InvalidSettingError(
            f"the '{settings.backend}' interpolation backend needs a weights file: set "
            "rife_weights, or use backend 'flow' (no weights needed)"
        )
    if not Path(settings.rife_weights).is_file():
        raise InvalidSettingError(f"the RIFE weights file {settings.rife_weights} does not exist")
    factory = _REGISTRY.get(settings.backend)
    if factory is None:
        raise InvalidSettingError(
            f"no '{settings.backend}' interpolation implementation is installed; use backend 'flow'"
        )
    return factory(settings)


# ------------------------------------------------------------------------ flow helpers


def is_scene_cut(grey0: np.ndarray, grey1: np.ndarray, threshold: float) -> bool:
    """Whether two grey frames are unrelated: low correlation of blurred thumbnails."""
    a, b = _thumbnail(grey0), _thumbnail(grey1)
    a -= a.mean()
    b -= b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if denominator < 1e-6:
        # A flat frame (fade to black) correlates with nothing: a cut only if the levels jump.
        return abs(float(grey0.mean()) - float(grey1.mean())) > 64
    return float((a * b).sum()) / denominator < threshold


def _thumbnail(grey: np.ndarray) -> np.ndarray:
    height, width = grey.shape
    thumb_w = min(width, _CUT_THUMB_WIDTH)
    thumb_h = max(1, round(height * thumb_w / width))
    small = cv2.resize(grey, (thumb_w, thumb_h), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(small.astype(np.float32), (0, 0), 1.0)


def resize_flow(flow: np.ndarray, width: int, height: int) -> np.ndarray:
    """A flow field resized to width x height, its vectors scaled with it."""
    flow_h, flow_w = flow.shape[:2]
    if (flow_w, flow_h) == (width, height):
        return flow
    resized = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR)
    resized[..., 0] *= width / flow_w
    resized[..., 1] *= height / flow_h
    return resized


def _motion_candidates(flow01, flow10, shift_px: int) -> Iterator[np.ndarray]:
    """The forward flow, the negated backward flow, and both taken `shift_px` away diagonally.

    A diagonal step crosses horizontal and vertical edges alike; it matched four axis-aligned
    shifts in quality (tuning frames) with two fewer candidates per flow.
    """
    backward = -flow10
    yield flow01
    yield backward
    if not shift_px:
        return
    height, width = flow01.shape[:2]
    s = shift_px
    for flow in (flow01, backward):
        # Shifted copies are views into one padded array: no copying per candidate.
        padded = cv2.copyMakeBorder(flow, s, s, s, s, cv2.BORDER_REPLICATE)
        yield padded[2 * s : 2 * s + height, 2 * s : 2 * s + width]
        yield padded[:height, :width]


def _matching_cost(grey0, grey1, velocity, t, grid, window) -> np.ndarray:
    """How much the two frames disagree when sampled along `velocity` around time t: the sum
    of absolute grey differences over a window (uint8 samples, uint16 sums: fast)."""
    sample0 = _warp(grey0, cv2.scaleAdd(velocity, -t, grid))
    sample1 = _warp(grey1, cv2.scaleAdd(velocity, 1.0 - t, grid))
    difference = cv2.absdiff(sample0, sample1)
    return cv2.boxFilter(difference, cv2.CV_16U, (window, window), normalize=False)


def _consistency(flow_ab, flow_ba, grid, sigma: float) -> np.ndarray:
    """1 where following a->b then b->a returns to the start, falling to 0 where it does not."""
    back = _warp(flow_ba, cv2.add(grid, flow_ab))
    error = np.square(flow_ab + back).sum(axis=2)
    return np.exp(-error / (sigma * sigma)).astype(np.float32)


def _warp(image: np.ndarray, coords: np.ndarray, interpolation: int = cv2.INTER_LINEAR):
    """Backward warp: output pixel x shows `image` at coords[x] (x, y)."""
    return cv2.remap(image, coords, None, interpolation, borderMode=cv2.BORDER_REPLICATE)


_GRIDS: dict[tuple[int, int], np.ndarray] = {}


def _grid(height: int, width: int) -> np.ndarray:
    """(H, W, 2) float32 map of each pixel's own (x, y), cached per size (read-only)."""
    grid = _GRIDS.get((height, width))
    if grid is None:
        if len(_GRIDS) > 8:
            _GRIDS.clear()
        xs = np.arange(width, dtype=np.float32)
        ys = np.arange(height, dtype=np.float32)
        xs, ys = np.meshgrid(xs, ys)
        grid = _GRIDS[(height, width)] = np.dstack([xs, ys])
        grid.flags.writeable = False
    return grid


def _check_pair(frame0: np.ndarray, frame1: np.ndarray) -> None:
    for frame in (frame0, frame1):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise InvalidSettingError("frames must be RGB uint8 arrays of shape (H, W, 3)")
    if frame0.shape != frame1.shape:
        raise InvalidSettingError(
            f"frames to interpolate differ in size: {frame0.shape[1]}x{frame0.shape[0]} and "
            f"{frame1.shape[1]}x{frame1.shape[0]}"
        )


# --------------------------------------------------------------------------- retiming


class FrameRetimer:
    """Retimes a stream of frames from `in_fps` to `out_fps`, chunk by chunk.

    Feed consecutive chunks with `push` (each yields the output frames it completes) and call
    `finish` at the end (the last frame and the padded tail). Only the previous chunk's last
    frame is kept between chunks, so memory stays bounded. Output frames on a source time are
    the source arrays themselves (bit-exact; do not modify them in place). `first_index` starts
    the stream at a later source frame (see `retime_chunk`).
    """

    def __init__(
        self,
        in_fps: float | Fraction,
        out_fps: float | Fraction,
        settings: InterpolationSettings | None = None,
        backend: InterpolationBackend | None = None,
        first_index: int = 0,
    ):
        self.settings = settings or InterpolationSettings()
        self.backend = backend or make_backend(self.settings)
        self._step = exact_fps(in_fps) / exact_fps(out_fps)
        if first_index < 0:
            raise InvalidSettingError("first_index must be 0 or more")
        # Starting mid-stream (a later chunk): the first output is the first one at or after
        # the first frame's time.
        self._next_k = math.ceil(first_index / self._step)
        self._seen = first_index
        self._last: np.ndarray | None = None
        self._last_guide: np.ndarray | None = None
        self._finished = False

    @property
    def next_output_index(self) -> int:
        """Index (in the whole output stream) of the next output frame."""
        return self._next_k

    def push(
        self, frames: Iterable[np.ndarray], guides: Iterable[np.ndarray] | None = None
    ) -> Iterator[np.ndarray]:
        """Yield the output frames that these next source frames complete.

        `guides`, when given, are the same frames at another size; motion is measured on them
        and applied to `frames` (by backends that can; others ignore them).
        """
        if self._finished:
            raise RuntimeError("push after finish")
        frames = list(frames)
        guides = list(guides) if guides is not None else [None] * len(frames)
        if len(guides) != len(frames):
            raise InvalidSettingError("give one guide frame per frame")
        for frame, guide in zip(frames, guides, strict=True):
            yield from self._add(frame, guide)

    def finish(self) -> Iterator[np.ndarray]:
        """Yield the frame on the last source time and, with `pad_tail`, the held tail."""
        self._finished = True
        if self._last is None:
            return
        last_index = self._seen - 1
        while True:
            position = self._next_k * self._step
            on_last = position == last_index
            in_tail = self.settings.pad_tail and last_index < position < self._seen
            if not (on_last or in_tail):
                return
            self._next_k += 1
            yield self._last

    def run(self, chunks: Iterable[Iterable[np.ndarray]]) -> Iterator[np.ndarray]:
        """Retime a whole stream of chunks: every `push`, then `finish`."""
        for chunk in chunks:
            yield from self.push(chunk)
        yield from self.finish()

    def _add(self, frame: np.ndarray, guide: np.ndarray | None) -> Iterator[np.ndarray]:
        frame = np.asarray(frame)
        if self._last is not None:
            # Output times in [previous source time, this source time) are now complete.
            yield from self._between(self._last, frame, self._last_guide, guide)
        self._last, self._last_guide = frame, guide
        self._seen += 1

    def _between(self, frame0, frame1, guide0, guide1) -> Iterator[np.ndarray]:
        index0 = self._seen - 1
        times: list[float] = []
        while (position := self._next_k * self._step) < index0 + 1:
            times.append(float(position - index0))
            self._next_k += 1
        if not times:
            return
        exact = times[0] == 0.0
        if exact:
            yield frame0
            times = times[1:]
        if not times:
            return
        if guide0 is not None:
            yield from self.backend.interpolate_with_flow_from(
                guide0, guide1, frame0, frame1, times
            )
        else:
            yield from self.backend.interpolate(frame0, frame1, times)


def interpolate_clip(
    frames: Sequence[np.ndarray] | np.ndarray,
    in_fps: float | Fraction,
    out_fps: float | Fraction,
    settings: InterpolationSettings | None = None,
    backend: InterpolationBackend | None = None,
) -> np.ndarray:
    """All frames of a short clip retimed to `out_fps`, as one (n, H, W, 3) array."""
    retimer = FrameRetimer(in_fps, out_fps, settings, backend)
    out = list(retimer.run([frames]))
    if not out:
        raise InvalidSettingError("there are no frames to interpolate")
    return np.stack(out)


def retime_chunk(
    frames: Sequence[np.ndarray] | np.ndarray,
    first_index: int,
    next_frame: np.ndarray | None,
    in_fps: float | Fraction,
    out_fps: float | Fraction,
    settings: InterpolationSettings | None = None,
    backend: InterpolationBackend | None = None,
) -> list[np.ndarray]:
    """The output frames of one chunk, computed on its own (cacheable per chunk).

    `frames` are source frames first_index, first_index+1, ...; `next_frame` is the first frame
    of the next chunk (None for the last chunk, which then also gets the last frame and the
    padded tail). Returns the outputs whose times fall from this chunk's first frame up to
    (not including) the next chunk's first frame, so the chunks' outputs concatenate to
    exactly the whole clip's.
    """
    retimer = FrameRetimer(in_fps, out_fps, settings, backend, first_index=first_index)
    out = list(retimer.push(frames))
    if next_frame is None:
        out.extend(retimer.finish())
    else:
        out.extend(retimer.push([next_frame]))
    return out


def interpolate_with_flow_from(
    small_frames: Sequence[np.ndarray] | np.ndarray,
    large_frames: Sequence[np.ndarray] | np.ndarray,
    in_fps: float | Fraction,
    out_fps: float | Fraction,
    settings: InterpolationSettings | None = None,
) -> np.ndarray:
    """Retime `large_frames` (e.g. upscaled) with motion measured on `small_frames`."""
    if len(small_frames) != len(large_frames):
        raise InvalidSettingError("give one small frame per large frame")
    retimer = FrameRetimer(in_fps, out_fps, settings)
    out = list(retimer.push(large_frames, guides=small_frames)) + list(retimer.finish())
    if not out:
        raise InvalidSettingError("there are no frames to interpolate")
    return np.stack(out)


# ------------------------------------------------------------------------- file helpers


def interpolate_pair_files(
    a_png: str | os.PathLike,
    b_png: str | os.PathLike,
    t: float,
    out_png: str | os.PathLike,
    settings: InterpolationSettings | None = None,
) -> Path:
    """Write the frame at time t (0..1) between two image files; backs `motionserve interpolate
    A.png B.png --t 0.5 -o mid.png`."""
    if not (isinstance(t, int | float) and 0.0 <= t <= 1.0):
        raise InvalidSettingError(f"t must be between 0 and 1, not {t}")
    frame0, frame1 = _read_rgb(a_png), _read_rgb(b_png)
    _check_pair(frame0, frame1)
    if t == 0.0:
        middle = frame0
    elif t == 1.0:
        middle = frame1
    else:
        middle = make_backend(settings).interpolate(frame0, frame1, [float(t)])[0]
    out_png = Path(out_png)
    _write_rgb(out_png, middle)
    return out_png


def interpolate_video_file(
    in_mp4: str | os.PathLike,
    fps: float,
    out_mp4: str | os.PathLike,
    settings: InterpolationSettings | None = None,
    chunk_frames: int = 16,
) -> int:
    """Retime a video to `fps` at its own size, streaming chunk by chunk, keeping its audio;
    backs `motionserve interpolate IN.mp4 --fps 25 -o out.mp4`. Returns frames written."""
    from deployments.video import DecodeSettings, EncodeSettings, decode_chunks, encode_mp4, probe

    out_rate = _check_output_fps(fps)
    info = probe(in_mp4)
    if info.fps > 120:
        raise InvalidSettingError(f"the video runs at {info.fps:.0f} fps; at most 120 is supported")
    decode = DecodeSettings(
        fps=info.fps, width=info.width, height=info.height, chunk_frames=chunk_frames
    )
    retimer = FrameRetimer(info.fps, out_rate, settings)
    frames = retimer.run(chunk.frames for chunk in decode_chunks(in_mp4, decode, info=info))
    encode = EncodeSettings(fps=float(out_rate), audio_from=str(in_mp4))
    return encode_mp4(frames, out_mp4, encode)


def _check_output_fps(fps: float) -> Fraction:
    if not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
        raise InvalidSettingError(f"the output fps must be a number above 0, not {fps}")
    if fps > 120:
        raise InvalidSettingError(f"the output fps must be at most 120, not {fps:g}")
    return exact_fps(fps)


def _read_rgb(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise NotAVideoError(f"no such image: {path.name}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise NotAVideoError(f"{path.name} is not an image we can read")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    try:
        ok = cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    except cv2.error as exc:
        raise InvalidSettingError(f"cannot write {path.name}: {exc.msg.strip()}") from exc
    if not ok:
        raise InvalidSettingError(f"cannot write {path.name}: unknown image type or bad folder")
