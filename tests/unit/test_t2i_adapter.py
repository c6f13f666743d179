"""T2I-Adapter conditioning (issue 18 item 3): the tiny adapter, loading, features once per
keyframe per chunk (not per step), equivalence with diffusers' adapter pipeline, work units
predicted == counted, keys, plans and refusals. CPU fp32 with the tiny random-weight SD 1.5
and T2I-Adapter (random weights: mechanism checks, not quality claims)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from deployments import diffusion as d
from deployments.diffusion.t2i_adapter import check_adapter_fits, measure_adapter_formula
from deployments.errors import InvalidSettingError, InvalidWeightsError
from deployments.model_loading import ModelSource, load_t2i_adapter, tiny_sd_controlnet_sources
from deployments.tiny_models import TINY_UNET_CHANNELS, build_tiny_t2i_adapter
from tests.unit.test_diffusion import (
    BATCH_TOLERANCE,
    PIPELINE_TOLERANCE,
    SIDE,
    ForwardCounter,
    pose_maps,
    request,
    settings,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return build_tiny_t2i_adapter(tmp_path_factory.mktemp("tiny-t2i") / "adapter")


@pytest.fixture(scope="module")
def t2i_engine(tiny_sd, adapter_dir, tmp_path_factory) -> d.DiffusionEngine:
    """The tiny models with the tiny T2I-Adapter; 4 frames per forward, so a chunk's
    keyframes and frames take several forwards."""
    base, controlnet = tiny_sd_controlnet_sources(tiny_sd.path)
    config = d.EngineConfig(
        model_id="tiny",
        base=base,
        controlnet=controlnet,
        t2i_adapter=ModelSource(uri=str(adapter_dir)),
        device="cpu",
        max_frames_per_forward=4,
        cache_dir=tmp_path_factory.mktemp("t2i-cache"),
    )
    engine = d.DiffusionEngine(config)
    engine.load()
    return engine


def adapted(**overrides) -> d.GenerationSettings:
    return settings(**{"conditioner": "t2i_adapter", **overrides})


# --- the tiny adapter and its loader ------------------------------------------------------------


def test_tiny_adapter_has_the_openpose_layout_and_is_deterministic(adapter_dir, tmp_path):
    loaded = load_t2i_adapter(ModelSource(uri=str(adapter_dir)), dtype=torch.float32,
                              cache_dir=tmp_path)  # fmt: skip
    config = loaded.config
    assert config.adapter_type == "full_adapter" and config.in_channels == 3
    assert tuple(config.channels) == TINY_UNET_CHANNELS and config.downscale_factor == 8
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    def digest(directory: Path) -> str:
        return hashlib.sha256(
            (directory / "diffusion_pytorch_model.safetensors").read_bytes()
        ).hexdigest()

    again = build_tiny_t2i_adapter(tmp_path / "again")
    other = build_tiny_t2i_adapter(tmp_path / "other", seed=1)
    assert digest(again) == digest(adapter_dir) != digest(other)


def test_loader_refuses_what_is_not_a_t2i_adapter_in_one_line(tiny_sd, tmp_path):
    single = tmp_path / "adapter.safetensors"
    single.write_bytes(b"\0" * 64)
    cases = {
        str(tmp_path / "missing" / "adapter"): "does not exist",
        str(single): "single checkpoint file",
        str(tiny_sd.path / "vae"): "not a loadable T2I-Adapter",  # another model's weights
    }
    for uri, reason in cases.items():
        with pytest.raises(InvalidWeightsError) as caught:
            load_t2i_adapter(ModelSource(uri=uri), dtype=torch.float32, cache_dir=tmp_path)
        message = str(caught.value)
        assert len(message.splitlines()) == 1 and uri in message and reason in message, message


def test_an_adapter_for_another_unet_is_refused(t2i_engine, tmp_path):
    from diffusers import T2IAdapter

    wrong = T2IAdapter(channels=(32, 64, 64, 64), num_res_blocks=1)
    with pytest.raises(InvalidWeightsError, match="does not fit this UNet"):
        check_adapter_fits(wrong, t2i_engine._modules.unet)
    check_adapter_fits(t2i_engine._adapter, t2i_engine._modules.unet)  # the tiny one fits


# --- the loop -----------------------------------------------------------------------------------


def test_every_frame_adapter_matches_diffusers_adapter_pipeline(t2i_engine, tiny_sd):
    """controlnet_every=1 and the default control window: what StableDiffusionAdapterPipeline
    computes (features once, both CFG halves, added at every step)."""
    from diffusers import StableDiffusionAdapterPipeline

    chunk = request(
        frames=3, noise_sharing=0.6, settings=adapted(controlnet_conditioning_scale=0.8)
    )
    ours = t2i_engine.generate([chunk], frames_dtype="float32")[0]
    modules = t2i_engine._modules
    pipe = StableDiffusionAdapterPipeline(
        vae=modules.vae, text_encoder=modules.text_encoder, tokenizer=modules.tokenizer,
        unet=modules.unet, adapter=t2i_engine._adapter,
        scheduler=d.build_scheduler("dpmpp_2m", modules.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        [chunk.prompt] * chunk.frames,
        # NCHW in [0, 1] as the pipeline makes it from PIL images, but contiguous as the
        # engine's (the pipeline's own is a channels-last view, whose convolutions round
        # differently in the last bits)
        image=torch.from_numpy(chunk.control_images).permute(0, 3, 1, 2).contiguous() / 255.0,
        negative_prompt=[chunk.negative_prompt] * chunk.frames,
        num_inference_steps=chunk.settings.steps,
        guidance_scale=chunk.settings.guidance_scale,
        adapter_conditioning_scale=0.8,
        height=SIDE,
        width=SIDE,
        latents=d.initial_latents(chunk),
        output_type="np",
    ).images
    difference = float(np.abs(theirs - ours.frames).max())
    print(f"max abs difference to diffusers' adapter pipeline {difference:.2e}")
    assert theirs.shape == ours.frames.shape == (3, SIDE, SIDE, 3)
    assert difference <= PIPELINE_TOLERANCE
    assert ours.frames.std() > 0.01


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_adapter_runs_once_per_keyframe_per_chunk_not_per_step(t2i_engine, guidance):
    key = adapted(controlnet_every=3, steps=5, guidance_scale=guidance)
    first = request(7, job_id="a", settings=key)  # keyframes 0, 3, 6
    second = request(5, job_id="b", seed=9, control_images=pose_maps(5, seed=2), settings=key)
    adapter = ForwardCounter(t2i_engine._adapter)
    controlnet = ForwardCounter(t2i_engine._modules.controlnet)
    unet = ForwardCounter(t2i_engine._modules.unet)
    try:
        results = t2i_engine.generate([first, second])
    finally:
        for counter in (adapter, controlnet, unet):
            counter.remove()
    keyframes = [len(d.keyframe_indices(n, 3)) for n in (7, 5)]
    assert keyframes == [3, 3]
    # 6 keyframes in forwards of at most 4: two adapter calls for the whole batch and 5 steps
    assert adapter.rows == sum(keyframes) and adapter.calls == 2
    assert [r.work_units.adapter_evals for r in results] == keyframes
    assert controlnet.rows == 0 and all(r.work_units.controlnet_evals == 0 for r in results)
    passes = 2 if guidance > 1 else 1
    assert unet.rows == (7 + 5) * 5 * passes == sum(r.work_units.unet_evals for r in results)


def test_features_follow_the_pose_maps_and_differ_from_controlnet(t2i_engine):
    def frames(key: d.GenerationSettings, maps_seed: int = 0) -> np.ndarray:
        chunk = request(4, settings=key, control_images=pose_maps(4, seed=maps_seed))
        return t2i_engine.generate([chunk], frames_dtype="float32")[0].frames

    adapter = frames(adapted(controlnet_every=2))
    controlnet = frames(settings(controlnet_every=2))
    other_pose = frames(adapted(controlnet_every=2), maps_seed=5)
    unconditioned = frames(adapted(controlnet_every=2, controlnet_conditioning_scale=0.0))
    for other in (controlnet, other_pose, unconditioned):
        assert float(np.abs(adapter - other).mean()) > 1e-3


def test_interpolated_frames_get_blended_features(t2i_engine, monkeypatch):
    """A frame between two keyframes gets the lerp of their features (the UNet's
    down_intrablock_additional_residuals), the keyframes exactly their own."""
    seen = []

    def capture(module, args, kwargs):
        seen.append([f.clone() for f in kwargs["down_intrablock_additional_residuals"]])

    handle = t2i_engine._modules.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        chunk = request(3, settings=adapted(controlnet_every=2, steps=1, guidance_scale=1.0))
        t2i_engine.generate([chunk])
    finally:
        handle.remove()
    images = torch.from_numpy(chunk.control_images).permute(0, 3, 1, 2).contiguous() / 255.0
    with torch.no_grad():
        keys = t2i_engine._adapter(images[[0, 2]])  # as the engine runs it: keyframes 0 and 2
        own = t2i_engine._adapter(images[[1]])
    assert len(seen) == 1 and len(seen[0]) == len(keys) == 4
    for features, key, middle in zip(seen[0], keys, own, strict=True):
        assert torch.equal(features[0], key[0]) and torch.equal(features[2], key[1])
        assert torch.allclose(features[1], torch.lerp(key[0], key[1], 0.5), atol=1e-6)
        assert not torch.allclose(features[1], middle[0], atol=1e-3)  # not its own features


def test_control_window_applies_to_the_adapter(t2i_engine):
    """Features only inside control_guidance_start/end; none computed (nor counted) when the
    window holds no step."""
    inside = request(3, settings=adapted(steps=4, control_guidance_start=0.5))
    assert t2i_engine.generate([inside])[0].work_units.adapter_evals == 3
    empty = adapted(steps=2, control_guidance_start=0.1, control_guidance_end=0.9)
    assert not any(d.controlnet_active_steps(2, 0.1, 0.9))
    counter = ForwardCounter(t2i_engine._adapter)
    try:
        result = t2i_engine.generate([request(3, settings=empty)])[0]
    finally:
        counter.remove()
    assert counter.rows == 0 == result.work_units.adapter_evals


def test_cancelled_request_leaves_the_features_of_the_others(t2i_engine):
    key = adapted(controlnet_every=2)
    first = request(3, job_id="a", settings=key)
    second = request(5, job_id="b", seed=9, control_images=pose_maps(5, seed=3), settings=key)
    alone = t2i_engine.generate([second], frames_dtype="float32")[0]
    left, stayed = t2i_engine.generate(
        [first, second], frames_dtype="float32", cancelled=lambda step: (0,) if step >= 2 else ()
    )
    assert len(left.frames) == 0 and "cancelled_at_step 2" in left.notes
    assert left.work_units.adapter_evals == 2  # its keyframes, computed before it left
    assert float(np.abs(stayed.frames - alone.frames).max()) <= BATCH_TOLERANCE
    assert stayed.work_units == alone.work_units


@pytest.mark.parametrize(
    ("frames", "overrides"),
    [
        (5, {}),
        (6, {"controlnet_every": 3, "steps": 3}),
        (7, {"controlnet_every": 4, "guidance_scale": 1.0, "scheduler": "unipc"}),
        (
            4,
            {
                "controlnet_every": 2,
                "control_guidance_start": 0.2,
                "control_guidance_end": 0.7,
                "steps": 5,
            },
        ),  # fmt: skip
        (3, {"steps": 2, "control_guidance_start": 0.1, "control_guidance_end": 0.9}),
        (3, {"width": 96, "height": 64, "scheduler": "lcm", "steps": 2}),
    ],
)
def test_counted_units_equal_prediction(t2i_engine, frames, overrides):
    key = adapted(**overrides)
    maps = np.zeros((frames, key.height, key.width, 3), np.uint8)
    maps[:, :, : SIDE // 2] = pose_maps(frames)[:, : key.height, : SIDE // 2]
    chunk = request(frames, settings=key, control_images=maps)
    result = t2i_engine.generate([chunk])[0]
    predicted = d.predict_chunk_units(key, frames, t2i_engine.model_weights)
    assert result.work_units == predicted
    assert predicted.controlnet_evals == 0


def test_anchored_adapter_chunk_counts_as_predicted(t2i_engine):
    from tests.unit.test_diffusion import anchored

    key = adapted(anchor="first_keyframe", controlnet_every=2)
    result = t2i_engine.generate([anchored(4, settings=key)])[0]
    predicted = d.predict_chunk_units(key, 4, t2i_engine.model_weights)
    assert result.work_units == predicted and predicted.adapter_evals == 3
    assert predicted.anchor_attention_evals > 0


def test_predicted_adapter_units_by_hand():
    common = dict(frames=16, steps=18, guidance_scale=7.5, controlnet_every=4,
                  control_guidance_start=0.0, control_guidance_end=1.0,
                  width=768, height=432)  # fmt: skip
    controlnet = d.predict_work_units(**common)
    adapter = d.predict_work_units(**common, conditioner="t2i_adapter")
    assert controlnet.controlnet_evals == 5 * 18 * 2 and controlnet.adapter_evals == 0
    assert adapter.controlnet_evals == 0 and adapter.adapter_evals == 5  # once per keyframe
    weights = d.SD15_MODEL_WEIGHTS
    one = weights.units(d.SD15_ADAPTER_FLOPS, 768, 432)  # one pose map at 768x432
    assert adapter.adapter_units == pytest.approx(5 * one, abs=1e-6)
    assert one == pytest.approx(weights.adapter_weight * 96 * 54 / 4096, rel=0.02)  # ~ area
    assert adapter.unet_units == controlnet.unet_units and adapter.vae_units == controlnet.vae_units
    saved = controlnet.total - adapter.total
    assert saved == pytest.approx(controlnet.controlnet_units - adapter.adapter_units)


def test_sd15_adapter_formula_matches_the_architecture(tmp_path):
    """SD15_ADAPTER_FLOPS: TencentARC's openpose full_adapter, fitted on the meta device (no
    memory, nothing computed) over SD 1.5's UNet levels; 0.0746 units at 512x512."""
    from diffusers import T2IAdapter, UNet2DConditionModel

    from benchmarks.sd15_random import SD15_ADAPTER, SD15_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        adapter = T2IAdapter(**SD15_ADAPTER)
    assert sum(p.numel() for p in adapter.parameters()) == 77_369_280
    assert measure_adapter_formula(adapter, unet, tmp_path) == d.SD15_ADAPTER_FLOPS
    assert d.SD15_MODEL_WEIGHTS.adapter == d.SD15_ADAPTER_FLOPS
    assert d.SD15_MODEL_WEIGHTS.adapter_weight == pytest.approx(0.074563, abs=1e-6)
    with torch.device("meta"), torch.no_grad():  # a held-out shape (1080p is fitted)
        from deployments.diffusion.flops import count_flops

        counted = count_flops(lambda: adapter(torch.zeros(1, 3, 8 * 61, 8 * 37)))
    assert d.SD15_ADAPTER_FLOPS.flops(61, 37) == counted


# --- keys, refusals -----------------------------------------------------------------------------


def test_conditioner_is_a_key_field_only_when_it_is_the_adapter():
    plain = settings()
    assert "conditioner" not in plain.model_dump()
    assert plain.batch_key() == settings(conditioner="controlnet").batch_key()
    adapter = adapted()
    assert adapter.model_dump()["conditioner"] == "t2i_adapter"
    assert adapter.batch_key() != plain.batch_key()
    assert d.GenerationSettings.model_fields["conditioner"].description


def test_adapter_requests_are_refused_where_none_is_configured(engine):
    with pytest.raises(InvalidSettingError, match="has none configured"):
        engine.generate([request(3, settings=adapted())])
    with pytest.raises(InvalidSettingError, match="cannot run with the motion module"):
        adapted(motion_module=True)


# --- plans, reports, the command line -----------------------------------------------------------


class _Info:
    width, height = 640, 360


def test_plan_takes_the_conditioner_override_and_refuses_it_without_an_adapter():
    from serve.config import AppArgs
    from serve.pipeline import Plan
    from serve.planning import plan_for
    from serve.schemas import JobRequest

    asked = JobRequest(prompt="a dancer", overrides={"conditioner": "t2i_adapter"})
    with pytest.raises(InvalidSettingError) as refused:
        plan_for(AppArgs(), asked, _Info())
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "t2i_adapter" in message and "none" in message
    plan = Plan.model_validate(plan_for(AppArgs(t2i_adapter="tiny"), asked, _Info()))
    assert plan.generation.conditioner == "t2i_adapter"
    assert any("T2I-Adapter (once per keyframe per chunk)" in line for line in plan.explain())
    plain = Plan.model_validate(plan_for(AppArgs(t2i_adapter="tiny"),
                                         JobRequest(prompt="a dancer"), _Info()))  # fmt: skip
    assert plain.generation.conditioner == "controlnet"  # configured is not on: the preset's
    # high's motion module (where configured) yields to the adapter instead of refusing the job
    high = JobRequest(prompt="a dancer", preset="high", overrides={"conditioner": "t2i_adapter"})
    both = AppArgs(t2i_adapter="tiny", motion_module="tiny")
    generation = Plan.model_validate(plan_for(both, high, _Info())).generation
    assert generation.conditioner == "t2i_adapter" and not generation.motion_module
    asked_both = JobRequest(
        prompt="a dancer", overrides={"conditioner": "t2i_adapter", "motion_module": True}
    )
    with pytest.raises(InvalidSettingError, match="cannot run with the motion module"):
        plan_for(both, asked_both, _Info())


def test_adapter_plan_estimate_and_report_count_what_they_predict():
    from serve import cost
    from serve.pipeline import make_plan
    from tests.unit.test_cost import FRAMES, NO_COHERENCE, job_records

    controlnet = make_plan("standard", 1768, 994, model_id="tiny", coherence=NO_COHERENCE)
    adapter = make_plan("standard", 1768, 994, model_id="tiny", coherence=NO_COHERENCE,
                        overrides={"conditioner": "t2i_adapter"})  # fmt: skip
    report = cost.build_report(adapter, job_records(adapter), frames=FRAMES, tier="scale")
    assert report.plan.work_units == report.plan.predicted_work_units
    assert report.plan.work_units.adapter_evals > 0 == report.plan.work_units.controlnet_evals
    before = cost.build_report(controlnet, job_records(controlnet), frames=FRAMES, tier="scale")
    # naive: ControlNet on every frame either way (its weight recovered from the units there)
    assert report.naive.work_units.controlnet_evals == before.naive.work_units.controlnet_evals
    assert report.naive.work_units.total == pytest.approx(before.naive.work_units.total)
    assert report.plan.work_units.total < before.plan.work_units.total
    estimate = cost.estimate_plan(adapter, FRAMES)
    assert estimate.plan.work_units == pytest.approx(report.plan.work_units.total)


def test_report_predicts_with_the_adapter_formula_the_engine_counted_with(t2i_engine):
    """The diffusion records carry the engine's weights (the tiny adapter's formula, not SD
    1.5's): the report's prediction of a T2I-Adapter job equals its counted units."""
    from serve import cost
    from serve.stages import StageRecord

    key = adapted(width=96, height=64, controlnet_every=2, steps=2)
    weights = t2i_engine.model_weights
    assert weights.adapter != d.SD15_ADAPTER_FLOPS
    records = []
    for index, frames in enumerate((4, 4, 3)):
        maps = np.zeros((frames, 64, 96, 3), np.uint8)
        chunk = request(frames, settings=key, control_images=maps, chunk_index=index)
        result = t2i_engine.generate([chunk])[0]
        assert result.model_weights == weights
        records.append(StageRecord(stage="diffusion", chunk=index, device="cpu", frames=frames,
                                   work_units=result.work_units.model_dump(),
                                   model_weights=result.model_weights))  # fmt: skip
    plan = type("Plan", (), {"generation": key, "chunk_frames": 4, "output_width": 192,
                             "output_height": 128, "output_fps": 24.0})()  # fmt: skip
    report = cost.build_report(plan, records, frames=11)
    assert report.plan.work_units == report.plan.predicted_work_units
    assert report.plan.work_units.adapter_evals == 3 + 3 + 2


def test_cli_refuses_the_adapter_without_one_in_one_line(tmp_path, capsys, short_clip):
    from serve.cli import main

    code = main(["estimate", str(short_clip), "--conditioner", "t2i_adapter"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "t2i_adapter" in err
    bad = tmp_path / "adapter"
    bad.mkdir()
    output = tmp_path / "out.mp4"
    code = main(["edit", str(short_clip), "-o", str(output), "--prompt", "x",
                 "--t2i-adapter", str(bad)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "T2I-Adapter" in err and str(bad) in err
    assert not output.exists()
    assert main(["estimate", str(short_clip), "--conditioner", "controlnet"]) in (0, None)
