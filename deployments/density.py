"""Motion-aware keyframe density: how many frames each chunk generates, from the edited skeleton.

Diffusion generates frames on the plan's generation grid (12 fps: frame i at i / 12 s), and the
interpolator makes every output frame between them. Where the skeleton hardly moves, the
interpolator carries longer gaps as well as short ones, so a chunk there generates only every
s-th frame of the grid (its *stride*: 2 is 6 fps at 12) and the interpolator fills the rest.

Decisions (the why):
- Pure and Ray-free: a chunk's stride follows from the edited poses (cached before any GPU
  work) and these settings alone, so the plan's prediction, made before the GPU runs, equals
  what the diffusion loop counts, and a resumed or repeated job finds the same strides (and
  with them the same chunk keys).
- The motion measure is the chunk's joint speed: the displacement of every joint of the
  skeleton the ControlNet maps are drawn from (the 18 OpenPose keypoints, so not MediaPipe's
  finger and mouth points, which jitter and draw nothing) from one grid frame to the next, in
  pixels at the generation size (where the interpolator measures its flow), pooled over the
  chunk's intervals (including the one into the next chunk's first
  frame, which its last generated frame must bridge) and summarised by a high percentile
  (95th: a few fast joints decide, a single jittery one does not). A stride s is allowed when
  s x that speed stays within `max_gap_px`, the displacement across one generated gap that
  the interpolator was measured to carry within its error budget (benchmarks/
  keyframe_density.py, results in benchmarks/results/keyframe_density.json). A person who
  appears or vanishes inside a chunk counts as infinitely fast (nothing to interpolate).
- Frames stay on the grid: a chunk of stride s generates grid frames start, start + s, ...
  (never between grid times), and the job's last chunk always generates the job's last frame,
  so nothing is extrapolated and the output's timing is the plan's one exact rule
  (`deployments.interpolate.timing`): output frame k at k / output fps, its source position on
  the grid, interpolated between the generated frames around it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.pose_maps import openpose18_keypoints

DensityMode = Literal["fixed", "motion"]

# From the calibration (benchmarks/keyframe_density.py): the displacement across one generated
# gap, p95 over joints at generation size, up to which the default interpolator's in-between
# frames stay within the error budget stated there.
CALIBRATED_MAX_GAP_PX = 12.0
DEFAULT_MIN_FPS = 6.0


class KeyframeDensity(BaseModel):
    """How many frames each chunk generates: every grid frame ('fixed'), or fewer where the
    edited skeleton moves slowly ('motion')."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: DensityMode = Field(
        default="fixed",
        description="'fixed': every chunk generates every frame of the generation grid. "
        "'motion': a chunk whose skeleton moves slowly generates only every s-th grid frame "
        "(s up to generation fps / min_fps), the interpolator filling the rest.",
    )
    max_gap_px: float = Field(
        default=CALIBRATED_MAX_GAP_PX,
        gt=0,
        le=512,
        description="Largest joint displacement (pixels at the generation size, the chunk's "
        "percentile) allowed across one generated gap: stride s needs s x speed <= this. "
        "Calibrated on real and synthetic motion (benchmarks/keyframe_density.py).",
    )
    min_fps: float = Field(
        default=DEFAULT_MIN_FPS,
        gt=0,
        le=120,
        description="Fewest generated frames per second any chunk gets (the largest stride "
        "is generation fps / min_fps, rounded down).",
    )
    percentile: float = Field(
        default=95.0,
        ge=50,
        le=100,
        description="Percentile of the chunk's joint speeds (all joints, all its grid "
        "intervals) that stands for its motion.",
    )

    def max_stride(self, generation_fps: float) -> int:
        """The largest stride: grid frames per generated frame at `min_fps`."""
        if self.mode == "fixed":
            return 1
        return max(1, math.floor(generation_fps / self.min_fps + 1e-9))


class DensitySchedule(BaseModel):
    """A job's strides, one per chunk, and the speeds they came from (the plan's chunks of
    `chunk_frames` grid frames over `frames` grid frames)."""

    # An infinite speed (a person appears) travels through JSON as "Infinity".
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")

    frames: int = Field(ge=0, description="Grid frames of the job (the edited motion's).")
    chunk_frames: int = Field(ge=1, description="Grid frames per chunk.")
    strides: tuple[int, ...] = Field(
        description="Per chunk: it generates every stride-th grid frame (1: all of them)."
    )
    speeds: tuple[float, ...] = Field(
        description="Per chunk: the joint speed that chose its stride, pixels per grid frame "
        "at the generation size (the settings' percentile; inf: a person appears or vanishes)."
    )

    @model_validator(mode="after")
    def _one_per_chunk(self) -> DensitySchedule:
        chunks = math.ceil(self.frames / self.chunk_frames)
        if len(self.strides) != chunks or len(self.speeds) != chunks:
            raise ValueError(f"a schedule of {self.frames} frames needs {chunks} strides")
        if any(stride < 1 for stride in self.strides):
            raise ValueError("strides must be at least 1")
        return self

    def span(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_frames
        return start, min(start + self.chunk_frames, self.frames)

    def indices(self, chunk: int) -> list[int]:
        """Grid frames chunk `chunk` generates for its own span (the job's last chunk ends on
        the job's last frame)."""
        return grid_indices(self.span(chunk), self.strides[chunk], self.frames)

    def job_indices(self) -> list[int]:
        """Every grid frame the job generates, in order (each once)."""
        return [index for chunk in range(len(self.strides)) for index in self.indices(chunk)]

    def generated_before(self, chunk: int) -> int:
        """Frames the chunks before `chunk` generate for their own spans."""
        return sum(len(self.indices(c)) for c in range(chunk))

    def with_overlap(self, chunk: int, overlap: int) -> list[int]:
        """Grid frames chunk `chunk` generates: the previous chunk's last `overlap` generated
        frames (seamless chunks; none for chunk 0), then its own."""
        before = self.indices(chunk - 1)[-overlap:] if chunk > 0 and overlap else []
        return before + self.indices(chunk)

    def slow_fraction(self) -> float:
        """Share of the job's grid frames in chunks that generate fewer than all of them."""
        if self.frames == 0:
            return 0.0
        slow = sum(self.span(c)[1] - self.span(c)[0] for c, s in enumerate(self.strides) if s > 1)
        return slow / self.frames

    def explain(self, generation_fps: float) -> str:
        """One line for the plan's explanation: chunks per generated rate."""
        counts: dict[int, int] = {}
        for stride in self.strides:
            counts[stride] = counts.get(stride, 0) + 1
        rates = ", ".join(
            f"{count} at {generation_fps / stride:g} fps"
            for stride, count in sorted(counts.items())
        )
        return (
            f"keyframe density by motion: {len(self.strides)} chunks ({rates}); "
            f"{self.slow_fraction():.0%} of the frames judged slow"
        )


def grid_indices(span: tuple[int, int], stride: int, total: int) -> list[int]:
    """Grid frames start, start + stride, ... below stop; a span that ends the job also gets
    the job's last frame, so nothing after it is extrapolated."""
    start, stop = span
    indices = list(range(start, stop, stride))
    if stop == total and indices and indices[-1] != total - 1:
        indices.append(total - 1)
    return indices


def joint_speeds(
    landmarks: np.ndarray, present: np.ndarray, scale: float = 1.0
) -> list[np.ndarray]:
    """Per grid interval t -> t + 1: the displacement of every OpenPose keypoint (of MediaPipe
    `landmarks`, (frames, 33, >=2)) found in both frames, in pixels x `scale`; an interval
    where the person appears or vanishes is [inf]."""
    points = openpose18_keypoints(_with_visibility(landmarks)) * scale
    speeds = []
    for t in range(len(points) - 1):
        if bool(present[t]) != bool(present[t + 1]):
            speeds.append(np.array([math.inf]))
            continue
        step = np.linalg.norm(points[t + 1] - points[t], axis=-1)
        speeds.append(step[np.isfinite(step)])
    return speeds


def _with_visibility(landmarks: np.ndarray) -> np.ndarray:
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape[-1] >= 4:
        return landmarks
    padded = np.ones((*landmarks.shape[:-1], 4))
    padded[..., : landmarks.shape[-1]] = landmarks
    return padded


def chunk_speed(speeds: Sequence[np.ndarray], span: tuple[int, int], percentile: float) -> float:
    """The chunk's speed: the percentile of its intervals' joint displacements (the intervals
    from each of its frames to the next, the last one into the next chunk's first frame)."""
    start, stop = span
    pooled = [s for s in speeds[start:stop] if len(s)]
    if not pooled:
        return 0.0  # no person, or a single frame: nothing moves
    values = np.concatenate(pooled)
    if np.isinf(values).any():
        return math.inf
    return float(np.percentile(values, percentile))


def stride_for(speed: float, settings: KeyframeDensity, generation_fps: float) -> int:
    """The largest stride s (up to the settings' max) with s x speed <= max_gap_px."""
    largest = settings.max_stride(generation_fps)
    if speed <= 0:
        return largest
    if not math.isfinite(speed):
        return 1
    return max(1, min(largest, math.floor(settings.max_gap_px / speed + 1e-9)))


def density_schedule(
    landmarks: np.ndarray,
    present: np.ndarray,
    chunk_frames: int,
    settings: KeyframeDensity,
    generation_fps: float,
    scale: float = 1.0,
) -> DensitySchedule:
    """The job's strides from its edited landmarks ((frames, joints, >=2) pixels; `scale`
    takes them to the generation size)."""
    frames = len(landmarks)
    speeds = joint_speeds(landmarks, present, scale)
    chunk_speeds, strides = [], []
    for start in range(0, frames, chunk_frames):
        span = (start, min(start + chunk_frames, frames))
        speed = chunk_speed(speeds, span, settings.percentile)
        chunk_speeds.append(speed)
        strides.append(stride_for(speed, settings, generation_fps))
    return DensitySchedule(
        frames=frames, chunk_frames=chunk_frames, strides=tuple(strides),
        speeds=tuple(chunk_speeds),
    )  # fmt: skip
