"""Motion stage on synthetic sequences: smoothing, gap filling, styles, parsing, pose maps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deployments.errors import InvalidPoseDataError, InvalidSettingError
from deployments.motion import (
    MOTION_CODE_VERSION,
    ExaggerateStyle,
    MirrorStyle,
    MotionEditor,
    RetimeStyle,
    SmoothStyle,
    StabilizeStyle,
    parse_style,
    parse_styles,
    root_trajectory,
)
from deployments.pose import LANDMARK_INDEX, NUM_LANDMARKS, PoseSequence
from deployments.pose_maps import (
    OPENPOSE18_NAMES,
    OPENPOSE_COLORS,
    OPENPOSE_LIMBS,
    render_pose_maps,
)
from deployments.smoothing import SmoothingSettings, fill_gaps, missing_mask, smooth_sequence

WIDTH, HEIGHT, FPS = 640, 480, 30.0
LEFT_HIP, RIGHT_HIP = LANDMARK_INDEX["left_hip"], LANDMARK_INDEX["right_hip"]
LEFT_WRIST, RIGHT_WRIST = LANDMARK_INDEX["left_wrist"], LANDMARK_INDEX["right_wrist"]


def _clean_landmarks(frames: int = 90) -> np.ndarray:
    """Slow sine motion around a fixed pose: each joint with its own phase and amplitude."""
    rng = np.random.default_rng(1)
    base = rng.uniform([200, 100], [440, 380], size=(NUM_LANDMARKS, 2))
    amplitude = rng.uniform(5, 30, size=(NUM_LANDMARKS, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(NUM_LANDMARKS, 2))
    t = np.arange(frames)[:, None, None] / FPS
    landmarks = np.ones((frames, NUM_LANDMARKS, 4))
    landmarks[..., :2] = base + amplitude * np.sin(2 * np.pi * 0.5 * t + phase)
    landmarks[..., 2] = 0.0
    return landmarks


def _sequence(landmarks: np.ndarray) -> PoseSequence:
    landmarks = np.asarray(landmarks, dtype=np.float32)
    present = np.isfinite(landmarks[..., :2]).all(axis=-1).any(axis=-1)
    return PoseSequence(landmarks, present, WIDTH, HEIGHT, FPS)


def _noisy(clean: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    noisy = clean.copy()
    noisy[..., :2] += np.random.default_rng(2).normal(0, sigma, size=clean[..., :2].shape)
    return noisy


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.nanmean((a[..., :2] - b[..., :2]) ** 2)))


# --- smoothing and gap filling ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["one_euro", "savgol"])
def test_smoothing_reduces_jitter(method):
    clean = _clean_landmarks()
    noisy = _noisy(clean)
    smoothed = smooth_sequence(_sequence(noisy), SmoothingSettings(method=method)).landmarks
    # Frame-to-frame jitter (second differences) and the error against the true motion drop.
    jitter_before = np.abs(np.diff(noisy[..., :2], 2, axis=0)).mean()
    jitter_after = np.abs(np.diff(smoothed[..., :2], 2, axis=0)).mean()
    assert jitter_after < 0.5 * jitter_before
    assert _rms(smoothed[10:], clean[10:]) < 0.7 * _rms(noisy[10:], clean[10:])


@pytest.mark.parametrize("gap_fill", ["linear", "pchip"])
def test_short_gaps_are_filled_and_long_gaps_stay(gap_fill):
    clean = _clean_landmarks()
    landmarks = clean.copy()
    landmarks[20:25, LEFT_WRIST] = np.nan  # 5 frames: filled
    landmarks[40:70, RIGHT_WRIST] = np.nan  # 30 frames: stays missing
    landmarks[50:53, LEFT_HIP, 3] = 0.1  # low visibility counts as missing, short: filled
    landmarks[:4, RIGHT_HIP] = np.nan  # at the start: nothing to interpolate from
    settings = SmoothingSettings(method="savgol", max_gap=10, gap_fill=gap_fill)
    out = smooth_sequence(_sequence(landmarks), settings).landmarks
    assert np.isfinite(out[20:25, LEFT_WRIST]).all()
    assert _rms(out[20:25, LEFT_WRIST], clean[20:25, LEFT_WRIST]) < 3.0
    assert np.isfinite(out[50:53, LEFT_HIP]).all()
    assert np.isnan(out[40:70, RIGHT_WRIST]).all()
    assert np.isfinite(out[[39, 70], RIGHT_WRIST]).all()
    assert np.isnan(out[:4, RIGHT_HIP]).all()


def test_linear_fill_is_exact_on_a_line():
    values = np.arange(10, dtype=float)[:, None, None] * np.array([2.0, -1.0])  # (10, 1, 2)
    gappy = values.copy()
    gappy[3:6] = np.nan
    missing = np.isnan(gappy[..., 0])
    filled, still_missing = fill_gaps(gappy, missing, max_gap=3, method="linear")
    np.testing.assert_allclose(filled, values)
    assert not still_missing.any()
    _, still_missing = fill_gaps(gappy, missing, max_gap=2, method="linear")
    np.testing.assert_array_equal(still_missing, missing)


def test_missing_mask_uses_visibility_and_nan():
    landmarks = np.ones((2, NUM_LANDMARKS, 4))
    landmarks[0, 3, 3] = 0.2
    landmarks[1, 4, 0] = np.nan
    mask = missing_mask(landmarks, min_visibility=0.5)
    assert mask.sum() == 2 and mask[0, 3] and mask[1, 4]


def test_absent_frames_stay_absent_after_smoothing_when_the_gap_is_long():
    landmarks = _clean_landmarks()
    landmarks[30:60] = np.nan
    out = smooth_sequence(_sequence(landmarks), SmoothingSettings(max_gap=5))
    assert not out.present[30:60].any() and out.present[:30].all() and out.present[60:].all()


def test_savgol_settings_are_validated():
    with pytest.raises(ValueError, match="odd"):
        SmoothingSettings(window=8)
    with pytest.raises(ValueError, match="polyorder"):
        SmoothingSettings(window=5, polyorder=5)


# --- styles ----------------------------------------------------------------------------------


def _relative_deviation(landmarks: np.ndarray) -> np.ndarray:
    root = landmarks[:, [LEFT_HIP, RIGHT_HIP], :2].mean(axis=1, keepdims=True)
    relative = landmarks[..., :2] - root
    return relative - relative.mean(axis=0)


def test_exaggerate_one_is_identity_and_two_doubles_the_motion():
    seq = _sequence(_clean_landmarks())
    same = ExaggerateStyle(amount=1.0).apply(seq)
    np.testing.assert_allclose(same.landmarks, seq.landmarks, atol=1e-3)
    doubled = ExaggerateStyle(amount=2.0).apply(seq)
    np.testing.assert_allclose(
        _relative_deviation(doubled.landmarks),
        2 * _relative_deviation(seq.landmarks),
        atol=1e-2,
    )
    # The root keeps its path: only the motion around it is scaled.
    np.testing.assert_allclose(
        root_trajectory(doubled.landmarks), root_trajectory(seq.landmarks), atol=1e-2
    )


def test_mirror_flips_and_swaps_left_and_right():
    seq = _sequence(_clean_landmarks())
    mirrored = MirrorStyle().apply(seq)
    np.testing.assert_allclose(
        mirrored.landmarks[:, LEFT_WRIST, 0], WIDTH - seq.landmarks[:, RIGHT_WRIST, 0], atol=1e-3
    )
    np.testing.assert_allclose(
        mirrored.landmarks[:, LEFT_WRIST, 1], seq.landmarks[:, RIGHT_WRIST, 1], atol=1e-3
    )
    nose = LANDMARK_INDEX["nose"]
    np.testing.assert_allclose(
        mirrored.landmarks[:, nose, 0], WIDTH - seq.landmarks[:, nose, 0], atol=1e-3
    )
    twice = MirrorStyle().apply(mirrored)
    np.testing.assert_allclose(twice.landmarks, seq.landmarks, atol=1e-3)


def test_stabilize_removes_linear_root_drift_and_keeps_fast_motion():
    frames = 120
    times = np.arange(frames)
    bounce = 8 * np.sin(2 * np.pi * 2.0 * times / FPS)  # 2 Hz: faster than the 1 s window
    drift = np.linspace(0, 150, frames)  # the whole body walks right
    landmarks = _clean_landmarks(1).repeat(frames, axis=0)
    landmarks[..., 0] += (drift + bounce)[:, None]
    out = StabilizeStyle(window_s=1.0).apply(_sequence(landmarks))
    root_in = root_trajectory(landmarks)[:, 0]
    root_out = root_trajectory(out.landmarks)[:, 0]
    assert abs(np.polyfit(times, root_out, 1)[0]) < 0.02  # was 150 / 119 = 1.26 px per frame
    assert abs(root_out.mean() - root_in.mean()) < 0.1
    kept = root_out - root_out.mean()
    assert 0.8 < np.std(kept) / np.std(bounce) < 1.2
    assert np.corrcoef(kept, bounce)[0, 1] > 0.95
    # Every joint moves with the root: the pose itself is untouched.
    relative_in = landmarks[..., :2] - root_trajectory(landmarks)[:, None, :2]
    relative_out = out.landmarks[..., :2] - root_trajectory(out.landmarks)[:, None, :2]
    np.testing.assert_allclose(relative_out, relative_in, atol=1e-3)


def test_retime_changes_the_frame_count_and_interpolates():
    seq = _sequence(_clean_landmarks(60))
    fast = RetimeStyle(speed=2).apply(seq)
    assert len(fast) == 30 and fast.fps == FPS
    np.testing.assert_allclose(fast.landmarks, seq.landmarks[::2], atol=1e-4)
    slow = RetimeStyle(speed=0.5).apply(seq)
    assert len(slow) == 120 and slow.fps == FPS
    np.testing.assert_allclose(slow.landmarks[::2][:60], seq.landmarks, atol=1e-4)
    midpoint = (seq.landmarks[10] + seq.landmarks[11]) / 2
    np.testing.assert_allclose(slow.landmarks[21], midpoint, atol=1e-4)
    assert MotionEditor(["retime=0.5"]).edited_frame_count(60) == 120


def test_retime_keeps_absent_frames_absent():
    landmarks = _clean_landmarks(20)
    landmarks[10] = np.nan
    slow = RetimeStyle(speed=0.5).apply(_sequence(landmarks))
    assert not slow.present[[19, 20, 21]].any() and slow.present[18]


def test_styles_apply_in_the_given_order():
    seq = _sequence(_noisy(_clean_landmarks()))
    editor = MotionEditor(["retime=2", "smooth=savgol", "exaggerate=1.5"])
    manual = ExaggerateStyle(amount=1.5).apply(
        SmoothStyle(method="savgol").apply(RetimeStyle(speed=2).apply(seq))
    )
    np.testing.assert_array_equal(editor.edit(seq).landmarks, manual.landmarks)
    reordered = MotionEditor(["smooth=savgol", "retime=2", "exaggerate=1.5"]).edit(seq)
    assert np.abs(reordered.landmarks - manual.landmarks).max() > 0.1


def test_editor_refuses_multi_frame_stills():
    stills = PoseSequence(np.zeros((2, NUM_LANDMARKS, 4)), np.ones(2, bool), 10, 10, fps=0.0)
    with pytest.raises(InvalidPoseDataError, match="frame rate"):
        MotionEditor(["smooth"]).edit(stills)


# --- parsing and cache keys ------------------------------------------------------------------


def test_parse_styles_from_strings_and_dicts():
    assert parse_style("exaggerate=1.3") == ExaggerateStyle(amount=1.3)
    assert parse_style(" Smooth ") == SmoothStyle()
    assert parse_style("smooth=savgol") == SmoothStyle(method="savgol")
    assert parse_style("smooth:method=savgol,window=9") == SmoothStyle(method="savgol", window=9)
    assert parse_style("mirror") == MirrorStyle()
    assert parse_style("stabilize=2") == StabilizeStyle(window_s=2.0)
    assert parse_style("retime:speed=0.5") == RetimeStyle(speed=0.5)
    styles = parse_styles(["mirror", {"name": "retime", "speed": 2}, ExaggerateStyle(amount=2)])
    assert [s.name for s in styles] == ["mirror", "retime", "exaggerate"]


BAD_STYLES = [
    "dance",
    "",
    "exaggerate=-1",
    "exaggerate=abc",
    "mirror=1",
    "smooth:window=4",
    "smooth:foo=1",
    "smooth:window",
    "retime",
    "retime=100",
]


@pytest.mark.parametrize("text", BAD_STYLES)
def test_invalid_styles_raise_a_setting_error_listing_valid_styles(text):
    with pytest.raises(InvalidSettingError) as excinfo:
        parse_style(text)
    assert excinfo.value.code == "invalid_setting"
    message = excinfo.value.message
    if text == "dance":
        for name in ("smooth", "exaggerate", "mirror", "stabilize", "retime"):
            assert name in message


def test_invalid_style_dicts_and_lists():
    with pytest.raises(InvalidSettingError, match="valid styles"):
        parse_styles([{"name": "spin"}])
    with pytest.raises(InvalidSettingError, match="amount"):
        parse_styles([{"name": "exaggerate", "amount": 0}])
    with pytest.raises(InvalidSettingError, match="10x"):
        MotionEditor(["retime=0.2", "retime=0.2"])


def test_settings_key_is_canonical():
    key = MotionEditor(["exaggerate=1.3", "smooth"]).settings_key()
    assert key == MotionEditor([{"name": "exaggerate", "amount": 1.3}, "smooth"]).settings_key()
    assert key != MotionEditor(["exaggerate=1.4", "smooth"]).settings_key()
    assert key != MotionEditor(["smooth", "exaggerate=1.3"]).settings_key()
    decoded = json.loads(key)
    assert decoded["code"] == MOTION_CODE_VERSION
    assert decoded["styles"][1]["method"] == "one_euro"  # defaults are spelled out


# --- pose maps -------------------------------------------------------------------------------

# A front-facing T-pose on a 256x256 canvas, in OpenPose-18 keypoints (person's right on the left).
T_POSE = {
    "nose": (128, 40),
    "right_shoulder": (98, 70),
    "left_shoulder": (158, 70),
    "right_elbow": (58, 70),
    "right_wrist": (18, 70),
    "left_elbow": (198, 70),
    "left_wrist": (238, 70),
    "right_hip": (108, 150),
    "left_hip": (148, 150),
    "right_knee": (108, 195),
    "right_ankle": (108, 240),
    "left_knee": (148, 195),
    "left_ankle": (148, 240),
    "right_eye": (120, 32),
    "left_eye": (136, 32),
    "right_ear": (112, 36),
    "left_ear": (144, 36),
}
_DIMMED = (OPENPOSE_COLORS.astype(np.float64) * 0.6).astype(np.uint8)


def _t_pose_landmarks(frames: int = 1, scale: float = 1.0) -> np.ndarray:
    landmarks = np.full((frames, NUM_LANDMARKS, 4), np.nan)
    for name, (x, y) in T_POSE.items():
        landmarks[:, LANDMARK_INDEX[name]] = [x * scale, y * scale, 0.0, 1.0]
    return landmarks


def _keypoint(name: str) -> np.ndarray:
    if name == "neck":
        return (np.array(T_POSE["left_shoulder"]) + np.array(T_POSE["right_shoulder"])) / 2
    return np.array(T_POSE[name], dtype=float)


def test_limb_midpoints_and_joints_have_the_openpose_colours():
    maps = render_pose_maps(_t_pose_landmarks(), 256, 256)
    assert maps.shape == (1, 256, 256, 3) and maps.dtype == np.uint8
    canvas = maps[0]
    for limb, (a, b) in enumerate(OPENPOSE_LIMBS[:13]):  # body limbs, clear of the face
        x, y = np.round((_keypoint(OPENPOSE18_NAMES[a]) + _keypoint(OPENPOSE18_NAMES[b])) / 2)
        assert canvas[int(y), int(x)].tolist() == _DIMMED[limb].tolist(), OPENPOSE18_NAMES[b]
    for joint, name in enumerate(OPENPOSE18_NAMES):
        x, y = _keypoint(name).astype(int)
        assert canvas[y, x].tolist() == OPENPOSE_COLORS[joint].tolist(), name
    assert canvas[0, 0].tolist() == [0, 0, 0] and canvas[250, 5].tolist() == [0, 0, 0]


def test_missing_joints_and_their_limbs_are_not_drawn():
    landmarks = _t_pose_landmarks()
    landmarks[0, LANDMARK_INDEX["left_wrist"]] = np.nan
    landmarks[0, LANDMARK_INDEX["right_shoulder"], 3] = 0.1
    canvas = render_pose_maps(landmarks, 256, 256, min_visibility=0.5)[0]
    assert canvas[70, 238].tolist() == [0, 0, 0]  # left wrist
    assert canvas[70, 218].tolist() == [0, 0, 0]  # left forearm
    assert canvas[70, 98].tolist() == [0, 0, 0]  # hidden right shoulder
    assert canvas[70, 128].tolist() == [0, 0, 0]  # neck needs both shoulders
    assert canvas[70, 198].tolist() == OPENPOSE_COLORS[6].tolist()  # left elbow still drawn


def test_batch_rendering_with_a_frame_slice_and_scaling():
    landmarks = _t_pose_landmarks(frames=5, scale=2.0)  # poses at 512x512
    landmarks[3] = np.nan
    seq = PoseSequence(landmarks.astype(np.float32), np.ones(5, bool), 512, 512, FPS)
    maps = render_pose_maps(seq, 256, 256, slice(1, 4))
    assert maps.shape == (3, 256, 256, 3)
    x, y = T_POSE["left_elbow"]
    assert maps[0, y, x].tolist() == OPENPOSE_COLORS[6].tolist()
    assert not maps[2].any()  # frame 3 has no person
    big = render_pose_maps(seq, 768, 768, slice(0, 1))
    assert big[0, int(y * 3), int(x * 3)].tolist() == OPENPOSE_COLORS[6].tolist()
