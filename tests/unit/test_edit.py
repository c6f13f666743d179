"""The whole pipeline in process (`motionserve edit`): real video in, valid MP4 out, costs."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from deployments.consistency import ConsistencySettings, measure_video
from serve.config import AppArgs
from serve.demo import format_report
from serve.local_run import edit_video
from serve.schemas import JobRequest
from tests.conftest import FAST_OVERRIDES


def ffprobe_streams(path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return {s["codec_type"]: s for s in json.loads(out.stdout)["streams"]}


@pytest.fixture
def app_args(tmp_path) -> AppArgs:
    return AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")


def request(**overrides) -> JobRequest:
    return JobRequest(
        prompt="a robot dancing", styles=["smooth", "exaggerate=1.2"], preset="draft", seed=3,
        overrides={**FAST_OVERRIDES, **overrides},
    )  # fmt: skip


def test_edit_writes_a_valid_mp4_and_a_truthful_report(short_clip, app_args, tmp_path):
    out = tmp_path / "edited.mp4"
    report = asyncio.run(edit_video(short_clip, out, request(), app_args))
    streams = ffprobe_streams(out)
    video = streams["video"]
    assert (video["width"], video["height"], video["r_frame_rate"]) == (256, 144, "25/1")
    assert int(video["nb_read_frames"]) == 50  # 2 s at 25 fps: 24 generated + interpolated
    assert float(streams["audio"]["duration"]) == pytest.approx(2.0, abs=0.05)

    plan, naive = report["plan"], report["naive"]
    assert plan["generated_frames"] == 24 and naive["generated_frames"] == 50
    units = plan["work_units"]
    assert units["unet_evals"] == 24 * 4 * 2  # frames x steps x CFG
    assert 0 < units["controlnet_evals"] < units["unet_evals"]  # keyframes only
    assert plan["work_units"] == plan["predicted_work_units"]
    stages = {s["stage"] for s in plan["stages"]}
    assert {"pose", "motion", "render", "diffusion", "upscale", "interpolate", "encode"} <= stages
    assert plan["gpu_seconds"] == 0 and plan["cpu_seconds"] > 0  # CPU-only run, honestly
    assert report["ratios"]["work_units"] > 5 and report["ratios"]["dollars_spot"] > 1

    # Consistency of the delivered video: chunks of 16 generated frames at 12 fps, mapped by
    # time onto the 25 fps output (24 generated frames: one boundary). Measured, not billed.
    section = report["consistency"]
    assert section["settings"] == {"chunk_frames": 16, "generation_fps": 12.0,
                                   "working_width": 256}  # fmt: skip
    remeasured = measure_video(out, ConsistencySettings(**section["settings"]))
    assert section["output"] == remeasured.model_dump(mode="json")  # the delivered bytes
    figures = section["output"]
    assert figures["frames"] == 50 and figures["boundaries"] == 1
    assert figures["warp_error"] > 0 and figures["seam_ratio"] > 0
    assert not section["cache_hit"] and section["cpu_s"] > 0
    assert "consistency" not in stages
    assert f"seam ratio {figures['seam_ratio']:.2f}" in format_report(report)


def test_repeat_costs_no_diffusion(short_clip, app_args, tmp_path):
    asyncio.run(edit_video(short_clip, tmp_path / "a.mp4", request(), app_args))
    report = asyncio.run(edit_video(short_clip, tmp_path / "b.mp4", request(), app_args))
    plan = report["plan"]
    assert plan["work_units"]["unet_evals"] == 0 and plan["gpu_seconds"] == 0
    assert not any(s["stage"] == "diffusion" for s in plan["stages"])
    segments = [s for s in plan["stages"] if s["stage"] == "segment"]
    assert segments and segments[0]["cache_hits"] == segments[0]["calls"] == 2
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert report["consistency"]["cache_hit"]  # same result bytes: measured once


def test_new_prompt_reuses_pose_and_motion(short_clip, app_args, tmp_path):
    asyncio.run(edit_video(short_clip, tmp_path / "a.mp4", request(), app_args))
    other = request().model_copy(update={"prompt": "an astronaut dancing"})
    report = asyncio.run(edit_video(short_clip, tmp_path / "b.mp4", other, app_args))
    hits = {s["stage"]: s["cache_hits"] for s in report["plan"]["stages"]}
    assert hits["pose"] == 1 and hits["motion"] == 1 and hits["diffusion"] == 0
    assert report["plan"]["work_units"]["unet_evals"] > 0


def test_edit_with_anchor_attention_counts_what_it_predicts(short_clip, app_args, tmp_path):
    chunk = 8  # three chunks, each anchored on the job's keyframe (frame 0 generated first)
    job = request(anchor="first_keyframe", chunk_frames=chunk)
    report = asyncio.run(edit_video(short_clip, tmp_path / "anchored.mp4", job, app_args))
    plan = report["plan"]
    units = plan["work_units"]
    assert plan["generated_frames"] == 24 + 1  # + the keyframe
    # the keyframe's row, the frames' and one anchor row per chunk and step (x2: CFG)
    assert units["unet_evals"] == (1 + 24 + 3) * 4 * 2
    assert units["vae_encodes"] == 3  # each chunk encodes the keyframe image
    assert units["anchor_attention_evals"] == 24 * 4 * 2
    assert plan["work_units"] == plan["predicted_work_units"]
    assert any("anchor attention" in line for line in report["plan_explained"])


def test_edit_with_a_reference_image_counts_what_it_predicts_and_repeats_free(
    short_clip, app_args, tmp_path
):
    import numpy as np
    from PIL import Image

    def image(name: str, seed: int):
        pixels = np.random.default_rng(seed).integers(0, 256, (120, 90, 3), dtype=np.uint8)
        path = tmp_path / name
        Image.fromarray(pixels).save(path)
        return path

    job = request(chunk_frames=8)  # no anchor override: the reference turns it on
    first = image("a.png", 1)
    report = asyncio.run(edit_video(short_clip, tmp_path / "a.mp4", job, app_args, reference=first))
    plan = report["plan"]
    units = plan["work_units"]
    assert plan["generated_frames"] == 24 + 1  # + the keyframe, anchored on the reference
    # keyframe: its row and its reference's; chunks: their frames and one keyframe row each
    assert units["unet_evals"] == (2 + 24 + 3) * 4 * 2
    assert units["vae_encodes"] == 1 + 3 and units["vae_encode_units"] > 0
    assert units["anchor_attention_evals"] == (1 + 24) * 4 * 2
    assert plan["work_units"] == plan["predicted_work_units"]
    assert any("anchor attention (reference" in line for line in report["plan_explained"])
    # the same bytes under another name: a full cache hit, the same video
    copy = tmp_path / "copy.png"
    copy.write_bytes(first.read_bytes())
    again = asyncio.run(edit_video(short_clip, tmp_path / "b.mp4", job, app_args, reference=copy))
    assert again["plan"]["work_units"]["unet_evals"] == 0
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    # another reference: every chunk is generated again, and the video differs
    other = image("other.png", 2)
    changed = asyncio.run(
        edit_video(short_clip, tmp_path / "c.mp4", job, app_args, reference=other)
    )
    assert changed["plan"]["work_units"]["vae_encodes"] == 1 + 3
    assert changed["plan"]["work_units"] == changed["plan"]["predicted_work_units"]
    assert (tmp_path / "a.mp4").read_bytes() != (tmp_path / "c.mp4").read_bytes()
