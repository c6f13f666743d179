"""The in-process runner: cached CPU stages, chained keys, nothing stored for bad input."""

from __future__ import annotations

import json
import subprocess

import av
import pytest

from deployments import errors
from deployments.video import DecodeSettings
from serve.cache import ArtifactCache
from serve.orchestrator import LocalRunner, StageKeys
from serve.pipeline import Plan
from serve.storage import LocalStore

SHORT = DecodeSettings(fps=12, width=256, max_frames=24)


@pytest.fixture
def runner(tmp_path):
    return LocalRunner(ArtifactCache(LocalStore(tmp_path / "store")))


def test_repeat_with_same_video_and_style_reads_no_frames(
    runner, sample_video, tmp_path, monkeypatch
):
    plan = Plan(decode=SHORT, styles=["smooth", "exaggerate=1.3"])
    first = runner.pose_map_video(sample_video, plan, tmp_path / "a.mp4")
    assert first.frames_decoded == 24
    assert not any(r.cache_hit for r in first.stages)

    def no_video_reading(*args, **kwargs):
        raise AssertionError("a cache hit must not open the video")

    monkeypatch.setattr(av, "open", no_video_reading)
    second = runner.pose_map_video(sample_video, plan, tmp_path / "b.mp4")
    assert second.frames_decoded == 0
    assert [(r.stage, r.cache_hit) for r in second.stages] == [("pose_map_video", True)]
    assert (tmp_path / "b.mp4").read_bytes() == (tmp_path / "a.mp4").read_bytes()


def test_new_style_reuses_decode_and_pose(runner, sample_video, tmp_path):
    runner.pose_map_video(sample_video, Plan(decode=SHORT, styles=["smooth"]), tmp_path / "a.mp4")
    report = runner.pose_map_video(
        sample_video, Plan(decode=SHORT, styles=["smooth", "mirror"]), tmp_path / "b.mp4"
    )
    hits = {r.stage: r.cache_hit for r in report.stages}
    assert hits == {"pose": True, "motion": False, "pose_map_video": False}
    assert report.frames_decoded == 0


def test_pose_map_video_is_valid_for_an_independent_reader(runner, sample_video, tmp_path):
    out = tmp_path / "maps.mp4"
    runner.pose_map_video(sample_video, Plan(decode=SHORT), out)
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    stream = json.loads(probe.stdout)["streams"][0]
    assert (stream["width"], stream["height"], stream["r_frame_rate"]) == (256, 144, "12/1")
    assert int(stream["nb_read_frames"]) == 24


def test_keys_chain_and_change_with_settings(sample_video):
    a = StageKeys.for_plan(sample_video, Plan(decode=SHORT, styles=["smooth"]))
    b = StageKeys.for_plan(sample_video, Plan(decode=SHORT, styles=["mirror"]))
    c = StageKeys.for_plan(sample_video, Plan(decode=SHORT.model_copy(update={"fps": 8})))
    assert (a.source, a.decode, a.pose) == (b.source, b.decode, b.pose)
    assert a.motion != b.motion and a.pose_map_video != b.pose_map_video
    assert c.decode != a.decode and c.pose != a.pose


def test_bad_input_leaves_nothing_in_storage(runner, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 5000)
    with pytest.raises(errors.InputError):
        runner.pose_map_video(corrupt, Plan(decode=SHORT), tmp_path / "out.mp4")
    assert list(runner.cache.store.list("")) == []
    assert not (tmp_path / "out.mp4").exists()


def test_invalid_style_is_rejected_by_the_plan():
    with pytest.raises(errors.InvalidSettingError, match="exaggerate"):
        Plan(styles=["wobble"])
