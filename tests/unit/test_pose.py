"""Pose stage: MediaPipe on real frames of the sample video, the PoseSequence formats."""

from __future__ import annotations

import functools
import json
import urllib.request

import av
import cv2
import numpy as np
import pytest

from deployments import pose as pose_module
from deployments.errors import InvalidPoseDataError, InvalidSettingError
from deployments.pose import (
    COCO17_NAMES,
    LANDMARK_INDEX,
    MEDIAPIPE_TO_COCO17,
    NUM_LANDMARKS,
    POSE_CODE_VERSION,
    POSE_JSON_FORMAT,
    PoseExtractor,
    PoseSequence,
    PoseSettings,
    bundled_model_complexities,
)

# Frames 72..87: the person is detected from the first of them. At 512 px the people in this
# clip are small (~110 px tall) and the detector alone misses them in many frames (tracking
# then carries on), so a window starting at a detectable frame keeps the test exact.
FIRST_FRAME, FRAME_COUNT, WIDTH = 72, 16, 512


@functools.lru_cache(maxsize=1)
def _decode_frames(path: str) -> np.ndarray:
    frames = []
    with av.open(path) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index >= FIRST_FRAME:
                rgb = frame.to_ndarray(format="rgb24")
                height = round(rgb.shape[0] * WIDTH / rgb.shape[1] / 2) * 2
                frames.append(cv2.resize(rgb, (WIDTH, height), interpolation=cv2.INTER_AREA))
            if len(frames) == FRAME_COUNT:
                break
    return np.stack(frames)


@pytest.fixture
def frames(sample_video) -> np.ndarray:
    return _decode_frames(str(sample_video))


@functools.lru_cache(maxsize=1)
def _tracked(path: str) -> PoseSequence:
    with PoseExtractor() as extractor:
        return extractor.extract(_decode_frames(path), fps=30.0)


@pytest.fixture
def tracked(sample_video) -> PoseSequence:
    return _tracked(str(sample_video))


def _synthetic_sequence() -> PoseSequence:
    rng = np.random.default_rng(0)
    landmarks = rng.uniform(0, 200, size=(4, NUM_LANDMARKS, 4)).astype(np.float32)
    landmarks[..., 3] = rng.uniform(0, 1, size=(4, NUM_LANDMARKS))
    landmarks[1] = np.nan  # a frame without a person
    landmarks[2, 5] = np.nan  # one missing landmark in a present frame
    present = np.array([True, False, True, True])
    return PoseSequence(landmarks, present, width=320, height=200, fps=25.0)


# --- settings and model files ----------------------------------------------------------------


def test_default_model_is_bundled_in_the_wheel():
    assert 1 in bundled_model_complexities()
    assert PoseSettings().model_complexity == 1


def test_unbundled_model_complexity_is_rejected(tmp_path, monkeypatch):
    # A mediapipe directory holding only the full model, as in the 0.10.21 wheel.
    model = tmp_path / "modules" / "pose_landmark" / "pose_landmark_full.tflite"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"")
    monkeypatch.setattr(pose_module, "_mediapipe_dir", lambda: tmp_path)
    assert bundled_model_complexities() == (1,)
    for complexity in (0, 2):
        with pytest.raises(InvalidSettingError, match="not bundled"):
            PoseSettings(model_complexity=complexity)
    assert PoseSettings(model_complexity=1).model_complexity == 1


def test_installed_wheel_accepts_exactly_its_bundled_models():
    bundled = bundled_model_complexities()
    for complexity in (0, 1, 2):
        if complexity in bundled:
            assert PoseSettings(model_complexity=complexity).model_complexity == complexity
        else:
            with pytest.raises(InvalidSettingError):
                PoseSettings(model_complexity=complexity)


def test_settings_key_tracks_settings_and_code_version():
    key = PoseSettings().settings_key()
    assert POSE_CODE_VERSION in key
    assert key == PoseSettings().settings_key()
    assert key != PoseSettings(tracking=False).settings_key()
    assert key != PoseSettings(min_detection_confidence=0.6).settings_key()


def test_extraction_never_downloads(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("mediapipe tried to download a model")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with PoseExtractor() as extractor:
        seq = extractor.extract(np.zeros((1, 64, 64, 3), dtype=np.uint8), fps=30.0)
    assert len(seq) == 1


# --- extraction on real frames ---------------------------------------------------------------


def test_person_found_with_landmarks_inside_the_image(tracked, frames):
    assert tracked.landmarks.shape == (FRAME_COUNT, NUM_LANDMARKS, 4)
    assert (tracked.width, tracked.height) == (frames.shape[2], frames.shape[1])
    assert tracked.fps == 30.0
    assert tracked.present.sum() >= FRAME_COUNT - 2
    points = tracked.landmarks[tracked.present]
    visible = points[..., 3] > 0.5
    assert visible.mean() > 0.5
    x, y = points[..., 0][visible], points[..., 1][visible]
    assert (x >= -2).all() and (x <= tracked.width + 2).all()
    assert (y >= -2).all() and (y <= tracked.height + 2).all()


def test_nose_is_above_the_hips(tracked):
    points = tracked.landmarks[tracked.present]
    nose_y = points[:, LANDMARK_INDEX["nose"], 1]
    hips_y = points[:, [LANDMARK_INDEX["left_hip"], LANDMARK_INDEX["right_hip"]], 1].mean(axis=1)
    assert (nose_y < hips_y - 10).all()


def test_tracking_across_chunks_equals_one_call(tracked, frames):
    with PoseExtractor() as extractor:
        first = extractor.extract(frames[:7], fps=30.0)
        second = extractor.extract(frames[7:], fps=30.0)
        chunked = PoseSequence.concatenate([first, second])
        np.testing.assert_array_equal(chunked.present, tracked.present)
        np.testing.assert_allclose(chunked.landmarks, tracked.landmarks, atol=1e-3)
        # After reset the same extractor starts a new video from scratch.
        extractor.reset()
        again = extractor.extract(frames, fps=30.0)
    np.testing.assert_allclose(again.landmarks, tracked.landmarks, atol=1e-3)


def test_frame_size_change_needs_reset(frames):
    with PoseExtractor() as extractor:
        extractor.extract(frames[:1], fps=30.0)
        with pytest.raises(ValueError, match="reset"):
            extractor.extract(frames[:1, ::2, ::2], fps=30.0)
        extractor.reset()
        assert len(extractor.extract(frames[:1, ::2, ::2], fps=30.0)) == 1


def test_blank_frames_have_no_person():
    with PoseExtractor() as extractor:
        seq = extractor.extract(np.zeros((2, 96, 128, 3), dtype=np.uint8), fps=24.0)
    assert not seq.present.any()
    assert np.isnan(seq.landmarks).all()


def test_still_images_of_different_sizes(frames):
    grey = cv2.cvtColor(frames[0], cv2.COLOR_RGB2GRAY)
    images = [np.zeros((120, 80, 3), dtype=np.uint8), grey, frames[3][::2, ::2]]
    with PoseExtractor() as extractor:
        results = extractor.extract_images(images)
    assert [(s.width, s.height, len(s), s.fps) for s in results] == [
        (80, 120, 1, 0.0),
        (frames.shape[2], frames.shape[1], 1, 0.0),
        (frames.shape[2] // 2, frames.shape[1] // 2, 1, 0.0),
    ]
    assert not results[0].present[0]


def test_extract_rejects_wrong_frame_arrays():
    with PoseExtractor() as extractor, pytest.raises(ValueError, match="uint8"):
        extractor.extract(np.zeros((1, 8, 8, 3), dtype=np.float32), fps=30.0)


# --- formats ---------------------------------------------------------------------------------


def test_coco17_mapping():
    assert len(COCO17_NAMES) == 17
    landmarks = np.zeros((1, NUM_LANDMARKS, 4), dtype=np.float32)
    landmarks[0, :, 0] = np.arange(NUM_LANDMARKS)  # x = MediaPipe index
    landmarks[0, :, 1] = 2 * np.arange(NUM_LANDMARKS)
    landmarks[0, :, 3] = np.arange(NUM_LANDMARKS) / 100
    coco = PoseSequence(landmarks, np.array([True]), 100, 100, 30.0).to_coco17()
    assert coco.shape == (1, 17, 3)
    expected = [0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28]
    np.testing.assert_array_equal(MEDIAPIPE_TO_COCO17, expected)
    np.testing.assert_array_equal(coco[0, :, 0], expected)
    np.testing.assert_array_equal(coco[0, :, 1], 2 * np.array(expected))
    np.testing.assert_allclose(coco[0, :, 2], np.array(expected) / 100)
    assert COCO17_NAMES[COCO17_NAMES.index("left_wrist")] == "left_wrist"
    assert expected[COCO17_NAMES.index("left_wrist")] == LANDMARK_INDEX["left_wrist"]


def test_json_round_trip_keeps_missing_values():
    seq = _synthetic_sequence()
    text = json.dumps(seq.to_json_dict(), allow_nan=False)  # strict JSON: null, never NaN
    doc = json.loads(text)
    assert doc["format"] == POSE_JSON_FORMAT
    assert doc["frames"][1] == {"index": 1, "present": False, "keypoints": {}, "landmarks": []}
    assert set(doc["frames"][0]["keypoints"]) == set(COCO17_NAMES)
    assert doc["frames"][2]["landmarks"][5] == [None, None, None, None]
    assert doc["frames"][2]["keypoints"]["right_eye"] == {"x": None, "y": None, "score": None}
    back = PoseSequence.from_json_dict(doc)
    np.testing.assert_array_equal(back.present, seq.present)
    np.testing.assert_allclose(back.landmarks, seq.landmarks, atol=1e-3)
    assert (back.width, back.height, back.fps) == (320, 200, 25.0)


def test_json_round_trip_of_real_poses(tracked):
    back = PoseSequence.from_json_dict(json.loads(json.dumps(tracked.to_json_dict())))
    np.testing.assert_allclose(back.landmarks, tracked.landmarks, atol=1e-3)
    np.testing.assert_array_equal(back.present, tracked.present)


def test_frames_with_only_coco_keypoints_are_accepted():
    doc = {
        "format": POSE_JSON_FORMAT,
        "width": 100,
        "height": 80,
        "fps": 30,
        "frames": [
            {
                "index": 0,
                "present": True,
                "keypoints": {"nose": {"x": 10, "y": 20, "score": 0.9}},
            }
        ],
    }
    seq = PoseSequence.from_json_dict(doc)
    np.testing.assert_allclose(seq.landmarks[0, LANDMARK_INDEX["nose"]], [10, 20, 0, 0.9])
    assert np.isnan(seq.landmarks[0, LANDMARK_INDEX["left_hip"]]).all()


def test_bytes_round_trip_is_exact():
    seq = _synthetic_sequence()
    back = PoseSequence.from_bytes(seq.to_bytes())
    np.testing.assert_array_equal(back.landmarks, seq.landmarks)
    np.testing.assert_array_equal(back.present, seq.present)
    assert (back.width, back.height, back.fps) == (seq.width, seq.height, seq.fps)
    with pytest.raises(InvalidPoseDataError):
        PoseSequence.from_bytes(b"not an npz")


def _valid_doc() -> dict:
    return json.loads(json.dumps(_synthetic_sequence().to_json_dict()))


def _break(change):
    doc = _valid_doc()
    change(doc)
    return doc


MALFORMED = {
    "not an object": lambda: [1, 2],
    "wrong format": lambda: _break(lambda d: d.update(format="openpose")),
    "missing width": lambda: _break(lambda d: d.pop("width")),
    "float height": lambda: _break(lambda d: d.update(height=20.5)),
    "negative fps": lambda: _break(lambda d: d.update(fps=-1)),
    "frames not a list": lambda: _break(lambda d: d.update(frames={})),
    "index out of order": lambda: _break(lambda d: d["frames"][0].update(index=3)),
    "present not bool": lambda: _break(lambda d: d["frames"][0].update(present=1)),
    "32 landmarks": lambda: _break(lambda d: d["frames"][0]["landmarks"].pop()),
    "row of 3": lambda: _break(lambda d: d["frames"][0]["landmarks"][0].pop()),
    "text value": lambda: _break(lambda d: d["frames"][0]["landmarks"][0].__setitem__(0, "1")),
    "NaN value": lambda: _break(lambda d: d["frames"][0]["landmarks"][0].__setitem__(0, 1e999)),
    "absent with data": lambda: _break(lambda d: d["frames"][0].update(present=False)),
    "present, empty": lambda: _break(lambda d: d["frames"][0].update(landmarks=[], keypoints={})),
    "unknown keypoint": lambda: _break(
        lambda d: d["frames"][0].update(landmarks=[], keypoints={"tail": {"x": 1, "y": 1}})
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_json_is_rejected(case):
    with pytest.raises(InvalidPoseDataError) as excinfo:
        PoseSequence.from_json_dict(MALFORMED[case]())
    assert excinfo.value.code == "invalid_pose_data"
    assert excinfo.value.message


def test_sequence_validates_array_shapes():
    with pytest.raises(InvalidPoseDataError):
        PoseSequence(np.zeros((2, 17, 3)), np.zeros(2, dtype=bool), 10, 10, 30.0)
    with pytest.raises(InvalidPoseDataError):
        PoseSequence(np.zeros((2, 33, 4)), np.zeros(3, dtype=bool), 10, 10, 30.0)
    with pytest.raises(InvalidPoseDataError):
        PoseSequence(np.zeros((2, 33, 4)), np.zeros(2, dtype=bool), 0, 10, 30.0)
