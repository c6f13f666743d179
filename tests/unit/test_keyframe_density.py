"""Motion-aware keyframe density (issue 18, item 4): per-chunk generated rates from the edited
skeleton, exact output timing, chunk keys that carry the rate, and work units predicted ==
counted for the plans that use it."""

from __future__ import annotations

import asyncio
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from deployments import interpolate
from deployments.density import DensitySchedule, KeyframeDensity, density_schedule, grid_indices
from deployments.errors import InvalidSettingError
from deployments.pose import NUM_LANDMARKS, PoseSequence
from deployments.video import probe
from serve import orchestrator, stages
from serve.config import AppArgs
from serve.cost import estimate_plan, predict_generation_units, scheduled_lengths
from serve.local_run import edit_video, preview_video
from serve.pipeline import make_plan
from serve.schemas import JobRequest
from tests.conftest import FAST_OVERRIDES

MOTION = KeyframeDensity(mode="motion", max_gap_px=8.0)  # min 6 fps: stride 2 at 12 fps


def skeleton(moves: list[float], width: int = 768, height: int = 432,
             present: np.ndarray | None = None):  # fmt: skip
    """Landmarks of a figure whose every joint moves right by moves[t] px from frame t to t+1
    (len(moves) + 1 frames), its joints spread over a box a quarter of the frame's width."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, width / 4, size=(NUM_LANDMARKS, 2)) + (width / 4, height / 8)
    shift = np.concatenate([[0.0], np.cumsum(moves)])
    landmarks = np.zeros((len(shift), NUM_LANDMARKS, 4), np.float32)
    landmarks[..., :2] = base[None] + np.stack([shift, np.zeros_like(shift)], -1)[:, None]
    landmarks[..., 3] = 1.0
    if present is None:
        present = np.ones(len(shift), bool)
    landmarks[~present] = np.nan
    return landmarks, present


def strides_of(moves: list[float], chunk_frames: int = 16, settings=MOTION, **kw) -> list[int]:
    landmarks, present = skeleton(moves, **kw)
    return list(density_schedule(landmarks, present, chunk_frames, settings, 12.0).strides)


STILL, SLOW, FAST = 0.0, 3.0, 6.0  # px per 12 fps frame: x2 = 0, 6, 12 against 8 px


def test_still_and_slow_chunks_run_at_6_fps_fast_ones_at_12():
    assert strides_of([STILL] * 47) == [2, 2, 2]
    assert strides_of([SLOW] * 47) == [2, 2, 2]
    assert strides_of([FAST] * 47) == [1, 1, 1]
    # still, fast, slow: each chunk by its own motion
    assert strides_of([STILL] * 16 + [FAST] * 16 + [SLOW] * 15) == [2, 1, 2]
    # a chunk's last interval reaches into the next chunk, which its last frame must bridge
    assert strides_of([STILL] * 15 + [FAST] * 32) == [1, 1, 1]


def test_a_sudden_jump_keeps_its_chunk_at_the_full_rate():
    moves = [STILL] * 47
    moves[20] = 60.0  # the whole skeleton jumps between frames 20 and 21 (chunk 1)
    assert strides_of(moves) == [2, 1, 2]
    appears = np.ones(48, bool)
    appears[:37] = False  # the person comes into view inside chunk 2
    assert strides_of([STILL] * 47, present=appears) == [2, 2, 1]


def test_never_fewer_frames_than_min_fps_and_the_threshold_scales_with_size():
    four_fps = KeyframeDensity(mode="motion", max_gap_px=8.0, min_fps=4.0)
    assert strides_of([2.0] * 47, settings=four_fps) == [3, 3, 3]  # 3 x 2 px <= 8
    assert strides_of([STILL] * 47, settings=four_fps) == [3, 3, 3]  # never below 4 fps
    # the same motion drawn at half the size moves half the pixels at generation size
    landmarks, present = skeleton([FAST] * 47)
    half = density_schedule(landmarks, present, 16, MOTION, 12.0, scale=0.5)
    assert list(half.strides) == [2, 2, 2]
    assert strides_of([FAST] * 47, settings=KeyframeDensity()) == [1, 1, 1]  # fixed


def test_output_frames_and_timestamps_stay_exact():
    schedule = DensitySchedule(frames=40, chunk_frames=16, strides=(2, 1, 2), speeds=(0, 9, 0))
    assert schedule.indices(0) == list(range(0, 16, 2))
    assert schedule.indices(2) == [32, 34, 36, 38, 39]  # the job's last frame is generated
    frames_at = schedule.job_indices()
    for out_fps in (25.0, 30.0, 24.0, 1.0):
        dense = interpolate.output_positions(40, 12, out_fps)
        sparse = interpolate.output_positions(40, 12, out_fps, frames_at=frames_at)
        assert len(sparse) == len(dense) == interpolate.output_frame_count(40, 12, out_fps)
        step = Fraction(12) / interpolate.exact_fps(out_fps)
        for k, (slot, t) in enumerate(sparse):
            position = k * step  # output frame k is at k / out_fps: its grid position
            if position >= 39:  # the held tail (pad_tail): the last frame
                assert (slot, t) == (len(frames_at) - 1, 0)
                continue
            left = frames_at[slot]
            right = frames_at[slot + 1] if t else left
            assert left + t * (right - left) == position  # exact, no drift
            assert (t == 0) == (position in frames_at)  # generated frames pass unchanged
    # every grid frame generated: the positions of a fixed plan
    every = list(range(40))
    fixed = interpolate.output_positions(40, 12, 25)
    assert interpolate.output_positions(40, 12, 25, frames_at=every) == fixed


def test_the_chunk_rate_is_part_of_its_key_and_full_rate_chunks_keep_theirs():
    plan = make_plan("standard", 1920, 1080, model_id="tiny", overrides={"chunk_frames": 16})
    fixed = plan.model_copy(update={"keyframe_density": KeyframeDensity()})
    schedule = DensitySchedule(frames=48, chunk_frames=16, strides=(1, 2, 1), speeds=(9, 1, 9))
    scheduled = plan.model_copy(update={"schedule": schedule})
    keys = stages.job_keys("f" * 64, plan)
    spans = orchestrator.chunk_spans(48, 16)

    def key(p, chunk):
        spec = orchestrator._chunk_specs(_manifest(), p, orchestrator.first_frames(spans, p))
        span = orchestrator.generation_spans(spans, p)[chunk]
        return stages.generation_key(keys, p, span, orchestrator._key_fields(spec[chunk], span, p),
                                     None, orchestrator.keyed_indices(p, chunk, span))  # fmt: skip

    assert key(scheduled, 0) == key(fixed, 0)  # full rate: the fixed plan's frames, its key
    assert key(scheduled, 1) != key(fixed, 1)  # 6 fps: other frames, another key
    # standard's noise does not act (noise_sharing 1): chunk 2's later first frame is not keyed
    assert key(scheduled, 2) == key(fixed, 2)
    own_noise = {"update": {"noise_sharing": 0.6}}
    shared = [p.model_copy(**own_noise) for p in (scheduled, fixed)]
    assert key(shared[0], 2) != key(shared[1], 2)  # with own noise its first frame counts


def _manifest():
    class Manifest:
        job_id = "job"
        request = JobRequest(prompt="a dancer", seed=3)

    return Manifest()


def test_plans_take_the_setting_and_refuse_what_cannot_run():
    plan = make_plan("draft", 1920, 1080, model_id="tiny", overrides={"keyframe_density": "motion"})
    assert plan.keyframe_density.mode == "motion" and plan.schedule is None
    assert make_plan("standard", 1920, 1080, model_id="tiny").keyframe_density.mode == "motion"
    assert make_plan("turbo", 1920, 1080, model_id="tiny").keyframe_density.mode == "motion"
    assert make_plan("high", 1920, 1080, model_id="tiny").keyframe_density.mode == "fixed"
    with pytest.raises(InvalidSettingError, match="keyframe_density"):
        make_plan("standard", 1920, 1080, model_id="tiny", overrides={"keyframe_density": "fast"})
    with pytest.raises(InvalidSettingError, match="slow chunk"):  # 16 frames at stride 2: 8
        make_plan("high", 1920, 1080, model_id="tiny",
                  overrides={"keyframe_density": "motion", "chunk_overlap": 8})  # fmt: skip


def test_the_prediction_follows_the_schedule():
    plan = make_plan("high", 1920, 1080, model_id="tiny", overrides={"keyframe_density": "motion"})
    schedule = DensitySchedule(frames=40, chunk_frames=16, strides=(2, 1, 2), speeds=(0, 9, 0))
    scheduled = plan.model_copy(update={"schedule": schedule})
    # high's overlap frame: chunk 1 repeats chunk 0's last generated frame (grid 14), chunk 2
    # chunk 1's (grid 31)
    assert scheduled.generated_indices(1, (16, 32)) == [14, *range(16, 32)]
    assert scheduled_lengths(scheduled) == [8, 17, 6]
    g = plan.generation
    units = predict_generation_units(g, 40, 16, lengths=[8, 17, 6])
    assert units.total < predict_generation_units(g, 40, 16, overlap=1).total
    estimate = estimate_plan(scheduled, 40)
    assert estimate.plan.generated_frames == 8 + 17 + 6 + 1
    assert estimate.plan.work_units == pytest.approx(units.total)
    # without its schedule (an estimate before the skeleton exists) it assumes the full rate
    assert estimate_plan(plan, 40).plan.generated_frames == 40 + 2 + 1


def test_grid_indices_end_on_the_last_frame():
    assert grid_indices((0, 16), 2, 40) == list(range(0, 16, 2))
    assert grid_indices((32, 40), 3, 40) == [32, 35, 38, 39]
    assert grid_indices((32, 33), 2, 33) == [32]


# --- a job end to end: synthetic edited skeleton, real pipeline ---------------------------------

# 24 grid frames in 4 chunks of 6 at 128x72: still, slow, fast, a sudden jump
MOVES = [0.0] * 6 + [0.5] * 6 + [2.0] * 6 + [0.0, 0.0, 12.0, 0.0, 0.0]
JOB_DENSITY = {"mode": "motion", "max_gap_px": 2.0}  # 128 px frames move few pixels


def test_a_job_generates_the_chosen_rates_with_exact_output(short_clip, tmp_path, monkeypatch):
    landmarks, present = skeleton(MOVES, width=128, height=72)
    edited = PoseSequence(landmarks, present, 128, 72, 12.0)
    monkeypatch.setattr(stages, "load_edited_poses", lambda ctx, keys: edited)
    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    job = JobRequest(prompt="a robot dancing", preset="standard", seed=3,
                     overrides={**FAST_OVERRIDES, "steps": 2, "chunk_frames": 6,
                                "keyframe_density": JOB_DENSITY, "noise_sharing": 0.6,
                                "chunk_overlap": 1})  # fmt: skip
    out = tmp_path / "out.mp4"
    report = asyncio.run(edit_video(short_clip, out, job, args))
    density = report["keyframe_density"]
    assert density["strides"] == [2, 2, 1, 1] and density["chunk_fps"] == [6, 6, 12, 12]
    plan = report["plan"]
    # own frames 3 + 3 + 6 + 6, one overlap frame in chunks 1-3, the anchor keyframe
    assert plan["generated_frames"] == 18 + 3 + 1
    assert plan["work_units"] == plan["predicted_work_units"]
    assert report["naive"]["generated_frames"] == 50  # the baseline still counts every frame
    info = probe(out)
    assert info.frame_count == math.ceil(24 * 25 / 12) == 50  # 2.00 s at 25 fps, exactly
    assert info.fps == 25 and info.duration_s == pytest.approx(2.0)
    assert info.max_frame_interval_s == pytest.approx(0.04, abs=1e-6)
    again = asyncio.run(edit_video(short_clip, tmp_path / "again.mp4", job, args))
    assert again["plan"]["work_units"]["unet_evals"] == 0  # same strides, same keys: all cached
    # the preview's estimate (CPU only) already knows the slow chunks: the job's frames
    preview = asyncio.run(preview_video(short_clip, tmp_path / "preview.mp4", job, args))
    assert preview["estimate"]["plan"]["generated_frames"] == plan["generated_frames"]


def test_the_default_threshold_is_the_committed_calibration():
    results = Path(__file__).parents[2] / "benchmarks" / "results" / "keyframe_density.json"
    calibration = json.loads(results.read_text())
    assert KeyframeDensity().max_gap_px == calibration["max_gap_px"]
    assert calibration["service_max_gap_px"] == calibration["max_gap_px"]
