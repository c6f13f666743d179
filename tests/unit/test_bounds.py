"""What validation accepts can finish: output fps, sizes, durations and retimed frame counts are
bounded at submission (a 422 that states the range), low frame rates make valid MP4s, and
POST /v1/estimate answers no 5xx for any body its schema admits."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess

import httpx
import pytest
from pydantic import ValidationError

from deployments.errors import InvalidSettingError
from serve import cli
from serve.api import create_api
from serve.auth import Authenticator
from serve.config import AppArgs
from serve.jobs import JobService, JobStore
from serve.local_run import edit_video
from serve.pipeline import make_plan
from serve.planning import estimate
from serve.schemas import JobRequest, OutputSpec
from serve.storage import LocalStore
from tests.conftest import FAST_OVERRIDES
from tests.media import make_clip

ISSUE_BODY = {"duration_s": 10, "width": 340, "height": 256,
              "request": {"prompt": "x", "output": {"fps": 1e-10}}}  # fmt: skip


@pytest.mark.parametrize("fps", [0, 1e-10, 0.001, 0.5, 0.999, 60.001, 1000])
def test_output_fps_outside_1_to_60_is_refused_with_the_range(fps):
    with pytest.raises(ValidationError, match="output fps must be from 1 to 60"):
        OutputSpec(fps=fps)


@pytest.mark.parametrize(
    "size, message",
    [
        ({"width": 63}, "output width must be from 64 to 3840"),
        ({"height": 3841}, "output height must be from 64 to 3840"),
        ({"width": 3840, "height": 3840}, "at most 8294400"),
    ],
)
def test_output_sizes_outside_the_box_are_refused_with_the_range(size, message):
    with pytest.raises(ValidationError, match=message):
        OutputSpec(**size)


def test_portrait_4k_and_the_edges_are_accepted():
    assert OutputSpec(width=2160, height=3840, fps=1).fps == 1
    assert OutputSpec(width=64, height=64, fps=60).width == 64


@pytest.mark.parametrize(
    "source, kwargs, message",
    [
        ((1920, 1080), {"output_width": 64}, "output would be 64x36"),  # height from aspect
        ((1080, 1920), {"output_height": 3840}, "output would be 2160x3840"),  # allowed: 4K
        ((4000, 100), {"output_height": 2000}, "too narrow"),  # generation side under 64
        ((640, 360), {"overrides": {"output_long_side": 8000}}, "output would be 8000x4500"),
        ((640, 360), {"overrides": {"output_fps": 0.5}}, "output fps must be from 1 to 60"),
        ((640, 360), {"overrides": {"generation_fps": 1e-300}}, "generation_fps must be from"),
        ((640, 360), {"overrides": {"steps": "many"}}, "invalid override: steps"),
        ((640, 360), {"styles": ["retime=0.2", "retime=0.4"]}, "at most 10x"),
    ],
)
def test_plans_the_pipeline_could_not_deliver_are_refused(source, kwargs, message):
    if message.endswith("2160x3840"):  # the one that fits: portrait 4K is a valid output
        plan = make_plan("draft", *source, model_id="tiny", **kwargs)
        assert (plan.output_width, plan.output_height) == (2160, 3840)
        return
    with pytest.raises(InvalidSettingError, match=message):
        make_plan("draft", *source, model_id="tiny", **kwargs)


def test_an_estimate_counts_the_frames_after_retiming():
    args = AppArgs(default_preset="draft")  # no anchor keyframe: the edited frames alone
    plain = estimate(args, JobRequest(prompt="x"), 10, 640, 360)
    slow = estimate(args, JobRequest(prompt="x", styles=["retime=0.5"]), 10, 640, 360)
    fast = estimate(args, JobRequest(prompt="x", styles=["retime=10", "retime=10"]), 10, 640, 360)
    assert plain["plan"]["generated_frames"] == 120
    assert slow["plan"]["generated_frames"] == 240
    assert fast["plan"]["generated_frames"] == 1


# --- HTTP: the API over a real JobService and the real planner ------------------------------------


def api_service(tmp_path, args: AppArgs) -> JobService:
    from serve.planning import plan_for

    store = LocalStore(tmp_path / "store")
    return JobService(
        JobStore(store),
        orchestrator=None,
        limits=args.input_limits(),
        allowed_input_buckets=[],
        max_active_jobs=2,
        probe=lambda path, digest: pytest.fail("a request refused by its body is never probed"),
        plan_for=lambda request, info, reference=False: plan_for(args, request, info, reference),
        estimate=lambda request, duration, w, h: estimate(args, request, duration, w, h),
        fetch_s3=lambda uri, dest: None,
    )


async def post_all(tmp_path, bodies: list, args: AppArgs | None = None, path="/v1/estimate"):
    api = create_api(api_service(tmp_path, args or AppArgs()), Authenticator([]))
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [await client.post(path, content=json.dumps(body),
                                  headers={"content-type": "application/json"})
                for body in bodies]  # fmt: skip


def test_the_issue_estimate_is_a_422_that_states_the_range(tmp_path):
    (response,) = asyncio.run(post_all(tmp_path, [ISSUE_BODY]))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "output fps must be from 1 to 60" in error["message"]


def test_estimate_edge_cases(tmp_path):
    base = {"width": 640, "height": 360, "request": {"prompt": "x"}}
    bodies = [
        {**base, "duration_s": 1e-9},  # one frame
        {**base, "duration_s": 600},  # the default limit
        {**base, "duration_s": 601},  # beyond it
        {**base, "duration_s": 10, "width": 1, "height": 16384},
        {**base, "duration_s": 10, "width": 16384, "height": 16384},
        {**base, "duration_s": 10, "request": {"prompt": "x", "output": {"fps": 1}}},
        {**base, "duration_s": 10, "request": {"prompt": "x", "output": {"fps": 60}}},
        {**base, "duration_s": 10, "request": {"prompt": "x", "overrides": {"chunk_frames": 1}}},
    ]
    statuses = [r.status_code for r in asyncio.run(post_all(tmp_path, bodies))]
    assert statuses == [200, 200, 422, 422, 422, 200, 200, 200]


def random_number(rng: random.Random, low: float, high: float, integer: bool):
    """A value in [low, high], often on or next to an edge."""
    pick = rng.random()
    if pick < 0.15:
        value = low
    elif pick < 0.3:
        value = high
    elif pick < 0.4:
        value = low + (high - low) * 1e-9
    else:
        value = rng.uniform(low, high) if rng.random() < 0.5 else low * (high / max(low, 1e-12))
        value = min(high, max(low, value if rng.random() < 0.5 else rng.uniform(low, high)))
    return max(int(low), min(int(high), round(value))) if integer else value


OVERRIDE_VALUES = [0, 1, -1, 2, 7, 8, 16, 64, 255, 256, 10**9, 0.5, 1e-300, 1e300, -3.5, "",
                   "abc", None, True, [], {}, "fp32", "lcm", "dpmpp_2m", 25.0, 60, 61]  # fmt: skip
OVERRIDE_KEYS = ["generation_long_side", "generation_fps", "steps", "scheduler", "precision",
                 "controlnet_every", "output_long_side", "output_fps", "batching", "cache",
                 "chunk_frames", "guidance_scale", "control_guidance_start",
                 "control_guidance_end", "controlnet_conditioning_scale", "unknown"]  # fmt: skip
STYLES = ["smooth", "smooth=savgol", "smooth:method=savgol,window=9", "exaggerate=1.3",
          "exaggerate=0", "mirror", "stabilize=2", "retime=0.1", "retime=0.5", "retime=10",
          "retime=2", "nonsense", "retime=0"]  # fmt: skip


VALID_STYLES = [s for s in STYLES if s not in ("nonsense", "retime=0", "exaggerate=0")]
VALID_OVERRIDES = {"steps": [1, 4, 20], "chunk_frames": [1, 16, 256], "output_fps": [1, 60],
                   "generation_fps": [1, 12, 60], "scheduler": ["lcm", "dpmpp_2m"]}  # fmt: skip


def random_estimate_body(rng: random.Random) -> dict:
    """A body within EstimateRequest's schema (values on its edges included): half of them
    anywhere in it, half in the region a real input and request live in."""
    wild = rng.random() < 0.5
    output = {}
    if rng.random() < 0.7:
        output["fps"] = random_number(rng, 1, 60, integer=False)
    if rng.random() < (0.4 if wild else 0.1):
        output["width"] = random_number(rng, 64, 3840, integer=True)
    if rng.random() < (0.4 if wild else 0.1):
        output["height"] = random_number(rng, 64, 3840, integer=True)
    if rng.random() < 0.2:
        output["keep_audio"] = rng.random() < 0.5
    if wild:
        overrides = {
            rng.choice(OVERRIDE_KEYS): rng.choice(OVERRIDE_VALUES) for _ in range(rng.randint(0, 3))
        }
        styles = rng.sample(STYLES, rng.randint(0, 4))
        preset = rng.choice([None, "draft", "standard", "high", "naive", "ultra"])
        duration = random_number(rng, 1e-9, 3600, integer=False)
        width = random_number(rng, 1, 16384, integer=True)
        height = random_number(rng, 1, 16384, integer=True)
    else:
        keys = rng.sample(sorted(VALID_OVERRIDES), rng.randint(0, 2))
        overrides = {key: rng.choice(VALID_OVERRIDES[key]) for key in keys}
        styles = rng.sample(VALID_STYLES, rng.randint(0, 2))
        preset = rng.choice([None, "draft", "standard", "high"])
        duration = random_number(rng, 1e-9, 600, integer=False)
        width = random_number(rng, 64, 3840, integer=True)
        height = max(64, min(2160, round(width * rng.uniform(0.3, 1.8))))
    request = {
        "prompt": "p" * rng.randint(1, 1000),
        "styles": styles,
        "preset": preset,
        "seed": rng.choice([None, 0, 2**32 - 1]),
        "output": output,
        "overrides": overrides,
    }
    return {"duration_s": duration, "width": width, "height": height, "request": request}


def test_estimate_answers_no_5xx_for_any_body_its_schema_admits(tmp_path):
    rng = random.Random(19)
    bodies = [random_estimate_body(rng) for _ in range(1000)]
    responses = asyncio.run(post_all(tmp_path, bodies))
    failures = [(b, r.status_code, r.text[:200]) for b, r in zip(bodies, responses, strict=True)
                if r.status_code not in (200, 422)]  # fmt: skip
    assert not failures, failures[:3]
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) > 100 and statuses.count(422) > 100  # both sides exercised
    for response in responses:
        if response.status_code == 422:
            assert response.json()["error"]["message"]


def test_a_job_with_output_fps_below_1_is_refused_before_any_work(tmp_path):
    video = make_clip(tmp_path / "clip.mp4", fps=25, frames=10)
    api = create_api(api_service(tmp_path, AppArgs()), Authenticator([]))

    async def submit():
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            request = {"prompt": "x", "output": {"fps": 0.5}}
            return await client.post(
                "/v1/jobs",
                files={"video": ("clip.mp4", video.read_bytes(), "video/mp4")},
                data={"request": json.dumps(request)},
            )

    response = asyncio.run(submit())
    assert response.status_code == 422
    assert "output fps must be from 1 to 60" in response.json()["error"]["message"]


# --- The pipeline at the low end: valid MP4s ------------------------------------------------------


def ffprobe_video(path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
         "stream=codec_name,width,height,r_frame_rate,nb_read_frames", "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)["streams"][0]


@pytest.mark.parametrize(
    "fps, styles, overrides, frames",
    [
        # 70 frames at 25 fps = 2.8 s: 34 generated frames at 12 fps, chunks of 16, 16 and 2;
        # at 1 fps the last chunk holds no output frame (it crashed the job before).
        (1, ["smooth"], {}, 3),
        # chunks of one generated frame: most hold no output frame at 1 fps
        (1, ["smooth"], {"chunk_frames": 1}, 3),
        # sped up 100x: one generated frame, one output frame
        (1, ["retime=10", "retime=10"], {}, 1),
        (60, ["smooth"], {}, 170),
    ],
)
def test_low_and_high_output_fps_make_valid_mp4s(tmp_path, fps, styles, overrides, frames):
    video = make_clip(tmp_path / "clip.mp4", fps=25, frames=70)
    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    request = JobRequest(
        prompt="x",
        preset="draft",
        seed=1,
        styles=styles,
        overrides={**FAST_OVERRIDES, **overrides},
        output={"fps": fps},
    )
    asyncio.run(edit_video(video, tmp_path / "out.mp4", request, args))
    stream = ffprobe_video(tmp_path / "out.mp4")
    assert stream["codec_name"] == "h264"
    assert stream["r_frame_rate"] == f"{fps}/1"
    assert int(stream["nb_read_frames"]) == frames


# --- The command line: one line, exit 2 -----------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["estimate", "{video}", "--output", "@0.5"],
        ["estimate", "{video}", "--output", "8x8"],
        ["edit", "{video}", "-o", "{out}", "--prompt", "x", "--fps", "0.001"],
        ["submit", "{video}", "--prompt", "x", "--fps", "1e-10", "--url", "http://127.0.0.1:9"],
    ],
)
def test_the_cli_refuses_out_of_range_output_in_one_line(tmp_path, capsys, argv):
    video = make_clip(tmp_path / "clip.mp4", fps=25, frames=10)
    argv = [a.format(video=video, out=tmp_path / "out.mp4") for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "must be from" in err, err
    assert not (tmp_path / "out.mp4").exists()
