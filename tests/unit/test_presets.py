"""Presets' coherence (issue 15, item 5): standard and high anchor every job and make its chunks
seamless by default, draft and naive do neither; a request switches each with `coherence`, and
`coherence_overrides` settles switches, field overrides and a reference image in one order.
Plans without coherence keep the content keys they had; the work is counted as predicted."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.errors import InvalidSettingError
from serve.chunks import ChunkSpec
from serve.cli import _job_request, build_parser
from serve.config import AppArgs
from serve.local_run import edit_video
from serve.pipeline import coherence_overrides, make_plan
from serve.presets import PRESETS
from serve.schemas import Coherence, JobRequest
from serve.stages import generation_key, job_keys, segment_key
from tests.conftest import FAST_OVERRIDES

OFF = Coherence(anchor=False, seamless=False)
ON = Coherence(anchor=True, seamless=True)


def levers(preset: str, overrides=None, coherence=None, reference=None) -> tuple:
    """(anchor, anchor_pool or None, noise, chunk_overlap) of the plan."""
    plan = make_plan(preset, 640, 360, model_id="tiny", overrides=overrides,
                     coherence=coherence, reference=reference)  # fmt: skip
    g = plan.generation
    return g.anchor, g.anchor_pool if g.anchor != "off" else None, plan.noise, plan.chunk_overlap


def test_presets_coherence_defaults():
    assert levers("draft") == ("off", None, "per_chunk", 0)
    assert levers("naive") == ("off", None, "per_chunk", 0)
    assert levers("standard") == ("first_keyframe", 4, "job_windows", 0)
    assert levers("high") == ("first_keyframe", 2, "job_windows", 1)


def test_switches_turn_each_part_off_and_on():
    assert levers("standard", coherence=OFF) == ("off", None, "per_chunk", 0)
    assert levers("high", coherence=OFF) == ("off", None, "per_chunk", 0)
    assert levers("high", coherence=Coherence(anchor=False)) == ("off", None, "job_windows", 1)
    assert levers("high", coherence=Coherence(seamless=False)) == (
        "first_keyframe", 2, "per_chunk", 0)  # fmt: skip
    # switched on where the preset leaves it off: the engine's default pool, no overlap
    assert levers("draft", coherence=ON) == ("first_keyframe", 2, "job_windows", 0)
    assert levers("standard", coherence=Coherence()) == levers("standard")  # None: the preset's


def test_precedence_overrides_then_switches_then_reference_then_preset():
    # a reference turns the anchor on (draft) or becomes it (standard) ...
    assert levers("draft", reference=True)[0] == "reference"
    assert levers("standard", reference=True)[:2] == ("reference", 4)
    assert levers("standard", coherence=ON, reference=True)[0] == "reference"
    # ... unless a switch turns the anchor off, or an override names another anchor
    assert levers("standard", coherence=OFF, reference=True)[0] == "off"
    assert levers("standard", {"anchor": "first_keyframe"}, reference=True)[0] == "first_keyframe"
    # field overrides beat the switches, field by field
    assert levers("standard", {"anchor": "first_keyframe"}, OFF) == (
        "first_keyframe", 4, "per_chunk", 0)  # fmt: skip
    assert levers("draft", {"anchor_pool": 3}, ON)[:2] == ("first_keyframe", 3)
    assert levers("standard", {"noise": "per_chunk"}, ON)[2:] == ("per_chunk", 0)
    assert levers("high", {"noise": "per_chunk"}) == ("first_keyframe", 2, "per_chunk", 0)
    assert levers("high", {"chunk_overlap": 3}) == ("first_keyframe", 2, "job_windows", 3)
    assert levers("draft", {"noise": "job_windows", "chunk_overlap": 2}, OFF)[2:] == (
        "job_windows", 2)  # fmt: skip
    with pytest.raises(InvalidSettingError, match="needs a reference image"):
        levers("draft", {"anchor": "reference"}, reference=False)
    # the function itself leaves the request's dict alone
    overrides = {"steps": 4}
    resolved = coherence_overrides(PRESETS["standard"], overrides, None, None)
    assert overrides == {"steps": 4} and resolved["anchor"] == "first_keyframe"


def test_coherence_is_not_an_override_and_its_switches_are_checked():
    with pytest.raises(InvalidSettingError, match="unknown override"):
        make_plan("standard", 640, 360, model_id="tiny", overrides={"coherence": {}})
    with pytest.raises(ValidationError):
        JobRequest(prompt="x", coherence={"anchor": False, "motion": True})
    with pytest.raises(ValidationError):
        JobRequest(prompt="x", coherence={"seamless": "sometimes"})
    request = JobRequest.model_validate({"prompt": "x", "coherence": {"anchor": False}})
    assert request.coherence == Coherence(anchor=False, seamless=None)


# --- content keys ---------------------------------------------------------------------------

# Computed with the code before presets had coherence (main at b23abd1), chunk (0, 16) of a
# 640x360 source: (generation key, its segment key with a Lanczos upscaler).
KEYS_BEFORE = {
    "draft": ("122d188aca6766ed3c43cf8537052bcf4d5b7c5d152cb24523a9ef129ce2053f",
              "135908b8bed5e12a6f6a87dc0ba309c07695a7aa23f9d0cc0b3915e6d60e4aac"),
    "standard": ("899c40071413dcd79541e4afa13633038a8e3cc3305cb00eeebbc508964aeed0",
                 "90fa93b31ff1c9d5604dc50007c29b55bc560c44666b8f745f560604ccf9a485"),
    "high": ("22017a902ebaae4ddf2e02c00f50b777b5c41c189d61ca278d8d04af34ca1499",
             "b7262bcf9bebf6c36ebec669239a1260d99f140aeec1e3e30f5f2223ddc53c08"),
    "naive": ("e842c634877d8469c15737e4b109cd867f38261a2a1773851b473be78ea5af28",
              "1e26794705b54de77f5ac24aa7fbf5e5c41bff51e27c08021b57f11ce6e64aee"),
}  # fmt: skip


def chunk_keys(preset: str, coherence=None, overrides=None) -> tuple[str, str]:
    plan = make_plan(preset, 640, 360, model_id="tiny", styles=["smooth"], overrides=overrides,
                     coherence=coherence)  # fmt: skip
    spec = ChunkSpec(job_id="j", chunk_index=2, prompt="a dancer", negative_prompt="blur", seed=7,
                     noise=plan.noise, noise_window=plan.noise_window,
                     noise_sharing=plan.noise_sharing)  # fmt: skip
    keys = job_keys("f" * 64, plan)
    anchor_key = "k" * 64 if plan.generation.anchor != "off" else None  # the keyframe's key
    generated = generation_key(keys, plan, (0, 16), spec.key_fields(), anchor_key)
    return generated, segment_key(plan, generated, None, {"model": "lanczos"})


@pytest.mark.parametrize("preset", list(KEYS_BEFORE))
def test_coherence_off_keeps_the_keys_of_before(preset):
    assert chunk_keys(preset, OFF) == KEYS_BEFORE[preset]
    if preset in ("draft", "naive"):  # nothing to switch off: the defaults are those keys
        assert chunk_keys(preset) == KEYS_BEFORE[preset]


def test_keys_change_where_a_switch_changes_the_frames():
    before = KEYS_BEFORE["standard"]
    standard = chunk_keys("standard")
    assert standard[0] != before[0] and standard[1] != before[1]  # anchored frames
    anchor_off = chunk_keys("standard", Coherence(anchor=False))
    # Job noise alone changes no frame at noise sharing 1 with DPM++ 2M (no step noise): the
    # keys stay those of before, and so does the cache.
    assert anchor_off == before
    assert chunk_keys("standard", Coherence(seamless=False)) == standard
    # Where a frame's own noise acts (an ancestral scheduler's step noise, or sharing < 1),
    # the seamless switch changes the key.
    for levers_ in ({"scheduler": "euler_a"}, {"noise_sharing": 0.5}):
        on, off = (chunk_keys("standard", Coherence(anchor=False, seamless=s), levers_)[0]
                   for s in (True, False))  # fmt: skip
        assert on != off, levers_
    # high's overlap: chunk 0 generates what it did, its segment blends into the next one
    high_anchor_off = chunk_keys("high", Coherence(anchor=False))
    assert high_anchor_off[0] == KEYS_BEFORE["high"][0]
    assert high_anchor_off[1] != KEYS_BEFORE["high"][1]
    assert chunk_keys("draft", ON)[0] != KEYS_BEFORE["draft"][0]


# --- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["edit", "submit", "preview", "estimate"])
def test_cli_switches_reach_the_request(command):
    parser = build_parser()
    base = [command, "in.mp4"] + (["-o", "out.mp4"] if command in ("edit", "preview") else [])
    base += ["--prompt", "x"] if command in ("edit", "submit") else []
    default = parser.parse_args(base)
    assert (default.anchor, default.seamless) == (None, None)
    off = parser.parse_args(base + ["--no-anchor", "--seamless"])
    assert (off.anchor, off.seamless) == (False, True)
    if command != "estimate":
        assert _job_request(default).coherence is None  # the body of before the flags
        assert _job_request(off).coherence == Coherence(anchor=False, seamless=True)


def test_cli_estimate_without_coherence_costs_less(sample_video, capsys):
    from serve.cli import main

    def estimate(*flags: str) -> dict:
        import json

        main(["estimate", str(sample_video), "--output", "1920x1080@25", "--json", *flags])
        return json.loads(capsys.readouterr().out)

    coherent, plain = estimate(), estimate("--no-anchor", "--no-seamless")
    assert coherent["plan"]["generated_frames"] == plain["plan"]["generated_frames"] + 1
    overhead = coherent["plan"]["work_units"] / plain["plan"]["work_units"] - 1
    assert 0.05 < overhead <= 0.12 and coherent["ratio"] >= 20
    assert any("anchor attention (first_keyframe, pool 4)" in line
               for line in coherent["plan_explained"])  # fmt: skip
    assert not any("anchor" in line for line in plain["plan_explained"])


# --- jobs: what each combination counts is what it predicts ---------------------------------


def reference_image(path):
    pixels = np.random.default_rng(5).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize(
    ("preset", "coherence", "with_reference", "generated"),
    [
        ("standard", None, False, 24 + 1),  # + the anchor keyframe
        ("high", None, False, 24 + 2 + 1),  # + one overlap frame per later chunk
        ("high", Coherence(seamless=False), True, 24 + 1),
        ("standard", OFF, False, 24),
        ("draft", ON, False, 24 + 1),
    ],
)
def test_jobs_count_what_they_predict(
    short_clip, tmp_path, preset, coherence, with_reference, generated
):
    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    # every grid frame, so the counts are the coherence's (standard's motion keyframe density
    # counts what it predicts in tests/unit/test_keyframe_density.py)
    job = JobRequest(prompt="a robot dancing", preset=preset, seed=3, coherence=coherence,
                     overrides={**FAST_OVERRIDES, "chunk_frames": 8,
                                "keyframe_density": "fixed"})  # fmt: skip
    reference = reference_image(tmp_path / "ref.png") if with_reference else None
    report = asyncio.run(
        edit_video(short_clip, tmp_path / "out.mp4", job, args, reference=reference)
    )
    plan = report["plan"]
    assert plan["generated_frames"] == generated
    assert plan["work_units"] == plan["predicted_work_units"]
    anchored = plan["work_units"]["anchor_attention_evals"] > 0
    assert anchored == (generated != 24)
    if with_reference:
        assert any("anchor attention (reference" in line for line in report["plan_explained"])


def test_high_takes_the_motion_module_where_the_app_has_one():
    def module(preset: str, available: bool, coherence=None, overrides=None) -> bool:
        plan = make_plan(preset, 640, 360, model_id="tiny", overrides=overrides,
                         coherence=coherence, motion_module_available=available)  # fmt: skip
        return plan.generation.motion_module

    assert module("high", available=True) and not module("high", available=False)
    assert not module("standard", available=True) and not module("turbo", available=True)
    assert not module("high", True, Coherence(motion_module=False))  # switched off
    assert module("standard", True, Coherence(motion_module=True))  # switched on
    assert not module("high", True, Coherence(motion_module=True), {"motion_module": False})
    # Asked for on an app without one: refused at planning, whichever way it was asked.
    from serve.planning import plan_for

    class Info:
        width, height = 640, 360

    args = AppArgs()
    assert args.motion_module is None
    for request in (
        JobRequest(prompt="x", preset="standard", coherence=Coherence(motion_module=True)),
        JobRequest(prompt="x", preset="draft", overrides={"motion_module": True}),
    ):
        with pytest.raises(InvalidSettingError, match="has none configured"):
            plan_for(args, request, Info())
    plan = plan_for(args, JobRequest(prompt="x", preset="high"), Info())
    assert "motion_module" not in plan["generation"]  # high without one: as before
