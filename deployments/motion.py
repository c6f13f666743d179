"""Motion stage: motion styles (smooth, exaggerate, mirror, stabilize, retime) on pose sequences.

Pure numpy/scipy on `PoseSequence`s (landmarks in pixels). Styles are small pydantic models with a
`name` discriminator, composed in order by `MotionEditor`; their canonical JSON is part of the
motion artifact's cache key. Missing landmarks are NaN throughout; no style invents a joint,
except smoothing's gap filling (`deployments.smoothing`), which interpolates short gaps only.
Pose-map rendering for ControlNet lives in `deployments.pose_maps`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)
from scipy.signal import savgol_filter

from deployments.errors import InvalidPoseDataError, InvalidSettingError
from deployments.pose import LANDMARK_INDEX, MEDIAPIPE_LANDMARK_NAMES, PoseSequence
from deployments.smoothing import SmoothingSettings, smooth_sequence

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

    def edited_frame_count(self, frames: int) -> int:
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
