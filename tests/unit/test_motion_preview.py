"""The CPU motion preview: its frames (deployments/motion_preview.py) and `preview_video` in
process, which fills the cache a following job hits, with no diffusion at all."""

from __future__ import annotations

import asyncio
import json
import subprocess

import av
import numpy as np
import pytest

from deployments.motion import MotionEditor
from deployments.motion_preview import BACKGROUND_DIMMING, edited_source_frames, side_by_side
from deployments.pose import LANDMARK_INDEX, NUM_LANDMARKS, PoseSequence
from serve.config import AppArgs
from serve.local_run import edit_video, preview_video
from serve.schemas import JobRequest
from tests.conftest import FAST_OVERRIDES

W, H = 96, 64


def poses(frames: int, x: float, fps: float = 12.0) -> PoseSequence:
    """A standing figure centred at `x` in every frame (all landmarks visible)."""
    landmarks = np.zeros((frames, NUM_LANDMARKS, 4), dtype=np.float32)
    landmarks[..., 3] = 1.0
    rows = np.linspace(10, 54, NUM_LANDMARKS)
    landmarks[..., 0] = x + (np.arange(NUM_LANDMARKS) % 3 - 1) * 4
    landmarks[..., 1] = rows
    for name in ("left_shoulder", "right_shoulder"):
        landmarks[:, LANDMARK_INDEX[name], 1] = 20
    return PoseSequence(landmarks, np.ones(frames, dtype=bool), W, H, fps)


def source_frames(frames: int) -> np.ndarray:
    """Frame i is a flat grey of level 10 * i: its background tells which frame it is."""
    levels = (np.arange(frames) * 10).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (frames, H, W, 3)).copy()


def drawn_columns(panel: np.ndarray, background: int) -> np.ndarray:
    """Columns where the skeleton was drawn (pixels that are not the dimmed background)."""
    expected = int(background * BACKGROUND_DIMMING)
    body = panel[16:, :]  # below the label
    return np.nonzero((np.abs(body.astype(int) - expected) > 2).any(axis=(0, 2)))[0]


def test_source_frames_follow_the_retime_styles():
    assert list(edited_source_frames(["smooth"], 5)) == [0, 1, 2, 3, 4]
    slow = edited_source_frames(["retime=0.5"], 10)
    assert len(slow) == MotionEditor(["retime=0.5"]).edited_frame_count(10) == 20
    assert list(slow[:6]) == [0, 1, 1, 2, 2, 3] and slow[-1] == 9
    fast = edited_source_frames(["retime=2"], 10)
    assert list(fast) == [0, 2, 4, 6, 8]
    both = edited_source_frames(["retime=2", "smooth", "retime=0.5"], 12)
    assert len(both) == MotionEditor(["retime=2", "retime=0.5"]).edited_frame_count(12)
    assert np.all(np.diff(both) >= 0) and both[-1] <= 11
    assert len(edited_source_frames(["retime=2"], 0)) == 0


@pytest.mark.parametrize("chunk", [1, 4, 10])
def test_side_by_side_draws_original_left_and_edited_right_on_the_same_frame(chunk):
    frames, original, edited = source_frames(10), poses(10, 30.0), poses(20, 66.0)
    sources = edited_source_frames(["retime=0.5"], 10)
    chunks = (frames[i : i + chunk] for i in range(0, 10, chunk))
    out = np.concatenate(list(side_by_side(chunks, original, edited, sources)))
    assert out.shape == (20, H, 2 * W, 3) and out.dtype == np.uint8
    for t in (0, 7, 19):
        level = int(sources[t]) * 10
        left, right = out[t, :, :W], out[t, :, W:]
        # both halves stand on source frame sources[t]: its grey, dimmed, where nothing is drawn
        assert left[-1, 0, 0] == right[-1, 0, 0] == int(level * BACKGROUND_DIMMING)
        left_cols, right_cols = drawn_columns(left, level), drawn_columns(right, level)
        assert 15 < left_cols.mean() < 45  # the original figure at x = 30
        assert 50 < right_cols.mean() < 80  # the edited one at x = 66


def test_side_by_side_refuses_a_source_shorter_than_the_poses():
    frames, original = source_frames(4), poses(6, 30.0)
    sources = np.arange(6)
    with pytest.raises(ValueError, match="source ended after 4 frames"):
        list(side_by_side([frames], original, original, sources))
    with pytest.raises(ValueError, match="must not decrease"):
        list(side_by_side([frames], original, original, np.array([0, 2, 1, 3, 4, 5])))


def ffprobe(path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)["streams"][0]


def request(styles=("smooth", "retime=0.5")) -> JobRequest:
    return JobRequest(prompt="a robot dancing", styles=list(styles), preset="draft", seed=3,
                      overrides=FAST_OVERRIDES)  # fmt: skip


def test_preview_in_process_costs_no_gpu_and_fills_the_cache_the_job_hits(
    short_clip, tmp_path, monkeypatch
):
    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    out = tmp_path / "preview.mp4"
    report = asyncio.run(preview_video(short_clip, out, request(), args))

    stream = ffprobe(out)  # 2 s at 12 fps, slowed down 2x: 48 frames of 2 x 128 by 72
    assert (stream["width"], stream["height"], stream["r_frame_rate"]) == (256, 72, "12/1")
    assert int(stream["nb_read_frames"]) == 48
    preview = report["preview"]
    assert report["kind"] == "preview"
    assert preview["work_units"]["unet_evals"] == 0 and preview["gpu_seconds"] == 0
    stages = {s["stage"]: s for s in preview["stages"]}
    assert set(stages) == {"decode", "pose", "motion", "preview"}
    assert all(s["device"] == "cpu" and s["cache_hits"] == 0 for s in stages.values())
    estimate = report["estimate"]
    assert estimate["plan"]["generated_frames"] == 48
    assert 0 < estimate["plan"]["work_units"] < estimate["naive"]["work_units"]
    assert estimate["plan"]["dollars"]["spot"] > 0

    # a repeat reads no frame at all: every stage is a cache hit
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: pytest.fail("a repeat opened the video"))
    again = asyncio.run(preview_video(short_clip, tmp_path / "again.mp4", request(), args))
    assert all(s["cache_hits"] == s["calls"] == 1 for s in again["preview"]["stages"])
    assert (tmp_path / "again.mp4").read_bytes() == out.read_bytes()
    monkeypatch.setattr(av, "open", real_open)

    # the job that follows recomputes none of decode, pose and motion
    job = asyncio.run(edit_video(short_clip, tmp_path / "edited.mp4", request(), args))
    hits = {s["stage"]: (s["calls"], s["cache_hits"]) for s in job["plan"]["stages"]}
    assert hits["decode"] == hits["pose"] == hits["motion"] == (1, 1)
    assert job["plan"]["work_units"]["unet_evals"] > 0  # and it does generate


def test_anchor_frame_preview_is_billed_once_and_the_job_takes_it(short_clip, tmp_path):
    from PIL import Image

    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    anchored = request().model_copy(
        update={"overrides": {**FAST_OVERRIDES, "anchor": "first_keyframe"}, "frames": "anchor"}
    )
    png = tmp_path / "anchor.png"
    report = asyncio.run(
        preview_video(short_clip, tmp_path / "p.mp4", anchored, args, anchor_output=png)
    )
    preview = report["preview"]
    assert preview["generated_frames"] == 1 and preview["work_units"]["unet_evals"] > 0
    assert preview["work_units"] == preview["predicted_work_units"]
    assert Image.open(png).size == (128, 72)  # the keyframe at the generation size

    job = asyncio.run(edit_video(short_clip, tmp_path / "edited.mp4", anchored, args))
    plan = job["plan"]
    diffusion = next(s for s in plan["stages"] if s["stage"] == "diffusion")
    assert diffusion["cache_hits"] == 1  # the keyframe; the chunks are generated
    for name, paid in preview["work_units"].items():  # billed once: by the preview
        assert plan["work_units"][name] == pytest.approx(plan["predicted_work_units"][name] - paid)


def test_a_job_decodes_and_poses_in_separate_records(short_clip, tmp_path):
    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    report = asyncio.run(edit_video(short_clip, tmp_path / "a.mp4", request(["smooth"]), args))
    stages = {s["stage"]: s for s in report["plan"]["stages"]}
    assert stages["decode"]["cache_hits"] == stages["pose"]["cache_hits"] == 0
    assert stages["decode"]["seconds"] > 0 and stages["pose"]["seconds"] > 0


@pytest.fixture
def run_cli(motionserve):
    """`motionserve ARGS` in this process (tests/cli.py) with its store at `store`."""

    def run(*args: str, store):
        return motionserve(*args, env={"MOTIONSERVE_STORAGE_URI": str(store)})

    return run


def test_cli_preview_writes_the_mp4_and_the_report(run_cli, short_clip, tmp_path):
    out, report = tmp_path / "p.mp4", tmp_path / "p.json"
    result = run_cli("preview", str(short_clip), "--style", "smooth", "--style", "mirror",
                     "--preset", "draft", "-o", str(out), "--report", str(report),
                     store=tmp_path / "store")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "work units 0 diffusion, GPU s 0" in result.stdout
    stream = ffprobe(out)  # draft: 12 fps, 512 x 288 generation -> 1024 x 288
    assert (stream["width"], stream["height"], int(stream["nb_read_frames"])) == (1024, 288, 24)
    assert json.loads(report.read_text())["preview"]["gpu_seconds"] == 0


def test_cli_preview_bad_input_is_one_line(run_cli, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"hello " * 100)
    result = run_cli("preview", str(bad), "-o", str(tmp_path / "p.mp4"), store=tmp_path / "s")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not a video" in result.stderr and not (tmp_path / "p.mp4").exists()
    result = run_cli("preview", str(bad), "--style", "moonwalk", "-o", str(tmp_path / "p.mp4"),
                     store=tmp_path / "s")  # fmt: skip
    assert result.returncode == 2 and "moonwalk" in result.stderr


def test_cli_anchor_frame_without_anchor_attention_is_one_line(run_cli, short_clip, tmp_path):
    out, png = tmp_path / "p.mp4", tmp_path / "a.png"
    result = run_cli("preview", str(short_clip), "--preset", "draft", "-o", str(out),
                     "--anchor-frame", str(png), store=tmp_path / "s")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "anchor attention" in result.stderr
    assert not out.exists() and not png.exists()
