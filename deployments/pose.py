"""Pose stage: MediaPipe Pose (legacy solutions API) on RGB frames -> `PoseSequence`.

Landmarks are kept in pixels of the frames given, so later stages (motion editing, pose-map
rendering) never need to know MediaPipe's normalised conventions. A frame without a person is
kept (present=False, NaN landmarks) rather than dropped, so frame indices always line up with the
video.

Only models inside the mediapipe wheel are used: the solutions API would otherwise download the
lite/heavy models from Google Cloud Storage on first use, which a cluster node cannot rely on.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.errors import InvalidPoseDataError, InvalidSettingError
from deployments.stopping import ShouldStop, until_stopped

# Bump when anything that changes the landmarks for the same frames and settings changes.
POSE_CODE_VERSION = "pose-1"
POSE_JSON_FORMAT = "motionserve.pose/v1"
NUM_LANDMARKS = 33

MEDIAPIPE_LANDMARK_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye_inner",
    "left_eye",
    "left_eye_outer",
    "right_eye_inner",
    "right_eye",
    "right_eye_outer",
    "left_ear",
    "right_ear",
    "mouth_left",
    "mouth_right",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_pinky",
    "right_pinky",
    "left_index",
    "right_index",
    "left_thumb",
    "right_thumb",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
    "left_heel",
    "right_heel",
    "left_foot_index",
    "right_foot_index",
)
LANDMARK_INDEX = {name: i for i, name in enumerate(MEDIAPIPE_LANDMARK_NAMES)}

COCO17_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
# Every COCO-17 keypoint has a MediaPipe landmark of the same name (eyes are the eye centres).
MEDIAPIPE_TO_COCO17 = np.array([LANDMARK_INDEX[name] for name in COCO17_NAMES], dtype=np.intp)

# Model files per model_complexity, relative to the mediapipe package directory.
_POSE_MODEL_FILES = {
    0: "modules/pose_landmark/pose_landmark_lite.tflite",
    1: "modules/pose_landmark/pose_landmark_full.tflite",
    2: "modules/pose_landmark/pose_landmark_heavy.tflite",
}
_JSON_DECIMALS = 3  # 1/1000 px; the npz form (`to_bytes`) is the exact one


def _mediapipe_dir() -> Path:
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("mediapipe is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_model_complexities() -> tuple[int, ...]:
    """Model complexities whose landmark model is present in the installed mediapipe package."""
    root = _mediapipe_dir()
    return tuple(c for c, rel in _POSE_MODEL_FILES.items() if (root / rel).is_file())


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


class PoseSettings(BaseModel):
    """How MediaPipe Pose runs. Part of the pose artifact's cache key (see `settings_key`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # mediapipe 0.10.21 ships only the "full" landmark model (complexity 1); lite (0) and heavy
    # (2) are downloaded on first use, which we never allow. Complexity 1 runs at ~75 frames/s on
    # one core at 512 px in tracking mode (benchmarks/pose_speed.py), far above the 25 frames/s
    # target, so it is the default.
    model_complexity: int = Field(
        default=1,
        ge=0,
        le=2,
        description="Pose landmark model: 0 lite, 1 full, 2 heavy. Only models bundled in the "
        "mediapipe wheel are accepted (0.10.21 bundles only 1); others are never downloaded.",
    )
    min_detection_confidence: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Minimum person-detector score for a detection to count.",
    )
    min_tracking_confidence: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Minimum landmark-model score to keep tracking from the previous frame "
        "instead of running the person detector again (tracking mode only).",
    )
    tracking: bool = Field(
        default=True,
        description="Treat frames as one video and track the person across them (much faster: "
        "the detector runs only when tracking is lost). False runs every frame independently.",
    )
    smooth_landmarks: bool = Field(
        default=False,
        description="MediaPipe's own temporal landmark filter. Off by default because the "
        "motion stage smooths (with gap filling) and double filtering adds lag.",
    )

    version: ClassVar[str] = POSE_CODE_VERSION

    @field_validator("model_complexity")
    @classmethod
    def _model_must_be_bundled(cls, value: int) -> int:
        bundled = bundled_model_complexities()
        if value not in bundled:
            raise InvalidSettingError(
                f"pose model_complexity {value} needs a model that is not bundled with the "
                f"installed mediapipe and would have to be downloaded; available: "
                f"{', '.join(map(str, bundled)) or 'none'}"
            )
        return value

    def settings_key(self) -> str:
        """Canonical JSON of everything that determines the landmarks, for cache keys."""
        payload = {
            "code": POSE_CODE_VERSION,
            "mediapipe": importlib.metadata.version("mediapipe"),
            **self.model_dump(),
        }
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# PoseSequence
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PoseSequence:
    """One person's pose per frame, in pixels of a `width` x `height` frame.

    `landmarks[t, j] = (x, y, z, visibility)`: x, y in pixels; z is MediaPipe's depth relative
    to the hips, scaled like x (pixels); NaN where the landmark is missing. `present[t]` says
    whether frame t has a person. `fps` is 0 for still images.
    """

    landmarks: np.ndarray
    present: np.ndarray
    width: int
    height: int
    fps: float

    def __post_init__(self) -> None:
        landmarks = np.asarray(self.landmarks, dtype=np.float32)
        present = np.asarray(self.present)
        if landmarks.ndim != 3 or landmarks.shape[1:] != (NUM_LANDMARKS, 4):
            raise InvalidPoseDataError(
                f"landmarks must have shape (frames, {NUM_LANDMARKS}, 4), got {landmarks.shape}"
            )
        if present.dtype != np.bool_ or present.shape != landmarks.shape[:1]:
            raise InvalidPoseDataError(
                f"present must be a bool array of shape ({landmarks.shape[0]},), "
                f"got {present.dtype} {present.shape}"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
                raise InvalidPoseDataError(f"{name} must be a positive integer, got {value!r}")
        if not _is_number(self.fps) or not math.isfinite(self.fps) or self.fps < 0:
            raise InvalidPoseDataError(f"fps must be a number >= 0, got {self.fps!r}")
        object.__setattr__(self, "landmarks", landmarks)
        object.__setattr__(self, "present", present)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "fps", float(self.fps))

    def __len__(self) -> int:
        return self.landmarks.shape[0]

    @classmethod
    def empty(cls, width: int, height: int, fps: float, frames: int = 0) -> PoseSequence:
        """A sequence of `frames` frames without a person."""
        landmarks = np.full((frames, NUM_LANDMARKS, 4), np.nan, dtype=np.float32)
        return cls(landmarks, np.zeros(frames, dtype=bool), width, height, fps)

    def replace(self, landmarks: np.ndarray, present: np.ndarray | None = None) -> PoseSequence:
        """Same size and fps with new landmarks; `present` defaults to "any landmark finite"."""
        if present is None:
            present = np.isfinite(landmarks[..., :2]).all(axis=-1).any(axis=-1)
        return PoseSequence(landmarks, present, self.width, self.height, self.fps)

    @classmethod
    def concatenate(cls, parts: Sequence[PoseSequence]) -> PoseSequence:
        """Join consecutive chunks of one video (same size and fps)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for part in parts[1:]:
            if (part.width, part.height, part.fps) != (first.width, first.height, first.fps):
                raise InvalidPoseDataError("pose chunks differ in frame size or fps")
        return cls(
            np.concatenate([p.landmarks for p in parts]),
            np.concatenate([p.present for p in parts]),
            first.width,
            first.height,
            first.fps,
        )

    def to_coco17(self) -> np.ndarray:
        """(frames, 17, 3) float32 of x, y (pixels), score (visibility) in `COCO17_NAMES` order."""
        return self.landmarks[:, MEDIAPIPE_TO_COCO17][..., [0, 1, 3]]

    # -- JSON (the `motionserve pose -o poses.json` format) --------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        """The `motionserve.pose/v1` JSON document; missing values are null."""
        rounded = np.round(self.landmarks.astype(np.float64), _JSON_DECIMALS)
        frames = [
            _frame_to_json(index, bool(present), rows)
            for index, (present, rows) in enumerate(zip(self.present, rounded, strict=True))
        ]
        return {
            "format": POSE_JSON_FORMAT,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "frames": frames,
        }

    @classmethod
    def from_json_dict(cls, doc: Any) -> PoseSequence:
        """Parse a `motionserve.pose/v1` document; raises InvalidPoseDataError when malformed.

        Frames that carry only COCO-17 `keypoints` (no `landmarks`, e.g. from another tool) are
        accepted: the 17 mapped landmarks are filled, z is 0 and the rest stay missing.
        """
        if not isinstance(doc, Mapping):
            raise InvalidPoseDataError("pose data must be a JSON object")
        if doc.get("format") != POSE_JSON_FORMAT:
            raise InvalidPoseDataError(
                f'pose data must have "format": "{POSE_JSON_FORMAT}", got {doc.get("format")!r}'
            )
        width = _require_positive_int(doc, "width")
        height = _require_positive_int(doc, "height")
        fps = doc.get("fps")
        if not _is_number(fps) or not math.isfinite(fps) or fps < 0:
            raise InvalidPoseDataError(f'pose data "fps" must be a number >= 0, got {fps!r}')
        frames = doc.get("frames")
        if not isinstance(frames, list):
            raise InvalidPoseDataError('pose data "frames" must be a list')
        landmarks = np.full((len(frames), NUM_LANDMARKS, 4), np.nan, dtype=np.float32)
        present = np.zeros(len(frames), dtype=bool)
        for index, frame in enumerate(frames):
            present[index] = _frame_from_json(index, frame, landmarks[index])
        return cls(landmarks, present, width, height, fps)

    # -- compact binary (the artifact cache) -----------------------------------------------

    def to_bytes(self) -> bytes:
        """Exact, compressed npz bytes."""
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            format=np.array(POSE_JSON_FORMAT),
            landmarks=self.landmarks,
            present=self.present,
            size=np.array([self.width, self.height], dtype=np.int64),
            fps=np.array(self.fps, dtype=np.float64),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PoseSequence:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                if str(npz["format"]) != POSE_JSON_FORMAT:
                    raise InvalidPoseDataError("pose bytes are of an unknown format")
                width, height = (int(v) for v in npz["size"])
                return cls(npz["landmarks"], npz["present"], width, height, float(npz["fps"]))
        except InvalidPoseDataError:
            raise
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise InvalidPoseDataError(f"pose bytes cannot be read: {exc}") from exc


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _require_positive_int(doc: Mapping, key: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidPoseDataError(f'pose data "{key}" must be a positive integer, got {value!r}')
    return value


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


def _frame_to_json(index: int, present: bool, rows: np.ndarray) -> dict[str, Any]:
    if not present:
        return {"index": index, "present": False, "keypoints": {}, "landmarks": []}
    keypoints = {}
    for name, landmark in zip(COCO17_NAMES, MEDIAPIPE_TO_COCO17, strict=True):
        x, y, _, score = rows[landmark].tolist()
        keypoints[name] = {"x": _json_number(x), "y": _json_number(y), "score": _json_number(score)}
    landmarks = [[_json_number(v) for v in row] for row in rows.tolist()]
    return {"index": index, "present": True, "keypoints": keypoints, "landmarks": landmarks}


def _frame_from_json(index: int, frame: Any, out: np.ndarray) -> bool:
    """Fill `out` (33, 4) from one JSON frame; returns whether the frame has a person."""
    where = f"frame {index}"
    if not isinstance(frame, Mapping):
        raise InvalidPoseDataError(f"{where} must be an object")
    if frame.get("index") != index or isinstance(frame.get("index"), bool):
        raise InvalidPoseDataError(
            f'{where} has "index" {frame.get("index")!r}; frames must be numbered 0, 1, 2, ...'
        )
    present = frame.get("present")
    if not isinstance(present, bool):
        raise InvalidPoseDataError(f'{where}: "present" must be true or false')
    keypoints = frame.get("keypoints", {})
    landmarks = frame.get("landmarks", [])
    if not isinstance(keypoints, Mapping) or not isinstance(landmarks, list):
        raise InvalidPoseDataError(f'{where}: "keypoints" must be an object, "landmarks" a list')
    if not present:
        if keypoints or landmarks:
            raise InvalidPoseDataError(f"{where} is not present but has keypoints or landmarks")
        return False
    if landmarks:
        _landmarks_from_json(where, landmarks, out)
    elif keypoints:
        _keypoints_from_json(where, keypoints, out)
    else:
        raise InvalidPoseDataError(f"{where} is present but has neither landmarks nor keypoints")
    return True


def _value(where: str, value: Any) -> float:
    if value is None:
        return math.nan
    if not _is_number(value) or not math.isfinite(value):
        raise InvalidPoseDataError(f"{where} must be a finite number or null, got {value!r}")
    return float(value)


def _landmarks_from_json(where: str, landmarks: list, out: np.ndarray) -> None:
    if len(landmarks) != NUM_LANDMARKS:
        raise InvalidPoseDataError(
            f'{where}: "landmarks" must hold {NUM_LANDMARKS} rows, got {len(landmarks)}'
        )
    for j, row in enumerate(landmarks):
        if not isinstance(row, list) or len(row) != 4:
            raise InvalidPoseDataError(f"{where}: landmark {j} must be [x, y, z, visibility]")
        out[j] = [_value(f"{where} landmark {j}", v) for v in row]


def _keypoints_from_json(where: str, keypoints: Mapping, out: np.ndarray) -> None:
    unknown = set(keypoints) - set(COCO17_NAMES)
    if unknown:
        raise InvalidPoseDataError(
            f"{where}: unknown keypoints {sorted(unknown)}; valid: {', '.join(COCO17_NAMES)}"
        )
    for name, point in keypoints.items():
        if not isinstance(point, Mapping):
            raise InvalidPoseDataError(f"{where}: keypoint {name} must be {{x, y, score}}")
        x, y, score = (
            _value(f"{where} keypoint {name}", point.get(k)) for k in "x,y,score".split(",")
        )
        # Depth is unknown for COCO-only data: 0 is the hips' plane in MediaPipe's convention.
        out[LANDMARK_INDEX[name]] = [x, y, 0.0 if math.isfinite(x) else math.nan, score]


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


class PoseExtractor:
    """Runs MediaPipe Pose; one instance per worker, `extract` chunk by chunk, `reset` per video.

    The MediaPipe graphs are created on first use. In tracking mode consecutive `extract` calls
    continue one video (the tracker keeps its state across chunks); call `reset()` before the
    next video. Not thread-safe: one graph processes one frame at a time.
    """

    def __init__(self, settings: PoseSettings | None = None):
        self.settings = settings or PoseSettings()
        self._video_pose = None  # mediapipe Pose for videos (tracking or not, per settings)
        self._image_pose = None  # mediapipe Pose in static mode, for unrelated still images
        self._video_size: tuple[int, int] | None = None

    def __enter__(self) -> PoseExtractor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _new_pose(self, static: bool):
        # Checked again here (not only by the settings validator) because constructing
        # mediapipe's Pose with a missing model file would start a download.
        if self.settings.model_complexity not in bundled_model_complexities():
            raise InvalidSettingError(
                f"pose model_complexity {self.settings.model_complexity} is not bundled"
            )
        # MediaPipe's C++ side logs every graph start to stderr; keep only errors.
        os.environ.setdefault("GLOG_minloglevel", "2")
        from mediapipe.python.solutions.pose import Pose

        return Pose(
            static_image_mode=static,
            model_complexity=self.settings.model_complexity,
            smooth_landmarks=self.settings.smooth_landmarks,
            enable_segmentation=False,
            min_detection_confidence=self.settings.min_detection_confidence,
            min_tracking_confidence=self.settings.min_tracking_confidence,
        )

    def extract(
        self, frames: np.ndarray, fps: float, should_stop: ShouldStop | None = None
    ) -> PoseSequence:
        """Pose of each frame of `frames` (N, H, W, 3) uint8 RGB, the next chunk of the video.

        `should_stop` is asked before each frame (a MediaPipe graph runs one frame at a time):
        once it answers True, `Stopped` is raised and the tracker's state is stale (`reset()`).
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}"
            )
        height, width = frames.shape[1:3]
        if self._video_size not in (None, (width, height)):
            raise ValueError(
                f"frame size changed from {self._video_size} to {(width, height)} within a "
                "video; call reset() between videos"
            )
        self._video_size = (width, height)
        if self._video_pose is None:
            self._video_pose = self._new_pose(static=not self.settings.tracking)
        landmarks = np.full((len(frames), NUM_LANDMARKS, 4), np.nan, dtype=np.float32)
        present = np.zeros(len(frames), dtype=bool)
        for i, frame in enumerate(until_stopped(frames, should_stop, "pose extraction")):
            present[i] = self._process(self._video_pose, frame, landmarks[i])
        return PoseSequence(landmarks, present, width, height, fps)

    def extract_images(self, images: Sequence[np.ndarray]) -> list[PoseSequence]:
        """Pose of unrelated still images of any sizes: one 1-frame sequence (fps 0) per image.

        Accepts RGB (H, W, 3), RGBA (H, W, 4, alpha ignored) or grey (H, W) uint8 images.
        """
        if self._image_pose is None:
            self._image_pose = self._new_pose(static=True)
        results = []
        for image in images:
            rgb = _as_rgb(np.asarray(image))
            height, width = rgb.shape[:2]
            landmarks = np.full((1, NUM_LANDMARKS, 4), np.nan, dtype=np.float32)
            present = np.array([self._process(self._image_pose, rgb, landmarks[0])])
            results.append(PoseSequence(landmarks, present, width, height, 0.0))
        return results

    @staticmethod
    def _process(pose, frame: np.ndarray, out: np.ndarray) -> bool:
        """Run one frame; writes pixel landmarks into `out` (33, 4); returns person found."""
        result = pose.process(np.ascontiguousarray(frame))
        if result.pose_landmarks is None:
            return False
        height, width = frame.shape[:2]
        out[:] = [(p.x, p.y, p.z, p.visibility) for p in result.pose_landmarks.landmark]
        # MediaPipe's z uses "roughly the same scale as x", so it scales with the width.
        out[:, :3] *= np.array([width, height, width], dtype=np.float32)
        return True

    def reset(self) -> None:
        """Forget the tracked person: the next `extract` starts a new video."""
        if self._video_pose is not None:
            self._video_pose.reset()
        self._video_size = None

    def close(self) -> None:
        """Release the MediaPipe graphs (they are recreated if the extractor is used again)."""
        for pose in (self._video_pose, self._image_pose):
            if pose is not None:
                pose.close()
        self._video_pose = self._image_pose = None
        self._video_size = None


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[:, :, :3]
    raise ValueError(f"images must be (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
