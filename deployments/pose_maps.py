"""Pose maps for ControlNet: MediaPipe landmarks drawn in the OpenPose convention of
control_v11p_sd15_openpose (18 keypoints, 17 coloured limbs), with OpenCV."""

from __future__ import annotations

import cv2
import numpy as np

from deployments.pose import LANDMARK_INDEX, PoseSequence

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
_LEFT_SHOULDER, _RIGHT_SHOULDER = LANDMARK_INDEX["left_shoulder"], LANDMARK_INDEX["right_shoulder"]
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
