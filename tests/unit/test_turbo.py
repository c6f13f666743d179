"""The `turbo` preset and LoRAs on the request side (serve/loras.py, serve/planning.py): named
LoRAs resolved into the plan with their digests, unknown names and bad files refused before any
GPU work, and turbo refused without a few-step model, with the reason."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments import diffusion as d
from deployments.diffusion import SD15_MODEL_WEIGHTS
from deployments.diffusion.lora import LoraSource
from deployments.errors import InvalidSettingError
from deployments.tiny_models import build_tiny_lora
from serve.config import AppArgs
from serve.cost import predict_generation_units
from serve.loras import check_app_loras, lora_sources
from serve.pipeline import Plan, make_plan
from serve.planning import estimate, plan_for
from serve.presets import PRESETS
from serve.schemas import JobRequest


class Info:
    width, height = 640, 360


@pytest.fixture(scope="module")
def lora_file(tiny_sd, tmp_path_factory):
    return build_tiny_lora(tiny_sd.path, tmp_path_factory.mktemp("lora") / "lcm", seed=1)


def app(lora_file=None, few_step: bool = True, **fields) -> AppArgs:
    loras = {}
    if lora_file is not None:
        loras = {"lcm": LoraSource(uri=str(lora_file), few_step=few_step)}
        loras["style"] = LoraSource(uri=str(lora_file.parent))
    return AppArgs(loras=loras, **fields)


def plan(args: AppArgs, preset: str | None = "turbo", **overrides) -> Plan:
    request = JobRequest(prompt="a robot", preset=preset, overrides=overrides)
    return Plan.model_validate(plan_for(args, request, Info()))


def test_turbo_is_few_step_without_cfg_and_otherwise_standard():
    turbo, standard = PRESETS["turbo"], PRESETS["standard"]
    assert (turbo.steps, turbo.scheduler, turbo.guidance_scale) == (6, "lcm", 1.0)
    assert turbo.few_step and not standard.few_step
    same = {"generation_long_side", "generation_fps", "controlnet_every", "output_long_side"}
    assert {k: getattr(turbo, k) for k in same} == {k: getattr(standard, k) for k in same}


def test_turbo_without_a_few_step_model_is_refused_with_the_reason(lora_file):
    for args in (app(), app(lora_file, few_step=False)):
        with pytest.raises(InvalidSettingError, match="6 steps of a plain SD 1.5 produce mush"):
            plan(args)
    # The estimate (POST /v1/estimate) refuses it the same way, before any GPU work.
    with pytest.raises(InvalidSettingError, match="few-step LoRA"):
        estimate(app(), JobRequest(prompt="x", preset="turbo"), 2.0, 640, 360)


def test_turbo_fuses_the_configured_few_step_lora(lora_file):
    turbo = plan(app(lora_file))
    g = turbo.generation
    assert [(lora.name, lora.scale) for lora in g.loras] == [("lcm", 1.0)]
    assert len(g.loras[0].digest) == 16 and not g.cfg and g.steps == 6
    assert "LoRA fused: lcm x1" in turbo.explain()[1] and "CFG off" in turbo.explain()[1]
    # A request's own LoRAs join it; naming the few-step LoRA itself sets its scale.
    both = plan(app(lora_file), loras=[{"name": "style", "scale": 0.5}]).generation.loras
    assert [(lora.name, lora.scale) for lora in both] == [("lcm", 1.0), ("style", 0.5)]
    own = plan(app(lora_file), loras=[{"name": "lcm", "scale": 0.8}]).generation.loras
    assert [(lora.name, lora.scale) for lora in own] == [("lcm", 0.8)]


def test_a_few_step_base_model_runs_turbo_without_a_lora():
    turbo = plan(app(base_model_few_step=True))
    assert turbo.generation.loras == () and turbo.generation.scheduler == "lcm"


def test_loras_on_other_presets_and_unchanged_keys_without(lora_file):
    args = app(lora_file)
    plain = plan(args, "standard")
    assert "loras" not in plain.generation.model_dump()  # keys of LoRA-free jobs unchanged
    assert plain.generation == plan(app(), "standard").generation
    styled = plan(args, "standard", loras=[{"name": "style"}])
    assert styled.generation.loras[0].name == "style"
    assert styled.generation.batch_key() != plain.generation.batch_key()


def test_unknown_or_malformed_loras_are_422_listing_the_configured_ones(lora_file):
    with pytest.raises(InvalidSettingError, match=r"unknown LoRA\(s\) \['nope'\]; configured: "):
        plan(app(lora_file), "standard", loras=[{"name": "nope"}])
    with pytest.raises(InvalidSettingError, match="configured: \\['lcm', 'style'\\]"):
        plan(app(lora_file), "standard", loras=[{"name": "nope"}])
    with pytest.raises(InvalidSettingError, match="invalid loras entry"):
        plan(app(lora_file), "standard", loras=[{"name": "lcm", "digest": "mine"}])
    with pytest.raises(InvalidSettingError, match="invalid loras entry"):
        plan(app(lora_file), "standard", loras=[{"name": "lcm", "scale": 9}])
    with pytest.raises(InvalidSettingError, match="must be a list"):
        plan(app(lora_file), "standard", loras="lcm")


def test_turbo_costs_what_standard_costs_without_cfg_and_with_a_third_of_the_steps():
    """A fused LoRA adds no work; turbo's units are standard's at 6/18 steps and no CFG half."""
    turbo = make_plan("turbo", 1920, 1080, model_id="tiny")
    standard = make_plan("standard", 1920, 1080, model_id="tiny")  # the same coherence
    assert turbo.generation.anchor == standard.generation.anchor == "first_keyframe"
    frames = 120
    units = {
        name: predict_generation_units(p.generation, frames, p.chunk_frames, SD15_MODEL_WEIGHTS)
        for name, p in (("turbo", turbo), ("standard", standard))
    }
    assert units["turbo"].unet_evals * 6 == units["standard"].unet_evals
    assert units["turbo"].controlnet_evals * 6 == units["standard"].controlnet_evals
    assert units["turbo"].vae_decodes == units["standard"].vae_decodes


def test_app_config_refuses_bad_loras_at_start(lora_file, tmp_path):
    with pytest.raises(ValidationError, match="not in allowed_input_buckets"):
        AppArgs(loras={"x": LoraSource(uri="s3://foreign/lora.safetensors")})
    AppArgs(
        loras={"x": LoraSource(uri="s3://models/lora.safetensors")},
        allowed_input_buckets=["models"],
    )
    with pytest.raises(ValidationError, match="fits only base_model 'tiny'"):
        AppArgs(base_model="/models/sd15", loras={"x": LoraSource(uri="tiny")})
    with pytest.raises(ValidationError, match="must match"):
        AppArgs(loras={"a b": LoraSource(uri=str(lora_file))})
    pickled = tmp_path / "lora.ckpt"
    pickled.write_bytes(b"not weights")
    with pytest.raises(InvalidSettingError, match="not a .safetensors file"):
        check_app_loras(AppArgs(loras={"bad": LoraSource(uri=str(pickled))}))
    check_app_loras(app(lora_file))  # the good ones pass, checked against the tiny UNet


def test_the_tiny_lora_scheme_builds_a_lora_that_fits_the_tiny_model():
    args = AppArgs(loras={"lcm": LoraSource(uri="tiny", few_step=True)})
    check_app_loras(args)
    path = lora_sources(args)["lcm"].uri
    assert path.endswith("lora-seed1")
    assert plan(args).generation.loras[0].name == "lcm"


def test_turbo_work_units_counted_equal_predicted_at_the_engine(lora_engine_turbo):
    engine, turbo = lora_engine_turbo
    # CFG off is what this counts; anchor attention is counted in test_diffusion.py
    settings = turbo.generation.model_copy(
        update={"width": 64, "height": 64, "precision": "fp32", "anchor": "off"}
    )
    from tests.unit.test_diffusion import pose_maps

    request = d.ChunkRequest(
        job_id="j", chunk_index=0, prompt="x", seed=1, control_images=pose_maps(5),
        settings=settings,
    )  # fmt: skip
    result = engine.generate([request])[0]
    assert result.work_units == d.predict_chunk_units(settings, 5, engine.model_weights)
    assert result.work_units.unet_evals == 5 * 6  # one row per frame and step: CFG is off


@pytest.fixture
def lora_engine_turbo(tiny_sd, lora_file, tmp_path):
    from deployments.model_loading import tiny_sd_controlnet_sources

    args = app(lora_file)
    base, controlnet = tiny_sd_controlnet_sources(tiny_sd.path)
    config = d.EngineConfig(
        model_id="tiny",
        base=base,
        controlnet=controlnet,
        device="cpu",
        cache_dir=tmp_path,
        loras=lora_sources(args),
    )
    return d.DiffusionEngine(config), plan(args)
