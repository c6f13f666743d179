"""Cost model: price table, dollars, work-unit predictions and plan-vs-naive reports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deployments.diffusion import SD15_MODEL_WEIGHTS, predict_chunk_units
from serve import cost
from serve.pipeline import Plan, make_plan
from serve.presets import NAIVE, PRESETS
from serve.schemas import Coherence
from serve.stages import StageRecord

FRAMES = 92  # the 7.7 s sample clip at 12 fps
# The cost model's mechanics on chunks alone (coherence's own costs are tested below and in
# test_presets.py): the standard plan without anchor attention and seamless chunks.
NO_COHERENCE = Coherence(anchor=False, seamless=False)


def naive_plan(plan: Plan) -> Plan:
    """The naive plan for the same input and output as `plan`, built from the one naive preset
    (the cost model's naive side, as a plan a test can compare)."""
    generation = cost.naive_settings(
        plan.generation, plan.output_width, plan.output_height, plan.output_fps
    )
    return plan.model_copy(
        update={
            "preset": "naive",
            "generation": generation,
            "decode": plan.decode.model_copy(
                update={"fps": plan.output_fps, "width": generation.width, "height": None}
            ),
            "batching": NAIVE.batching,
            "cache": NAIVE.cache,
        }
    )


@pytest.fixture(scope="module")
def plan():
    return make_plan("standard", 1768, 994, model_id="tiny", coherence=NO_COHERENCE)


def job_records(
    plan, *, device: str = "cuda:0", seconds_per_unit: float = 0.05, cached_chunks: int = 0
) -> list[StageRecord]:
    """Stage records shaped like a finished job's: CPU stages, and diffusion on `device`."""
    records = [
        StageRecord(stage="pose", cpu_s=12.0, wall_s=12.5, frames=FRAMES),
        StageRecord(stage="motion", cpu_s=0.4, wall_s=0.4, frames=FRAMES),
    ]
    chunks = range(0, FRAMES, plan.chunk_frames)
    for index, start in enumerate(chunks):
        frames = min(plan.chunk_frames, FRAMES - start)
        units = predict_chunk_units(plan.generation, frames)
        seconds = units.total * seconds_per_unit
        on_gpu = device.startswith("cuda")
        records.append(StageRecord(stage="render", chunk=index, cpu_s=0.3, wall_s=0.3))
        if index < cached_chunks:
            records.append(StageRecord(stage="diffusion", chunk=index, cache_hit=True))
        else:
            records.append(
                StageRecord(
                    stage="diffusion",
                    chunk=index,
                    device=device,
                    wall_s=seconds,
                    gpu_s=seconds if on_gpu else 0.0,
                    cpu_s=0.0 if on_gpu else seconds,
                    frames=frames,
                    work_units={**units.model_dump(), "total": units.total},
                )
            )
        records.append(StageRecord(stage="upscale", chunk=index, cpu_s=6.0, wall_s=3.1))
        records.append(StageRecord(stage="interpolate", chunk=index, cpu_s=1.5, wall_s=1.5))
        records.append(StageRecord(stage="encode", chunk=index, cpu_s=0.8, wall_s=0.8))
    return records


# --- prices ---------------------------------------------------------------------------------


def test_price_table_is_well_formed():
    table = cost.DEFAULT_PRICES
    assert {"rtx3060", "rtx3090", "t4", "a10g", "l4", "a100"} <= set(table.hardware)
    for kind, price in table.hardware.items():
        assert 0 < price.spot_gpu_hour < price.on_demand_gpu_hour, kind
        assert "as of" in price.source and any(str(y) in price.source for y in range(2023, 2027))
        assert price.estimate == ("estimate" in price.source), kind
    assert 0 < table.vcpu_spot_hour < table.vcpu_on_demand_hour
    assert "as of" in table.vcpu_source
    for tier in ("local", "dev", "mvp", "scale", "burst"):
        kind, price = table.for_tier(tier)
        assert price is table.hardware[kind]
    with pytest.raises(ValueError, match="unknown tier"):
        table.for_tier("quantum")


def test_price_table_rejects_inconsistent_configuration():
    row = cost.DEFAULT_PRICES.hardware["l4"].model_dump()
    with pytest.raises(ValueError, match="spot price above on-demand"):
        cost.HardwarePrice(**{**row, "spot_gpu_hour": 2.0})
    table = cost.DEFAULT_PRICES.model_dump()
    with pytest.raises(ValueError, match="unknown hardware"):
        cost.PriceTable(**{**table, "tiers": {"dev": "h100"}})
    assert cost.PriceTable.model_validate_json(cost.DEFAULT_PRICES.model_dump_json()).tiers


def test_dollars_scale_with_gpu_fraction_and_spot_is_cheaper():
    price = cost.DEFAULT_PRICES.hardware["a10g"]
    whole = cost.gpu_dollars(3600, price)
    assert whole.on_demand == pytest.approx(price.on_demand_gpu_hour)
    quarter = cost.gpu_dollars(3600, price, gpu_fraction=0.25)
    assert quarter.on_demand == pytest.approx(whole.on_demand / 4)
    assert quarter.spot == pytest.approx(whole.spot / 4)
    assert whole.spot < whole.on_demand
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="gpu_fraction"):
            cost.gpu_dollars(1.0, price, gpu_fraction=bad)
    vcpu = cost.cpu_dollars(7200)
    assert vcpu.on_demand == pytest.approx(2 * cost.DEFAULT_PRICES.vcpu_on_demand_hour)
    assert vcpu.spot < vcpu.on_demand


# --- predictions ----------------------------------------------------------------------------


def test_generation_units_sum_chunks_with_their_own_keyframes(plan):
    settings = plan.generation  # controlnet_every=4, chunks of 16
    units = cost.predict_generation_units(settings, FRAMES, plan.chunk_frames)
    chunks = [predict_chunk_units(settings, n) for n in (16, 16, 16, 16, 16, 12)]
    assert units.total == pytest.approx(sum(c.total for c in chunks))
    assert units.unet_evals == FRAMES * settings.steps * 2
    # Per chunk: keyframes 0, 4, 8, 12 and the last frame.
    assert units.controlnet_evals == (5 * 5 + 4) * settings.steps * 2
    every_frame = settings.model_copy(update={"controlnet_every": 1})
    whole = cost.predict_generation_units(every_frame, FRAMES, FRAMES)
    chunked = cost.predict_generation_units(every_frame, FRAMES, plan.chunk_frames)
    assert whole.controlnet_evals == chunked.controlnet_evals == FRAMES * settings.steps * 2
    assert whole.total == pytest.approx(chunked.total)


def test_naive_settings_follow_the_design_and_the_pipeline(plan):
    naive = cost.naive_settings(
        plan.generation, plan.output_width, plan.output_height, plan.output_fps
    )
    assert (naive.width, naive.height, naive.fps) == (1920, 1080, 25.0)
    assert (naive.steps, naive.precision, naive.controlnet_every) == (30, "fp32", 1)
    # One definition: the naive preset's levers, applied to the plan's output by naive_settings,
    # which the naive plan uses too.
    preset = PRESETS["naive"]
    assert (naive.steps, naive.precision, naive.controlnet_every) == (
        preset.steps,
        preset.precision,
        preset.controlnet_every,
    )
    naive_side = naive_plan(plan)
    assert naive == naive_side.generation
    assert (naive_side.batching, naive_side.cache) == (preset.batching, preset.cache)
    assert cost.naive_frame_count(FRAMES, 12.0, 25.0) == 192
    assert cost.naive_frame_count(24, 12.0, 24.0) == 48


def test_report_predicts_with_the_weights_the_engine_counted_with(engine):
    """The demo's request with coherence on (draft, 256 px generation, anchor keyframe) showed
    anchor_attention_units 10.376823 counted vs 10.376824 predicted: the report re-derived the
    models' weights from counts already rounded to 1e-6. The diffusion records now carry the
    engine's weights, and the report predicts with them: equal to the last digit."""
    plan = make_plan(
        "draft", 1280, 720, model_id="tiny", overrides={"generation_long_side": 256},
        coherence=Coherence(anchor=True, seamless=True),
    )  # fmt: skip
    g, weights = plan.generation, engine.model_weights
    assert g.anchor != "off" and (g.width, g.height) == (256, 144) and g.steps > 4  # not FAST
    spans = [(start, min(plan.chunk_frames, FRAMES - start))
             for start in range(0, FRAMES, plan.chunk_frames)]  # fmt: skip
    # What the engine's results carry: the keyframe (its own 1-frame request) and each chunk.
    results = [cost.predict_keyframe_units(g, weights)] + [
        predict_chunk_units(g, frames, weights) for _, frames in spans
    ]
    records = [
        StageRecord(
            stage="diffusion",
            chunk=index,
            device="cuda:0",
            gpu_s=1.0,
            frames=1,
            work_units={**units.model_dump(), "total": units.total},
            model_weights=weights,
        )
        for index, units in enumerate(results)
    ]
    report = cost.build_report(plan, records, frames=FRAMES)
    assert report.plan.work_units.anchor_attention_units > 0
    assert report.plan.work_units == report.plan.predicted_work_units
    # With SD 1.5's formulas instead (what a report without the engine's weights would use),
    # the prediction differs: the weights carried are the ones used.
    sd15 = cost.predict_generation_units(g, FRAMES, plan.chunk_frames, SD15_MODEL_WEIGHTS)
    assert sd15.total != pytest.approx(report.plan.predicted_work_units.total, rel=1e-3)
    # Records without weights (from the cache, or older ledgers) fall back to SD 1.5's.
    bare = [r.model_copy(update={"model_weights": None}) for r in records]
    assert cost.build_report(plan, bare, frames=FRAMES).plan.predicted_work_units == sd15


def test_standard_coherence_on_a_10_s_1080p_clip():
    """Issue 15's budget: the standard preset's anchor attention and seamless chunks add at most
    12% work units to `standard` without them, and `standard` stays >= 20x fewer than naive."""
    width, height, fps = 1920, 1080, 25.0
    args = dict(model_id="tiny", output_width=width, output_height=height, output_fps=fps)
    plain = make_plan("standard", width, height, coherence=NO_COHERENCE, **args)
    coherent = make_plan("standard", width, height, **args)
    g = coherent.generation
    assert (g.anchor, g.anchor_pool, coherent.noise, coherent.chunk_overlap) == (
        "first_keyframe", 4, "job_windows", 0)  # fmt: skip
    assert "anchor attention (first_keyframe, pool 4)" in coherent.explain()[1]
    assert (plain.generation.anchor, plain.noise) == ("off", "per_chunk")
    frames = 120  # 10 s at 12 fps
    without = cost.estimate_plan(plain, frames, tier="scale")
    with_coherence = cost.estimate_plan(coherent, frames, tier="scale")
    overhead = with_coherence.plan.work_units / without.plan.work_units - 1
    print(f"coherence on standard: +{overhead:.2%} work units, x{with_coherence.ratio:.2f} naive")
    assert 0.05 < overhead <= 0.12
    assert with_coherence.naive.work_units == without.naive.work_units  # the baseline has none
    assert with_coherence.ratio >= 20
    assert cost.naive_settings(g, width, height, fps).anchor == "off"


# --- reports --------------------------------------------------------------------------------


def test_naive_plan_costs_more_than_the_plan(plan):
    report = cost.build_report(plan, job_records(plan), frames=FRAMES, tier="scale", attempts=2)
    assert (report.hardware, report.attempts) == ("l4", 2)
    assert report.plan.work_units == report.plan.predicted_work_units  # nothing cached
    assert report.naive.generated_frames == 192 and report.naive.estimated
    assert report.naive.work_units.total > 20 * report.plan.work_units.total
    for side in (report.plan, report.naive):
        assert 0 < side.dollars.spot < side.dollars.on_demand
    assert report.naive.dollars.on_demand > 10 * report.plan.dollars.on_demand
    assert all(r > 1 for r in report.ratios.values()), report.ratios
    plan_stages = {(s.stage, s.device) for s in report.plan.stages}
    assert {("diffusion", "gpu"), ("upscale", "cpu"), ("pose", "cpu")} <= plan_stages
    naive_stages = {s.stage: s.device for s in report.naive.stages}
    assert "upscale" not in naive_stages and "interpolate" not in naive_stages
    assert set(naive_stages.values()) == {"gpu"}  # the naive plan runs everything on the GPU
    diffusion = next(s for s in report.plan.stages if s.stage == "diffusion")
    assert diffusion.calls == 6
    assert diffusion.seconds == pytest.approx(report.plan.work_units.total * 0.05)
    assert report.model_dump(mode="json")["ratios"]


def test_cpu_only_runs_compare_on_the_cpu(plan):
    report = cost.build_report(
        plan, job_records(plan, device="cpu", seconds_per_unit=2.0), frames=FRAMES
    )
    assert report.plan.gpu_seconds == 0 and report.naive.gpu_seconds == 0
    assert report.naive.cpu_seconds > report.plan.cpu_seconds > 0
    naive_diffusion = next(s for s in report.naive.stages if s.stage == "diffusion")
    assert naive_diffusion.seconds == pytest.approx(report.naive.work_units.total * 2.0)


def test_cached_diffusion_costs_nothing_and_naive_uses_the_reference_speed(plan):
    report = cost.build_report(plan, job_records(plan, cached_chunks=6), frames=FRAMES, tier="mvp")
    assert report.plan.work_units.total == 0 and report.plan.gpu_seconds == 0
    assert report.plan.predicted_work_units.total > 0
    reference = cost.DEFAULT_PRICES.hardware["rtx3090"].seconds_per_work_unit
    naive_diffusion = next(s for s in report.naive.stages if s.stage == "diffusion")
    assert naive_diffusion.seconds == pytest.approx(report.naive.work_units.total * reference)
    assert report.ratios["dollars_on_demand"] > 10


def test_estimate_before_running(plan):
    estimate = cost.estimate_plan(plan, FRAMES, tier="dev")
    assert estimate.naive.work_units > estimate.plan.work_units > 0
    assert estimate.ratio == pytest.approx(estimate.naive.work_units / estimate.plan.work_units)
    half = cost.estimate_plan(plan, FRAMES, tier="dev", gpu_fraction=0.5)
    assert half.plan.dollars.on_demand == pytest.approx(estimate.plan.dollars.on_demand / 2)
    assert half.naive.dollars == estimate.naive.dollars
    assert estimate.plan.dollars.spot < estimate.plan.dollars.on_demand
    sd15 = cost.predict_generation_units(plan.generation, FRAMES, plan.chunk_frames)
    assert estimate.plan.work_units == pytest.approx(sd15.total)
    # ControlNet by FLOPs at 512x512 (283.29 / 803.27 GFLOPs), not parameters (0.4203)
    assert SD15_MODEL_WEIGHTS.controlnet_weight == pytest.approx(0.3527, abs=1e-4)


def test_cost_module_imports_without_torch():
    code = "import sys, serve.cost; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
