"""Landmark smoothing: short gaps filled by interpolation, then a zero-lag One-Euro or a
Savitzky-Golay filter over x, y, z (numpy/scipy on `PoseSequence`s, landmarks in pixels).

Missing landmarks (NaN, or visibility below a threshold) stay NaN; only interior gaps up to
`max_gap` frames are filled, nothing is invented at either end.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.interpolate import PchipInterpolator
from scipy.signal import savgol_filter

from deployments.pose import PoseSequence


class SmoothingSettings(BaseModel):
    """Temporal smoothing of landmarks, after filling short gaps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["one_euro", "savgol"] = Field(
        default="one_euro",
        description="one_euro: adaptive low-pass (smooths slow motion hard, follows fast "
        "motion), run forward and backward so it has no lag; savgol: Savitzky-Golay polynomial "
        "fit (no lag, fixed window).",
    )
    min_cutoff: float = Field(
        default=1.0, gt=0, description="One-Euro cutoff frequency at rest, in Hz."
    )
    beta: float = Field(
        default=10.0,
        ge=0,
        description="One-Euro speed coefficient: the cutoff rises by beta Hz per frame width per "
        "second of landmark speed (coordinates are normalised by the frame width, so the "
        "settings work at any resolution).",
    )
    d_cutoff: float = Field(
        default=1.0, gt=0, description="One-Euro cutoff of the speed estimate, in Hz."
    )
    window: int = Field(default=7, ge=3, description="Savitzky-Golay window in frames (odd).")
    polyorder: int = Field(
        default=2, ge=0, description="Savitzky-Golay polynomial order (below window)."
    )
    min_visibility: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Landmarks with a lower visibility are treated as missing (0.5 is "
        "MediaPipe's own drawing threshold).",
    )
    max_gap: int = Field(
        default=10,
        ge=0,
        description="Longest run of missing frames (per landmark) filled by interpolation; "
        "longer gaps, and gaps at the start or end, stay missing.",
    )
    gap_fill: Literal["linear", "pchip"] = Field(
        default="pchip",
        description="Gap interpolation: linear, or PCHIP (smooth, never overshoots).",
    )

    @model_validator(mode="after")
    def _check_savgol(self) -> SmoothingSettings:
        if self.window % 2 == 0:
            raise ValueError(f"window must be odd, got {self.window}")
        if self.polyorder >= self.window:
            raise ValueError(f"polyorder ({self.polyorder}) must be below window ({self.window})")
        return self


def missing_mask(landmarks: np.ndarray, min_visibility: float) -> np.ndarray:
    """(T, 33) True where a landmark is unusable: NaN coordinates or visibility too low."""
    finite = np.isfinite(landmarks[..., :2]).all(axis=-1)
    with np.errstate(invalid="ignore"):
        visible = landmarks[..., 3] >= min_visibility
    return ~(finite & visible)


def _neighbour_valid_indices(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (t, j): index of the last valid frame <= t (-1 if none) and first valid >= t (T)."""
    frames = valid.shape[0]
    times = np.arange(frames)[:, None]
    previous = np.maximum.accumulate(np.where(valid, times, -1), axis=0)
    following = np.minimum.accumulate(np.where(valid, times, frames)[::-1], axis=0)[::-1]
    return previous, following


def fill_gaps(
    landmarks: np.ndarray, missing: np.ndarray, max_gap: int, method: str = "linear"
) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate interior gaps of at most `max_gap` frames, per landmark.

    `landmarks` (T, 33, C) must hold NaN where `missing`. Returns the filled copy and the mask of
    what is still missing (long gaps and gaps touching either end).
    """
    frames = landmarks.shape[0]
    previous, following = _neighbour_valid_indices(~missing)
    gap_length = following - previous - 1
    fillable = missing & (previous >= 0) & (following < frames) & (gap_length <= max_gap)
    filled = landmarks.copy()
    if not fillable.any():
        return filled, missing
    if method == "linear":
        t_idx, j_idx = np.nonzero(fillable)
        before, after = previous[t_idx, j_idx], following[t_idx, j_idx]
        weight = ((t_idx - before) / (after - before))[:, None]
        filled[t_idx, j_idx] = (
            landmarks[before, j_idx] * (1 - weight) + landmarks[after, j_idx] * weight
        )
    elif method == "pchip":
        times = np.arange(frames)
        for j in np.nonzero(fillable.any(axis=0))[0]:
            known = ~missing[:, j]
            curve = PchipInterpolator(times[known], landmarks[known, j], axis=0)
            targets = fillable[:, j]
            filled[targets, j] = curve(times[targets])
    else:
        raise ValueError(f"unknown gap fill method {method!r}")
    return filled, missing & ~fillable


def _smoothing_factor(cutoff: np.ndarray | float, fps: float) -> np.ndarray | float:
    # Exponential smoothing factor of a first-order low-pass at `cutoff` Hz sampled at `fps`.
    return 1.0 / (1.0 + fps / (2.0 * math.pi * cutoff))


def one_euro(
    values: np.ndarray,
    valid: np.ndarray,
    fps: float,
    min_cutoff: float,
    beta: float,
    d_cutoff: float,
) -> np.ndarray:
    """One-Euro filter along axis 0 of `values` (T, D), vectorised over D; NaN where invalid.

    The filter restarts after every invalid sample, so a gap never drags stale state along.
    """
    frames, dims = values.shape
    out = np.full_like(values, np.nan)
    x_prev = np.zeros(dims)
    dx_prev = np.zeros(dims)
    started = np.zeros(dims, dtype=bool)
    alpha_d = _smoothing_factor(d_cutoff, fps)
    for t in range(frames):
        x, ok = values[t], valid[t]
        dx = alpha_d * (x - x_prev) * fps + (1 - alpha_d) * dx_prev
        alpha = _smoothing_factor(min_cutoff + beta * np.abs(dx), fps)
        x_hat = alpha * x + (1 - alpha) * x_prev
        update = ok & started
        fresh = ok & ~started
        x_prev = np.where(update, x_hat, np.where(fresh, x, x_prev))
        dx_prev = np.where(update, dx, np.where(fresh, 0.0, dx_prev))
        started = ok
        out[t] = np.where(ok, x_prev, np.nan)
    return out


def one_euro_zero_lag(values: np.ndarray, valid: np.ndarray, fps: float, *params) -> np.ndarray:
    """Mean of a forward and a backward One-Euro pass: their lags cancel.

    The causal filter lags the motion by about 1 / (2 pi cutoff) (2 frames at 2.5 Hz, 30 fps);
    the whole sequence is known here, and a pose map late by 2 frames would misalign the
    generated body with the video's timing.
    """
    forward = one_euro(values, valid, fps, *params)
    backward = one_euro(values[::-1], valid[::-1], fps, *params)[::-1]
    return (forward + backward) / 2


def _valid_runs(valid: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], valid.astype(np.int8), [0]]))
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0], strict=True))


def savgol_runs(values: np.ndarray, valid: np.ndarray, window: int, polyorder: int) -> np.ndarray:
    """Savitzky-Golay along axis 0 of `values` (T, J, C) within each valid run of each landmark.

    Runs shorter than `window` use the largest odd window that fits; runs too short for the
    polynomial are left as they are.
    """
    out = values.copy()
    for j in range(values.shape[1]):
        for start, stop in _valid_runs(valid[:, j]):
            length = stop - start
            size = min(window, length if length % 2 else length - 1)
            if size > polyorder and size >= 3:
                out[start:stop, j] = savgol_filter(
                    values[start:stop, j], size, polyorder, axis=0, mode="interp"
                )
    return out


def smooth_sequence(seq: PoseSequence, settings: SmoothingSettings) -> PoseSequence:
    """Mark low-visibility landmarks missing, fill short gaps, smooth x, y, z."""
    landmarks = seq.landmarks.astype(np.float64)
    missing = missing_mask(landmarks, settings.min_visibility)
    landmarks[missing] = np.nan
    landmarks, missing = fill_gaps(landmarks, missing, settings.max_gap, settings.gap_fill)
    if len(seq) > 1 and seq.fps > 0:
        scale = float(seq.width)
        coords = landmarks[..., :3] / scale
        if settings.method == "one_euro":
            flat = coords.reshape(len(seq), -1)
            valid = np.repeat(~missing, 3, axis=1)
            smoothed = one_euro_zero_lag(
                flat, valid, seq.fps, settings.min_cutoff, settings.beta, settings.d_cutoff
            ).reshape(coords.shape)
        else:
            smoothed = savgol_runs(coords, ~missing, settings.window, settings.polyorder)
        landmarks[..., :3] = smoothed * scale
    landmarks[missing] = np.nan
    return seq.replace(landmarks.astype(np.float32))
