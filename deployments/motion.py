"""Motion stage: smoothing with gap filling, motion styles, and ControlNet pose-map rendering.

Pure numpy/scipy on `PoseSequence`s (landmarks in pixels). Styles are small pydantic models with a
`name` discriminator, composed in order by `MotionEditor`; their canonical JSON is part of the
motion artifact's cache key. Missing landmarks are NaN throughout; no style invents a joint,
except gap filling, which interpolates short gaps only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from scipy.interpolate import PchipInterpolator
from scipy.signal import savgol_filter

from deployments.errors import InvalidPoseDataError, InvalidSettingError
from deployments.pose import LANDMARK_INDEX, MEDIAPIPE_LANDMARK_NAMES, PoseSequence

# Bump when an edit of the same poses with the same styles would give different landmarks.
MOTION_CODE_VERSION = "motion-1"
MAX_STYLES = 16
# Bounds the frames a combination of retime styles can create (and the GPU work that follows).
MAX_TOTAL_SLOWDOWN = 10.0

_LEFT_HIP, _RIGHT_HIP = LANDMARK_INDEX["left_hip"], LANDMARK_INDEX["right_hip"]
_LEFT_SHOULDER, _RIGHT_SHOULDER = LANDMARK_INDEX["left_shoulder"], LANDMARK_INDEX["right_shoulder"]


def _mirror_name(name: str) -> str:
    if "left" in name:
        return name.replace("left", "right")
    return name.replace("right", "left")


# landmarks[:, MIRROR_PERMUTATION] swaps every left landmark with its right counterpart.
MIRROR_PERMUTATION = np.array(
    [LANDMARK_INDEX[_mirror_name(name)] for name in MEDIAPIPE_LANDMARK_NAMES], dtype=np.intp
)


# --------------------------------------------------------------------------------------------
# Smoothing and gap filling
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Geometry helpers shared by the styles
# --------------------------------------------------------------------------------------------


def _midpoint_track(landmarks: np.ndarray, a: int, b: int) -> np.ndarray:
    return (landmarks[:, a, :3] + landmarks[:, b, :3]) / 2


def root_trajectory(landmarks: np.ndarray) -> np.ndarray:
    """(T, 3) root position per frame: the mid-hip, else the mid-shoulder, else 0.

    Frames where it is missing are interpolated in time (held constant before the first and
    after the last known frame), so a short occlusion of the hips does not lose the frame.
    """
    frames = landmarks.shape[0]
    for a, b in ((_LEFT_HIP, _RIGHT_HIP), (_LEFT_SHOULDER, _RIGHT_SHOULDER)):
        track = _midpoint_track(landmarks, a, b)
        known = np.isfinite(track[:, :2]).all(axis=1)
        if known.any():
            times = np.arange(frames)
            track = np.nan_to_num(track, nan=0.0)  # z may be NaN where x, y are known
            return np.stack(
                [np.interp(times, times[known], track[known, c]) for c in range(3)], axis=1
            )
    return np.zeros((frames, 3))


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    # np.nanmean warns on all-NaN slices; a never-seen joint simply stays NaN.
    finite = np.isfinite(values)
    count = finite.sum(axis=axis)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def retime_source_times(frames: int, speed: float) -> np.ndarray:
    """Source time (in frames) of each output frame when playing `frames` frames at `speed`.

    Output frame k shows source time k * speed; there are round(frames / speed) of them. Other
    stages (e.g. audio or background frames) can use this to follow the same mapping.
    """
    if frames == 0:
        return np.zeros(0)
    count = max(1, math.floor(frames / speed + 0.5))
    return np.minimum(np.arange(count) * speed, frames - 1)


# --------------------------------------------------------------------------------------------
# Styles
# --------------------------------------------------------------------------------------------


class _Style(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # The parameter `name=value` sets; None for styles without parameters.
    main_parameter: ClassVar[str | None] = None
    summary: ClassVar[str] = ""

    def apply(self, seq: PoseSequence) -> PoseSequence:
        raise NotImplementedError


class SmoothStyle(_Style, SmoothingSettings):
    name: Literal["smooth"] = Field(default="smooth", description="Style name.")

    main_parameter: ClassVar[str | None] = "method"
    summary: ClassVar[str] = "smooth jitter and fill short gaps"

    def apply(self, seq: PoseSequence) -> PoseSequence:
        return smooth_sequence(seq, self)


class ExaggerateStyle(_Style):
    name: Literal["exaggerate"] = Field(default="exaggerate", description="Style name.")
    amount: float = Field(
        default=1.5,
        gt=0,
        le=5,
        description="Scale of each joint's motion around its mean pose, relative to the root "
        "(mid-hip): 1 keeps the motion, 2 doubles it, 0.5 halves it.",
    )

    main_parameter: ClassVar[str | None] = "amount"
    summary: ClassVar[str] = "scale the motion around the mean pose"

    def apply(self, seq: PoseSequence) -> PoseSequence:
        landmarks = seq.landmarks.astype(np.float64)
        root = root_trajectory(landmarks)[:, None, :]
        relative = landmarks[..., :3] - root
        mean_pose = _nanmean(relative, axis=0)
        landmarks[..., :3] = root + mean_pose + self.amount * (relative - mean_pose)
        return seq.replace(landmarks.astype(np.float32), seq.present)


class MirrorStyle(_Style):
    name: Literal["mirror"] = Field(default="mirror", description="Style name.")

    summary: ClassVar[str] = "flip horizontally, left limbs stay left"

    def apply(self, seq: PoseSequence) -> PoseSequence:
        landmarks = seq.landmarks[:, MIRROR_PERMUTATION].astype(np.float64)
        landmarks[..., 0] = seq.width - landmarks[..., 0]
        return seq.replace(landmarks.astype(np.float32), seq.present)


class StabilizeStyle(_Style):
    name: Literal["stabilize"] = Field(default="stabilize", description="Style name.")
    window_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Root (mid-hip) motion slower than this window, in seconds, counts as drift "
        "and is removed from every joint; faster motion (steps, jumps) stays.",
    )

    main_parameter: ClassVar[str | None] = "window_s"
    summary: ClassVar[str] = "remove slow drift of the body (keeps the mean position)"

    def apply(self, seq: PoseSequence) -> PoseSequence:
        frames = len(seq)
        if frames < 2 or seq.fps <= 0:
            return seq
        root = root_trajectory(seq.landmarks.astype(np.float64))[:, :2]
        window = max(3, int(round(self.window_s * seq.fps)) | 1)
        if window >= frames:
            times = np.arange(frames)
            design = np.stack([np.ones(frames), times], axis=1)
            coefficients, *_ = np.linalg.lstsq(design, root, rcond=None)
            low = design @ coefficients
        else:
            # A first-order Savitzky-Golay fit is a moving average inside and a line fit at
            # the ends, so a linear drift is removed exactly, edges included.
            low = savgol_filter(root, window, 1, axis=0, mode="interp")
        drift = low - low.mean(axis=0)
        landmarks = seq.landmarks.astype(np.float64)
        landmarks[..., :2] -= drift[:, None, :]
        return seq.replace(landmarks.astype(np.float32), seq.present)


class RetimeStyle(_Style):
    name: Literal["retime"] = Field(default="retime", description="Style name.")
    speed: float = Field(
        ge=0.1,
        le=10,
        description="Playback speed: 2 plays twice as fast (half the frames), 0.5 in slow motion "
        "(twice the frames, interpolated). The fps stays the same.",
    )

    main_parameter: ClassVar[str | None] = "speed"
    summary: ClassVar[str] = "change the playback speed"

    def apply(self, seq: PoseSequence) -> PoseSequence:
        if len(seq) == 0:
            return seq
        source = retime_source_times(len(seq), self.speed)
        before = np.floor(source).astype(np.intp)
        after = np.minimum(before + 1, len(seq) - 1)
        weight = (source - before)[:, None, None]
        landmarks = seq.landmarks.astype(np.float64)
        blended = landmarks[before] * (1 - weight) + landmarks[after] * weight
        # On exact source frames take the frame itself, so a missing neighbour cannot leak in.
        landmarks = np.where(weight == 0, landmarks[before], blended)
        return seq.replace(landmarks.astype(np.float32))


MotionStyle = Annotated[
    SmoothStyle | ExaggerateStyle | MirrorStyle | StabilizeStyle | RetimeStyle,
    Field(discriminator="name"),
]
_STYLE_CLASSES: dict[str, type[_Style]] = {
    cls.model_fields["name"].default: cls
    for cls in (SmoothStyle, ExaggerateStyle, MirrorStyle, StabilizeStyle, RetimeStyle)
}
_STYLE_ADAPTER: TypeAdapter = TypeAdapter(MotionStyle)


def style_help() -> str:
    """One line per style: its syntax and what it does (for error messages and --help)."""
    lines = []
    for name, cls in _STYLE_CLASSES.items():
        syntax = f"{name}={cls.main_parameter.upper()}" if cls.main_parameter else name
        lines.append(f"{syntax}: {cls.summary}")
    return "; ".join(lines)


def _unknown_style(name: str) -> InvalidSettingError:
    return InvalidSettingError(
        f"unknown motion style {name!r}; valid styles: {', '.join(_STYLE_CLASSES)} ({style_help()})"
    )


def _validation_message(name: str, exc: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or name}: {err['msg']}" for err in exc.errors()
    )
    parameters = [f for f in _STYLE_CLASSES[name].model_fields if f != "name"]
    accepted = ", ".join(parameters) if parameters else "none"
    return f"invalid motion style {name!r}: {problems} (parameters: {accepted})"


def _build_style(name: str, params: Mapping[str, Any]) -> MotionStyle:
    if name not in _STYLE_CLASSES:
        raise _unknown_style(name)
    try:
        return _STYLE_ADAPTER.validate_python({**params, "name": name})
    except ValidationError as exc:
        raise InvalidSettingError(_validation_message(name, exc)) from exc


def parse_style(text: str) -> MotionStyle:
    """Parse `name`, `name=value` (the style's main parameter) or `name:key=value,key=value`.

    Examples: "smooth", "smooth=savgol", "smooth:method=savgol,window=9", "exaggerate=1.3",
    "mirror", "stabilize=2", "retime=0.5".
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidSettingError(f"empty motion style; valid styles: {', '.join(_STYLE_CLASSES)}")
    text = text.strip()
    colon, equals = text.find(":"), text.find("=")
    if colon >= 0 and (equals < 0 or colon < equals):
        name, _, rest = text.partition(":")
        params = _parse_key_values(name.strip().lower(), rest)
    elif equals >= 0:
        name, _, value = text.partition("=")
        name = name.strip().lower()
        if name not in _STYLE_CLASSES:
            raise _unknown_style(name)
        main = _STYLE_CLASSES[name].main_parameter
        if main is None:
            raise InvalidSettingError(f"motion style {name!r} takes no value (write just {name})")
        params = {main: value.strip()}
    else:
        name, params = text, {}
    return _build_style(name.strip().lower(), params)


def _parse_key_values(name: str, text: str) -> dict[str, str]:
    if name not in _STYLE_CLASSES:
        raise _unknown_style(name)
    params = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidSettingError(
                f"motion style {name!r}: expected key=value pairs separated by commas, got {item!r}"
            )
        params[key.strip()] = value.strip()
    return params


def parse_styles(items: Sequence[str | Mapping[str, Any] | BaseModel]) -> list[MotionStyle]:
    """Styles from strings (see `parse_style`), dicts ({"name": ..., params}) or style models."""
    if isinstance(items, str | bytes):
        items = [items]
    if len(items) > MAX_STYLES:
        raise InvalidSettingError(f"at most {MAX_STYLES} motion styles, got {len(items)}")
    styles = []
    for item in items:
        if isinstance(item, _Style):
            styles.append(item)
        elif isinstance(item, str):
            styles.append(parse_style(item))
        elif isinstance(item, Mapping):
            name = item.get("name")
            if not isinstance(name, str):
                raise _unknown_style(str(name))
            styles.append(_build_style(name, {k: v for k, v in item.items() if k != "name"}))
        else:
            raise InvalidSettingError(f"a motion style must be a string or an object, got {item!r}")
    return styles


def canonical_styles_json(styles: Sequence[MotionStyle]) -> str:
    """Canonical JSON of a style list: equal edits give equal strings (all defaults spelled out)."""
    return json.dumps(
        [style.model_dump(mode="json") for style in styles], sort_keys=True, separators=(",", ":")
    )


class MotionEditor:
    """Applies a list of motion styles, in order, to a `PoseSequence`."""

    def __init__(self, styles: Sequence[str | Mapping[str, Any] | BaseModel] = ()):
        self.styles: tuple[MotionStyle, ...] = tuple(parse_styles(styles))
        slowdown = math.prod(
            1.0 / style.speed for style in self.styles if isinstance(style, RetimeStyle)
        )
        if slowdown > MAX_TOTAL_SLOWDOWN:
            raise InvalidSettingError(
                f"the retime styles together slow the motion {slowdown:g}x; at most "
                f"{MAX_TOTAL_SLOWDOWN:g}x is allowed"
            )

    def edit(self, seq: PoseSequence) -> PoseSequence:
        if seq.fps <= 0 and len(seq) > 1:
            raise InvalidPoseDataError(
                "pose data without a frame rate (fps 0, still images) cannot be edited as motion"
            )
        for style in self.styles:
            seq = style.apply(seq)
        return seq

    def output_frame_count(self, frames: int) -> int:
        """Frames `edit` returns for `frames` input frames (only retime changes the count)."""
        for style in self.styles:
            if isinstance(style, RetimeStyle) and frames:
                frames = len(retime_source_times(frames, style.speed))
        return frames

    def styles_json(self) -> str:
        return canonical_styles_json(self.styles)

    def settings_key(self) -> str:
        """Canonical JSON of the code version and the style list, for cache keys."""
        return json.dumps(
            {"code": MOTION_CODE_VERSION, "styles": json.loads(self.styles_json())},
            sort_keys=True,
            separators=(",", ":"),
        )


# --------------------------------------------------------------------------------------------
# Pose maps for ControlNet (OpenPose convention of control_v11p_sd15_openpose)
# --------------------------------------------------------------------------------------------

OPENPOSE18_NAMES: tuple[str, ...] = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)
# OpenPose's colour per keypoint; limb i is drawn in colour i too.
OPENPOSE_COLORS = np.array(
    [
        [255, 0, 0],
        [255, 85, 0],
        [255, 170, 0],
        [255, 255, 0],
        [170, 255, 0],
        [85, 255, 0],
        [0, 255, 0],
        [0, 255, 85],
        [0, 255, 170],
        [0, 255, 255],
        [0, 170, 255],
        [0, 85, 255],
        [0, 0, 255],
        [85, 0, 255],
        [170, 0, 255],
        [255, 0, 255],
        [255, 0, 170],
        [255, 0, 85],
    ],
    dtype=np.uint8,
)
# The 17 limbs drawn, as pairs of OPENPOSE18_NAMES indices, in drawing (and colour) order.
OPENPOSE_LIMBS = np.array(
    [
        (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
        (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
    ],
    dtype=np.intp,
)  # fmt: skip
_NECK = 1
_OPENPOSE_FROM_MEDIAPIPE = np.array(
    [LANDMARK_INDEX[name] if name != "neck" else 0 for name in OPENPOSE18_NAMES], dtype=np.intp
)
# Limbs are drawn opaque and the whole limb layer is then dimmed to 60%, joints drawn on top.
_LIMB_DIMMING = (np.arange(256) * 0.6).astype(np.uint8)
_SUBPIXEL_BITS = 4
_ELLIPSE_POINTS = 36


def openpose18_keypoints(landmarks: np.ndarray, min_visibility: float = 0.0) -> np.ndarray:
    """(T, 18, 2) OpenPose body keypoints from MediaPipe landmarks; NaN where missing.

    The neck is the midpoint of the shoulders and exists only when both shoulders do.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    points = landmarks[:, _OPENPOSE_FROM_MEDIAPIPE, :2].copy()
    visibility = landmarks[:, _OPENPOSE_FROM_MEDIAPIPE, 3].copy()
    shoulders = landmarks[:, [_LEFT_SHOULDER, _RIGHT_SHOULDER]]
    points[:, _NECK] = shoulders[..., :2].mean(axis=1)
    visibility[:, _NECK] = shoulders[..., 3].min(axis=1)
    with np.errstate(invalid="ignore"):
        hidden = ~(visibility >= min_visibility) | ~np.isfinite(points).all(axis=-1)
    points[hidden] = np.nan
    return points


def _limb_polygons(keypoints: np.ndarray, stick_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Ellipse polygons (T, 17, P, 2) in fixed point, and (T, 17) which limbs can be drawn."""
    start = keypoints[:, OPENPOSE_LIMBS[:, 0]]
    end = keypoints[:, OPENPOSE_LIMBS[:, 1]]
    centre = (start + end) / 2
    delta = end - start
    half_length = np.hypot(delta[..., 0], delta[..., 1]) / 2
    angle = np.arctan2(delta[..., 1], delta[..., 0])
    theta = np.linspace(0, 2 * np.pi, _ELLIPSE_POINTS, endpoint=False)
    local_x = half_length[..., None] * np.cos(theta)
    local_y = stick_width * np.sin(theta)
    cos, sin = np.cos(angle)[..., None], np.sin(angle)[..., None]
    x = centre[..., 0:1] + local_x * cos - local_y * sin
    y = centre[..., 1:2] + local_x * sin + local_y * cos
    drawable = np.isfinite(start).all(axis=-1) & np.isfinite(end).all(axis=-1)
    polygons = np.stack([x, y], axis=-1)
    polygons = np.where(drawable[..., None, None], polygons, 0.0)
    return np.round(polygons * (1 << _SUBPIXEL_BITS)).astype(np.int32), drawable


def render_pose_maps(
    pose: PoseSequence | np.ndarray,
    width: int,
    height: int,
    frames: slice | None = None,
    *,
    source_size: tuple[int, int] | None = None,
    min_visibility: float = 0.0,
    stick_width: int = 4,
    joint_radius: int = 4,
) -> np.ndarray:
    """OpenPose-style pose maps (N, height, width, 3) uint8 RGB for ControlNet.

    `pose` is a PoseSequence or a landmarks array (T, 33, 4) in pixels of `source_size`
    (default: the render size). Coordinates are scaled to `width` x `height`. Missing joints,
    and limbs touching them, are not drawn; `smooth` has already made low-visibility joints
    missing, `min_visibility` can hide more.
    """
    if isinstance(pose, PoseSequence):
        landmarks, source = pose.landmarks, (pose.width, pose.height)
    else:
        landmarks, source = np.asarray(pose), source_size or (width, height)
    if frames is not None:
        landmarks = landmarks[frames]
    keypoints = openpose18_keypoints(landmarks, min_visibility)
    keypoints *= np.array([width / source[0], height / source[1]])
    polygons, drawable = _limb_polygons(keypoints, stick_width)
    joints_visible = np.isfinite(keypoints).all(axis=-1)
    joints = np.round(np.nan_to_num(keypoints) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    limb_colors = [tuple(int(c) for c in color) for color in OPENPOSE_COLORS]

    maps = np.zeros((len(keypoints), height, width, 3), dtype=np.uint8)
    for i, canvas in enumerate(maps):
        for limb in np.nonzero(drawable[i])[0]:
            cv2.fillConvexPoly(canvas, polygons[i, limb], limb_colors[limb], shift=_SUBPIXEL_BITS)
        canvas[:] = _LIMB_DIMMING[canvas]
        for joint in np.nonzero(joints_visible[i])[0]:
            center = (int(joints[i, joint, 0]), int(joints[i, joint, 1]))
            cv2.circle(
                canvas,
                center,
                joint_radius << _SUBPIXEL_BITS,
                limb_colors[joint],
                thickness=-1,
                shift=_SUBPIXEL_BITS,
            )
    return maps
