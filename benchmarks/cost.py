"""Cost of a 10 s clip at 1080p25: the draft, standard and high plans against the naive one.

The clip: the real sample video scaled to 1920x1080 and played forward then backward to 10 s
(`benchmarks.fixtures.make_1080p_clip`, cached outside git), edited to a 1920x1080 25 fps
output. What is measured and what is predicted:

- Runs (measured): each plan goes through the real pipeline (`serve.local_run.edit_video`,
  tiny random-weight SD 1.5 + ControlNet, Real-ESRGAN Compact, all on this CPU) with the
  plan's fps, steps, scheduler, ControlNet interval and output, but generating at 128 px long
  side (override `generation_long_side`) to stay bounded on 2 cores. Each run gives the
  diffusion work it counted (checked equal to the formula at the run's size) and the CPU
  seconds of every CPU-side stage. A repeat of the standard run measures the cache.
- Full size (predicted, exact): work units at each plan's real generation size (512/768 px)
  with SD 1.5's model weights, by the formula the diffusion loop counts with
  (`serve.cost.estimate_plan`); GPU seconds = units x the tier's reference seconds per unit
  from the price table (`serve.cost.DEFAULT_PRICES`; estimates, no GPU here).
- CPU-side seconds at full size: the runs' measured seconds, except the upscale (run again on a
  few frames at the plan's real generation size: measured CPU seconds per frame x frames) and
  the optical flow of the interpolation (measured per pair at both sizes; the difference is
  added). With `--seconds` below 10 the run covers the clip's first seconds and the measured
  seconds are scaled to 10 s (linear in frames).
- Naive: never run at 1080p (30 steps on 250 frames at 1920x1080 would take hours on a CPU).
  Predicted at full size; a scaled-down naive run (128 px, first `--naive-seconds`) checks
  that the loop counts exactly what the formula predicts. Naive runs every stage on the GPU
  machine, so its CPU-side stages are billed at the GPU price (as `serve/cost.py` does).
- Coherence (issue 15): `standard` and `high` use anchor attention and seamless chunks by
  default (`serve.presets`). The plan table holds `standard_no_coherence` (the standard plan
  with both switched off, as it was before) beside `standard`, each run at the run size so the
  loop's count is checked against the formula for both, and the extra split into the anchor
  keyframe, the anchor passes and the wider attention. The `coherence` section lists full-size
  work units of each coherence setting on the standard plan (none, anchor only, seamless
  only, the preset's, anchor pool 2, an overlap frame, high's settings) and of `high` with and
  without its own, beside the issue's budget (anchor attention plus seamless chunks at most
  +12% over `standard` without them; `standard` >= 20x fewer units than naive). The unit tests
  run jobs of every combination and check the loop counts what the formula predicts
  (tests/unit/test_presets.py, tests/unit/test_seamless.py).
- Motion module (issue 15): `standard` and `high` with the AnimateDiff motion module
  (`motion_module: true`) as rows beside them (`motion_module`): full-size work units by the
  same formula (SD 1.5 + AnimateDiff v1-5-2 weights, from FLOP counts:
  benchmarks/diffusion_units.py --motion-module), overhead and ratio to naive. Predicted
  only: tests/unit/test_motion_module.py checks the loop counts what the formula predicts.
- Turbo (issue 18): the `turbo` plan (6 LCM steps with a fused few-step LoRA, CFG off) as a row
  of its own (`turbo`): full-size work units by the same formula and its ratio to naive; and
  its two levers on top of `standard` without coherence (turbo has none), alone and stacked
  (`turbo_levers`). A fused LoRA adds no
  per-step work (it is merged into the UNet weights), so the LoRA itself is no lever in units.
  Predicted only here: the unit tests run turbo settings through the engine with a tiny
  few-step LoRA and check counted == predicted (tests/unit/test_turbo.py, test_lora.py).
- T2I-Adapter (issue 18, item 3; `conditioner`): every preset with `conditioner: t2i_adapter`
  beside its ControlNet self: full-size work units by the same formula (SD 1.5 openpose
  adapter, 0.0746 of a UNet evaluation per keyframe per chunk, from FLOP counts), saving and
  ratio to naive (naive keeps ControlNet on every frame), and the levers stacked on standard
  (`+ T2I-Adapter`, then turbo's steps and CFG). Predicted only here: the unit tests run the
  adapter through the engine and check counted == predicted (tests/unit/test_t2i_adapter.py).
- Motion keyframe density (issue 18, item 4; `density`): `standard` (and `turbo`) generate a
  chunk at 6 fps where the edited skeleton moves slowly (deployments/density.py, threshold from
  benchmarks/keyframe_density.py). Its full-size rows take the schedule the service computes on
  the clip at the plan's real generation size (decode at 12 fps and 768x432, MediaPipe pose,
  `smooth`, `stages.keyframe_schedule`): work units with it, against the same plan at the full
  rate, the ratio to naive (the issue asks >= 32x for `standard`) and the share of the clip
  judged slow. A run at the run size (`standard_density`, the threshold scaled by run size /
  full size, since the speeds are pixels at the generation size) checks that the loop counts
  what the report predicts from its schedule. The other runs pin `keyframe_density: fixed`, so
  their figures stay comparable with earlier results (the `standard` row is the standard plan
  at the full rate, as an estimate without the skeleton predicts it). `--density-only`
  computes this section alone and writes it into the existing result.
- Levers: each alone on top of naive and cumulatively (micro-batching, 12 fps + interpolation,
  768 px + upscaling, 18 steps, fp16, keyframe ControlNet, cache), beside the figure each was
  expected to give. Work units are exact for the levers that change work; micro-batching's
  factor comes from `benchmarks/results/batching.json` (the diffusion engine, tiny models on
  CPU); fp16 needs a GPU: measured (peak VRAM and seconds per unit, SD 1.5-size random weights)
  only where CUDA is available, else "not measured: no GPU".

    python -m benchmarks.cost [--quick] [--seconds 10] [--plans draft standard high]
    python -m benchmarks.cost --density-only [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import machine_label, results_dir, write_json
from benchmarks.peer import format_summary as format_peer
from benchmarks.peer import summary as peer_summary
from deployments.diffusion.work_units import WorkUnits
from serve.cost import savings_ratio
from serve.presets import NAIVE_SKIPS
from serve.schemas import Coherence

NO_COHERENCE = Coherence(anchor=False, seamless=False)

CLIP_SECONDS = 10.0
OUTPUT = (1920, 1080, 25.0)
PLANS = ("draft", "standard", "high")
NO_COHERENCE_ROW = "standard_no_coherence"  # standard with its coherence switched off
COHERENCE_BUDGET_PCT = 12.0  # issue 15: anchor attention + seamless chunks over `standard`
# Rows of the coherence section: (preset, coherence switches, field overrides). None: the
# preset's own coherence; {} switches nothing.
COHERENCE_ROWS: dict[str, tuple[str, dict | None, dict]] = {
    "no coherence": ("standard", {"anchor": False, "seamless": False}, {}),
    "anchor only (pool 4)": ("standard", {"seamless": False}, {}),
    "seamless only (job noise)": ("standard", {"anchor": False}, {}),
    "standard: anchor pool 4 + job noise": ("standard", None, {}),
    "anchor pool 2 + job noise": ("standard", None, {"anchor_pool": 2}),
    "pool 4 + job noise + 1 overlap": ("standard", None, {"chunk_overlap": 1}),
    "high's: pool 2 + job noise + 1 overlap": ("standard", None,
                                               {"anchor_pool": 2, "chunk_overlap": 1}),
    "high, no coherence": ("high", {"anchor": False, "seamless": False}, {}),
    "high (its coherence)": ("high", None, {}),
}  # fmt: skip
TURBO_ROW = "turbo"  # issue 18: few-step LoRA + CFG off, otherwise standard
DENSITY_ROW = "standard_density"  # standard's motion keyframe density, run at the run size
DENSITY_MIN_RATIO = 32.0  # issue 18: standard with motion density >= 32x fewer units than naive
FIXED_DENSITY = {"keyframe_density": "fixed"}  # the runs compared with earlier results
TURBO_MIN_RATIO = 120.0  # issue 18: turbo at least 120x fewer work units than naive
RUN_LONG_SIDE = 128  # generation size of the runs (16:9 -> 128x72); full size is predicted
PROMPT = "a robot dancing in a park"
BATCH_FOR_GAIN = 4  # max_batch_size of serve/configs/local.yaml's Diffusion
GPU_CHUNK_FRAMES = 16
GPU_STEPS = 4
# The figures the design was built on (issue 9), shown beside what each lever gives here.
EXPECTED = {
    "batching": "30-45% less GPU time",
    "fps": "~50%",
    "resolution": "none stated",
    "steps": "none stated",
    "fp16": "~45% less VRAM",
    "keyframe": "~40%",
    "coherence": "at most +12% work units (issue 15)",
    "cache": "none stated (a repeat is free)",
    "total": "$0.80 -> $0.15-0.25 per 10 s clip",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n    python")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="make bench: the standard plan only, on the first 4 s (< ~2.5 min)",
    )
    parser.add_argument("--plans", nargs="+", choices=PLANS, help="plans to run (default all)")
    parser.add_argument(
        "--seconds", type=float, help="seconds of the clip each run covers (default 10; quick 4)"
    )
    parser.add_argument(
        "--naive-seconds",
        type=float,
        help="seconds of the clip the scaled-down naive run covers (default 0.8; quick 0.4)",
    )
    parser.add_argument(
        "--long-side",
        type=int,
        default=RUN_LONG_SIDE,
        help=f"generation long side of the runs, px (default {RUN_LONG_SIDE})",
    )
    parser.add_argument(
        "--calibration-frames",
        type=int,
        help="frames upscaled at full generation size per size (default 2; quick 1)",
    )
    parser.add_argument(
        "--tier", default="scale", help="tier of the lever table's dollars (default scale, L4)"
    )
    parser.add_argument("--upscaler", help="upscaler_model (default: the app's, Compact)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the CUDA fp16/fp32 part")
    parser.add_argument(
        "--batching-json",
        type=Path,
        help="results of benchmarks.batching, the micro-batching factor (default: results dir)",
    )
    parser.add_argument(
        "--density-only",
        action="store_true",
        help="only the motion keyframe density section (full-size schedule and its run), "
        "written into the existing result JSON",
    )
    parser.add_argument("--output", type=Path, help="JSON path (default: results dir)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: results dir)")
    args = parser.parse_args(argv)
    args.batching_json = args.batching_json or results_dir() / "batching.json"
    args.output = args.output or results_dir() / "cost.json"
    args.plot = args.plot or results_dir() / "cost.png"
    args.plans = args.plans or (["standard"] if args.quick else list(PLANS))
    args.seconds = args.seconds or (4.0 if args.quick else CLIP_SECONDS)
    args.naive_seconds = args.naive_seconds or (0.4 if args.quick else 0.8)
    args.calibration_frames = args.calibration_frames or (1 if args.quick else 2)
    if "standard" not in args.plans:
        parser.error("--plans must include standard (the cache repeat and the levers use it)")
    if not 0.4 <= args.seconds <= CLIP_SECONDS or not 0.2 <= args.naive_seconds <= CLIP_SECONDS:
        parser.error(f"--seconds and --naive-seconds must be within 0.4..{CLIP_SECONDS:g}")
    if not 112 <= args.long_side <= 1024 or not 1 <= args.calibration_frames <= 8:
        parser.error("--long-side must be 112..1024 (64 px short side), --calibration-frames 1..8")
    if not 1 <= args.threads <= 64:
        parser.error("--threads must be 1..64")
    return args


# --- the clip ---------------------------------------------------------------------------------


def clip_excerpt(clip: Path, seconds: float) -> Path:
    """The first `seconds` of the 1080p30 clip (cached beside it); the clip itself for 10 s."""
    from deployments.video import DecodeSettings, EncodeSettings, decode_chunks, encode_mp4

    if seconds >= CLIP_SECONDS:
        return clip
    target = clip.with_name(f"{clip.stem}-first{seconds:g}s.mp4")
    if not target.exists():
        frames = round(seconds * 30)
        settings = DecodeSettings(fps=30, width=1920, height=1080, max_frames=frames)
        chunks = (chunk.frames for chunk in decode_chunks(clip, settings))
        encode_mp4(chunks, target, EncodeSettings(fps=30, crf=20))
    return target


# --- plans and predictions ----------------------------------------------------------------------


def full_plan(preset: str, overrides: dict | None = None, coherence: Coherence | None = None):
    """The plan for a 1920x1080 source delivered at 1920x1080 25 fps."""
    from serve.pipeline import make_plan

    width, height, fps = OUTPUT
    return make_plan(
        preset,
        width,
        height,
        model_id="tiny",
        output_width=width,
        output_height=height,
        output_fps=fps,
        overrides=overrides,
        coherence=coherence,
    )


def generated_frames(plan, seconds: float = CLIP_SECONDS) -> int:
    from deployments.video import decoded_frame_count

    return decoded_frame_count(seconds, plan.generation.fps)


def full_size_prediction(
    preset: str, overrides: dict | None = None, coherence: Coherence | None = None
) -> dict[str, Any]:
    """Work units (SD 1.5 weights) of a plan on the 10 s clip, and of its naive baseline."""
    from serve.cost import (
        estimate_plan,
        generated_frame_count,
        naive_frame_count,
        naive_settings,
        predict_keyframe_units,
    )
    from serve.cost import predict_generation_units as predict

    plan = full_plan(preset, overrides, coherence)
    g = plan.generation
    frames = generated_frames(plan)
    units = predict(g, frames, plan.chunk_frames, overlap=plan.chunk_overlap)
    naive_gen = naive_settings(g, plan.output_width, plan.output_height, plan.output_fps)
    naive_frames = naive_frame_count(frames, g.fps, plan.output_fps)
    naive_units = predict(naive_gen, naive_frames, plan.chunk_frames)
    estimate = estimate_plan(plan, frames, tier="scale")
    assert math.isclose(estimate.plan.work_units, units.total, rel_tol=1e-9)
    assert math.isclose(estimate.naive.work_units, naive_units.total, rel_tol=1e-9)
    return {
        "generation": f"{g.width}x{g.height}",
        "fps": g.fps,
        "steps": g.steps,
        "controlnet_every": g.controlnet_every,
        "precision": g.precision,
        "anchor": g.anchor,
        "anchor_pool": g.anchor_pool if g.anchor != "off" else None,
        "noise": plan.noise,
        "chunk_overlap": plan.chunk_overlap,
        "generated_frames": generated_frame_count(
            frames, plan.chunk_frames, plan.chunk_overlap, g.anchor != "off"
        ),
        "chunks": math.ceil(frames / plan.chunk_frames),
        "work_units": _units(units),
        "keyframe_units": _units(predict_keyframe_units(g)),
        "naive": {
            "generation": f"{naive_gen.width}x{naive_gen.height}",
            "fps": naive_gen.fps,
            "steps": naive_gen.steps,
            "generated_frames": naive_frames,
            "work_units": _units(naive_units),
        },
        "plan_explained": plan.explain(),
    }


def turbo_levers() -> dict[str, Any]:
    """Turbo's levers on top of the standard plan (10 s clip, full size, SD 1.5 weights): few
    steps (6 LCM steps, which a few-step LoRA makes usable) and CFG off (guidance 1: one UNet
    row per frame and step instead of two), alone and stacked; the stack must reach the turbo
    plan's units exactly, and turbo's ratio to naive is checked against the issue's 120x."""
    from serve.cost import predict_generation_units as predict

    standard, turbo = full_plan("standard"), full_plan(TURBO_ROW)  # the same coherence
    frames = generated_frames(standard)
    g, t = standard.generation, turbo.generation
    levers = [
        (f"{t.steps} {t.scheduler} steps (few-step LoRA)", {"steps": t.steps,
                                                          "scheduler": t.scheduler}),
        ("CFG off (guidance 1.0)", {"guidance_scale": t.guidance_scale}),
    ]  # fmt: skip

    def units(settings) -> float:
        overlap = standard.chunk_overlap
        return predict(settings, frames, standard.chunk_frames, overlap=overlap).total

    base = units(g)
    rows, stacked = [], g
    for label, change in levers:
        alone = units(g.model_copy(update=change))
        stacked = stacked.model_copy(update=change)
        rows.append(
            {
                "lever": label,
                "alone_units": round(alone, 1),
                "alone_saving_pct": _saving(alone, base),
                "stacked_units": round(units(stacked), 1),
                "stacked_saving_pct": _saving(units(stacked), base),
            }
        )
    prediction = full_size_prediction(TURBO_ROW)
    turbo_units = prediction["work_units"]["total"]
    naive_units = prediction["naive"]["work_units"]["total"]
    ratio = naive_units / turbo_units
    return {
        "standard_units": round(base, 1),
        "rows": rows,
        "turbo_units": round(turbo_units, 1),
        # full_size_prediction rounds its units: equal to that rounding
        "stack_reaches_turbo_units": math.isclose(units(stacked), turbo_units, rel_tol=1e-4),
        "ratio_vs_naive": round(ratio, 1),
        "ratio_vs_standard": round(base / turbo_units, 2),
        "meets_120x": ratio >= TURBO_MIN_RATIO,
        "fused_lora_extra_units": 0.0,
        "note": "a fused LoRA is merged into the UNet weights before the batch: a step costs "
        "what a plain UNet step costs (unit tests assert counted == predicted with and without)",
    }


def format_turbo(section: dict[str, Any]) -> str:
    lines = [
        f"turbo on top of standard ({section['standard_units']:.0f} units, 10 s clip, full size)",
        f"{'lever':40} {'alone units':>12} {'alone':>7} {'stacked':>10} {'total':>7}",
    ]
    for row in section["rows"]:
        lines.append(
            f"{row['lever']:40} {row['alone_units']:>12.0f} {row['alone_saving_pct']:>6.1f}% "
            f"{row['stacked_units']:>10.0f} {row['stacked_saving_pct']:>6.1f}%"
        )
    lines.append(
        f"turbo: {section['turbo_units']:.0f} units, {section['ratio_vs_naive']:g}x fewer than "
        f"naive ({section['ratio_vs_standard']:g}x fewer than standard); stack reaches turbo: "
        f"{section['stack_reaches_turbo_units']}; >= 120x: {section['meets_120x']}"
    )
    return "\n".join(lines)


def coherence_rows() -> dict[str, Any]:
    """Each coherence setting's full-size work units: overhead over its preset without
    coherence, ratio to naive, and the issue's budget."""
    plain = {
        preset: full_size_prediction(preset, coherence=NO_COHERENCE)["work_units"]["total"]
        for preset in ("standard", "high")
    }
    rows = []
    for label, (preset, switches, overrides) in COHERENCE_ROWS.items():
        coherence = Coherence(**switches) if switches is not None else None
        predicted = full_size_prediction(preset, overrides, coherence)
        units = predicted["work_units"]["total"]
        overhead = 100.0 * (units / plain[preset] - 1.0)
        rows.append(
            {
                "row": label,
                "preset": preset,
                "coherence": switches,
                "overrides": overrides,
                "anchor_pool": predicted["anchor_pool"],
                "noise": predicted["noise"],
                "chunk_overlap": predicted["chunk_overlap"],
                "generated_frames": predicted["generated_frames"],
                "work_units": predicted["work_units"],
                "overhead_pct": round(overhead, 2),
                "x_naive": _ratio(predicted["naive"]["work_units"]["total"], units),
                "within_budget": overhead <= COHERENCE_BUDGET_PCT,
            }
        )
    by_row = {row["row"]: row for row in rows}
    standard = by_row["standard: anchor pool 4 + job noise"]
    return {
        "standard_units_without": plain["standard"],
        "high_units_without": plain["high"],
        "rows": rows,
        "budget_pct": COHERENCE_BUDGET_PCT,
        "standard_overhead_pct": standard["overhead_pct"],
        "standard_x_naive": standard["x_naive"],
        "budget_met": standard["within_budget"] and standard["x_naive"] >= 20,
        "budget_note": "issue 15: anchor attention plus seamless chunks at most +12% work units "
        "over standard without them; standard >= 20x fewer work units than naive. Job noise is "
        "free; the anchor costs one keyframe per job, one anchor pass per chunk and the wider "
        "attention (1/pool^2); each overlap frame is generated (and billed) by two chunks. "
        "Overheads are over the same preset without coherence",
    }


def motion_module_rows() -> dict[str, Any]:
    """`standard` and `high` with the motion module: full-size work units, overhead over the
    same preset without it, ratio to naive (the naive plan has no motion module)."""
    rows = []
    for preset in ("standard", "high"):
        plain = full_size_prediction(preset)
        predicted = full_size_prediction(preset, {"motion_module": True})
        base, units = plain["work_units"]["total"], predicted["work_units"]["total"]
        naive = predicted["naive"]["work_units"]["total"]
        rows.append(
            {
                "row": f"{preset} + motion module",
                "preset": preset,
                "preset_units": base,
                "preset_x_naive": _ratio(naive, base),
                "work_units": predicted["work_units"],
                "overhead_pct": round(100.0 * (units / base - 1.0), 2),
                "x_naive": _ratio(naive, units),
            }
        )
    return {
        "rows": rows,
        "note": "every UNet evaluation of a chunk's frames (and of its anchor, if any) also "
        "runs the motion module: 0.379 + 0.000119 x F UNet evaluations per frame for a window "
        "of F frames (a chunk; +0.381 at 16), counted with torch's FLOP counter on SD 1.5 + "
        "AnimateDiff v1-5-2; ControlNet and VAE work unchanged",
    }


def conditioner_rows() -> dict[str, Any]:
    """Each preset with the T2I-Adapter instead of ControlNet, and standard's levers stacked:
    the adapter, then turbo's (its plan with the adapter: 6 LCM steps, CFG off)."""
    adapter = {"conditioner": "t2i_adapter"}
    rows = []
    for preset in ("draft", "standard", "high", TURBO_ROW):
        # high's motion module steps aside for the adapter: compare like with like
        plain = full_size_prediction(preset, FIXED_DENSITY)
        predicted = full_size_prediction(preset, {**FIXED_DENSITY, **adapter})
        base, units = plain["work_units"]["total"], predicted["work_units"]["total"]
        naive = predicted["naive"]["work_units"]["total"]
        rows.append(
            {
                "row": f"{preset} + T2I-Adapter",
                "preset": preset,
                "preset_units": base,
                "preset_x_naive": _ratio(naive, base),
                "work_units": predicted["work_units"],
                "saving_pct": round(100.0 * (1.0 - units / base), 2),
                "x_naive": _ratio(naive, units),
            }
        )
    by_preset = {row["preset"]: row for row in rows}
    standard, turbo = by_preset["standard"], by_preset[TURBO_ROW]
    naive = full_size_prediction("standard", FIXED_DENSITY)["naive"]["work_units"]["total"]
    stack = [
        ("standard (ControlNet)", standard["preset_units"]),
        ("+ T2I-Adapter", standard["work_units"]["total"]),
        ("+ 6 LCM steps, CFG off (turbo + T2I-Adapter)", turbo["work_units"]["total"]),
    ]
    return {
        "rows": rows,
        "cumulative": [
            {"step": step, "work_units": units, "x_naive": _ratio(naive, units)}
            for step, units in stack
        ],
        "note": "features computed once per keyframe per chunk (not per step, not per CFG "
        "half), interpolated between keyframes; the SD 1.5 openpose adapter costs 0.0746 of a "
        "UNet evaluation at 512x512 against ControlNet's 0.3527 per step (x2 with CFG). Fixed "
        "keyframe density in every row (motion density judged none of this clip slow)",
    }


def format_conditioner(section: dict[str, Any]) -> str:
    lines = [
        "T2I-Adapter instead of ControlNet, 10 s clip",
        f"{'row':26} {'work units':>10} {'saving':>8} {'x naive':>7} {'preset x naive':>14}",
    ]
    for row in section["rows"]:
        lines.append(
            f"{row['row']:26} {row['work_units']['total']:>10,.0f} {row['saving_pct']:>7.2f}% "
            f"{row['x_naive']:>7} {row['preset_x_naive']:>14}"
        )
    lines.append("levers stacked on standard:")
    for step in section["cumulative"]:
        lines.append(f"  {step['step']:46} {step['work_units']:>10,.0f} {step['x_naive']:>7}x")
    return "\n".join(lines)


def format_motion_module(section: dict[str, Any]) -> str:
    lines = [
        "motion module (AnimateDiff) beside its preset, 10 s clip",
        f"{'row':26} {'work units':>10} {'overhead':>8} {'x naive':>7} {'preset x naive':>14}",
    ]
    for row in section["rows"]:
        lines.append(
            f"{row['row']:26} {row['work_units']['total']:>10,.0f} {row['overhead_pct']:>+7.2f}% "
            f"{row['x_naive']:>7} {row['preset_x_naive']:>14}"
        )
    return "\n".join(lines)


def format_coherence(section: dict[str, Any]) -> str:
    lines = [
        f"coherence, 10 s clip (budget: +{section['budget_pct']:g}% over standard's "
        f"{section['standard_units_without']:,.0f} units without it, >= 20x fewer than naive)",
        f"{'row':40} {'pool':>4} {'noise':>11} {'ovl':>3} {'frames':>6} {'work units':>10} "
        f"{'overhead':>8} {'x naive':>7}",
    ]
    for row in section["rows"]:
        lines.append(
            f"{row['row']:40} {row['anchor_pool'] or '-':>4} {row['noise']:>11} "
            f"{row['chunk_overlap']:>3} {row['generated_frames']:>6} "
            f"{row['work_units']['total']:>10,.0f} {row['overhead_pct']:>+7.2f}% "
            f"{row['x_naive']:>6}x"
        )
    return "\n".join(lines)


def _units(units) -> dict[str, float]:
    return {
        "unet_evals": units.unet_evals,
        "controlnet_evals": units.controlnet_evals,
        "vae_decodes": units.vae_decodes,
        "anchor_attention_evals": units.anchor_attention_evals,
        "anchor_attention_units": round(units.anchor_attention_units, 2),
        "vae_encodes": units.vae_encodes,
        "vae_encode_units": round(units.vae_encode_units, 2),
        "motion_module_evals": units.motion_module_evals,
        "motion_module_units": round(units.motion_module_units + units.motion_attention_units, 2),
        "adapter_evals": units.adapter_evals,
        "adapter_units": round(units.adapter_units, 2),
        "total": round(units.total, 2),
    }


def anchor_overhead(standard: dict[str, Any], anchored: dict[str, Any]) -> dict[str, Any]:
    """What anchor attention adds to a plan's full-size work units (`standard`: without it,
    `anchored`: with it, and no overlap), and where: the job's anchor keyframe (frame 0
    generated once), each chunk's anchor pass (its UNet row per step and the VAE encode of the
    keyframe image) and the wider self-attention (job noise is free)."""
    from deployments.diffusion.work_units import SD15_MODEL_WEIGHTS as weights

    base, with_anchor = standard["work_units"], anchored["work_units"]
    keyframe = anchored["keyframe_units"]
    width, height = map(int, anchored["generation"].split("x"))
    row = weights.units(weights.unet, width, height)  # one UNet row at this size
    chunk_rows = with_anchor["unet_evals"] - base["unet_evals"] - keyframe["unet_evals"]
    encodes = with_anchor["vae_encode_units"] - keyframe["vae_encode_units"]
    wider = with_anchor["anchor_attention_units"] - keyframe["anchor_attention_units"]
    total = base["total"]

    def pct(value: float) -> float:
        return round(100.0 * value / total, 2)

    return {
        "standard_units": total,
        "anchored_units": with_anchor["total"],
        "overhead_pct": pct(with_anchor["total"] - total),
        "keyframe_pct": pct(keyframe["total"]),
        "anchor_pass_pct": pct(chunk_rows * row + encodes),
        "wider_attention_pct": pct(wider),
        "budget_pct": COHERENCE_BUDGET_PCT,
        "budget_note": "issue 15: anchor attention plus seamless chunks at most +12% over "
        "standard without them; standard >= 20x fewer work units than naive",
    }


# --- motion keyframe density --------------------------------------------------------------------


def full_size_schedule(clip: Path, plan):
    """The clip's density schedule as a job of `plan` gets it: the service's own stages (decode
    + pose, the motion edit, `stages.keyframe_schedule`) at the plan's generation fps and size,
    in a scratch cache."""
    from serve import stages
    from serve.cache import hash_file
    from serve.config import AppArgs
    from serve.factory import stage_context

    with tempfile.TemporaryDirectory(prefix="bench-cost-density-") as folder:
        ctx = stage_context(AppArgs(storage_uri=folder))
        keys = stages.job_keys(hash_file(clip), plan)
        stages.extract_pose(ctx, str(clip.resolve()), keys, plan)
        stages.edit_motion(ctx, keys, plan)
        return stages.keyframe_schedule(ctx, keys, plan)


def density_rows(clip: Path) -> dict[str, Any]:
    """`standard` and `turbo` with the clip's motion density schedule against the same plans at
    the full rate (full size, SD 1.5 weights, the 10 s clip)."""
    from serve.cost import estimate_plan

    standard = full_plan("standard")
    schedule = full_size_schedule(clip, standard)
    frames = generated_frames(standard)
    if schedule.frames != frames:
        raise RuntimeError(f"the clip decoded to {schedule.frames} frames, not {frames}")
    rows = []
    for preset in ("standard", TURBO_ROW):
        plan = full_plan(preset)
        scheduled = plan.model_copy(update={"schedule": schedule})
        fixed, dense = (estimate_plan(p, frames, tier="scale") for p in (plan, scheduled))
        rows.append(
            {
                "row": f"{preset} + motion density",
                "preset": preset,
                "fixed_generated_frames": fixed.plan.generated_frames,
                "generated_frames": dense.plan.generated_frames,
                "fixed_units": round(fixed.plan.work_units, 1),
                "work_units": round(dense.plan.work_units, 1),
                "saving_pct": _saving(dense.plan.work_units, fixed.plan.work_units),
                "fixed_x_naive": _ratio(fixed.naive.work_units, fixed.plan.work_units),
                "x_naive": _ratio(dense.naive.work_units, dense.plan.work_units),
                "naive_units": round(dense.naive.work_units, 1),
                "plan_explained": scheduled.explain(),
            }
        )
    standard_row = rows[0]
    needed = slow_fraction_needed(standard, frames, schedule)
    return {
        "schedule": {
            "settings": standard.keyframe_density.model_dump(),
            "strides": list(schedule.strides),
            "chunk_fps": [standard.generation.fps / s for s in schedule.strides],
            "speeds_px_per_frame": [_speed(v) for v in schedule.speeds],
            "slow_fraction": round(schedule.slow_fraction(), 4),
            "generation": f"{standard.generation.width}x{standard.generation.height}",
        },
        "rows": rows,
        "if_slow": needed,
        "target_x_naive": DENSITY_MIN_RATIO,
        "meets_target": (standard_row["x_naive"] or 0) >= DENSITY_MIN_RATIO,
        "lever": {
            "lever": "motion keyframe density (slow chunks at 6 fps)",
            "on": "standard",
            "saving_pct": standard_row["saving_pct"],
        },
    }


def slow_fraction_needed(plan, frames: int, schedule) -> list[dict[str, Any]]:
    """What `plan` would cost on this clip if its first k chunks were slow (6 fps) and the
    rest not, for every k: the share of a clip that must be slow for a ratio to naive."""
    from deployments.density import DensitySchedule
    from serve.cost import estimate_plan

    chunks = len(schedule.strides)
    rows = []
    for slow in range(chunks + 1):
        strides = tuple(2 if c < slow else 1 for c in range(chunks))
        what_if = DensitySchedule(frames=frames, chunk_frames=plan.chunk_frames,
                                  strides=strides, speeds=(0.0,) * chunks)  # fmt: skip
        estimate = estimate_plan(plan.model_copy(update={"schedule": what_if}), frames)
        rows.append(
            {
                "slow_chunks": slow,
                "slow_fraction": round(what_if.slow_fraction(), 3),
                "work_units": round(estimate.plan.work_units, 1),
                "x_naive": _ratio(estimate.naive.work_units, estimate.plan.work_units),
            }
        )
    return rows


def density_run(clip: Path, args, app_args) -> dict[str, Any]:
    """`standard` with motion density at the run size (threshold scaled to it): counted work
    against the report's prediction from its own schedule."""
    from benchmarks.fixtures import warm_models
    from deployments.density import CALIBRATED_MAX_GAP_PX
    from serve.config import AppArgs

    full_long_side = max(_size_of(full_plan("standard")))
    density = {
        "mode": "motion",
        "max_gap_px": CALIBRATED_MAX_GAP_PX * args.long_side / full_long_side,
    }
    excerpt = clip_excerpt(clip, args.seconds)
    with warm_models(app_args), tempfile.TemporaryDirectory(prefix="bench-cost-") as folder:
        plan_args = AppArgs(**{**app_args.model_dump(), "storage_uri": folder})
        request = bench_request("standard", args.long_side, overrides={"keyframe_density": density})
        result = run_plan(excerpt, request, plan_args, args.seconds, "standard, motion density")
    result["keyframe_density"] = density
    return result


def format_density(section: dict[str, Any]) -> str:
    schedule = section["schedule"]
    lines = [
        f"motion keyframe density, 10 s clip ({schedule['generation']}; "
        f"{schedule['slow_fraction']:.0%} of the clip judged slow; strides {schedule['strides']})",
        f"{'row':30} {'frames':>11} {'work units':>17} {'saving':>7} {'x naive':>13}",
    ]
    for row in section["rows"]:
        lines.append(
            f"{row['row']:30} {row['fixed_generated_frames']:>4} -> {row['generated_frames']:<4} "
            f"{row['fixed_units']:>7,.0f} -> {row['work_units']:<7,.0f} "
            f"{row['saving_pct']:>6.1f}% {row['fixed_x_naive']:>5} -> {row['x_naive']:<5}"
        )
    lines.append(
        f">= {section['target_x_naive']:g}x for standard: {section['meets_target']} (motion "
        f"density's own saving: {section['lever']['saving_pct']:.1f}%)"
    )
    if "if_slow" in section:
        cells = ", ".join(
            f"{row['slow_fraction']:.0%}: {row['x_naive']}x" for row in section["if_slow"]
        )
        lines.append(f"standard if this share of the clip were slow: {cells}")
    run = section.get("run")
    if run:
        lines.append(
            f"run at the run size: {run['generated_frames']} frames generated, counted == "
            f"predicted: {run['counted_equals_predicted']}"
        )
    return "\n".join(lines)


def density_only(args) -> dict[str, Any]:
    """The density section alone, merged into the existing result at `args.output`."""
    from benchmarks.common import pin_threads
    from benchmarks.fixtures import make_1080p_clip, quiet_progress_bars
    from serve.config import AppArgs, Settings

    pin_threads(args.threads)
    quiet_progress_bars()
    started = time.perf_counter()
    clip = make_1080p_clip(Settings().cache_dir)
    app_args = AppArgs(
        max_chunks_in_flight=1, **({"upscaler_model": args.upscaler} if args.upscaler else {})
    )
    section = density_rows(clip)
    section["run"] = density_run(clip, args, app_args)
    section["when"] = datetime.now(UTC).isoformat(timespec="seconds")
    section["run_s"] = round(time.perf_counter() - started, 1)
    result = json.loads(args.output.read_text()) if args.output.exists() else {}
    result["density"] = section
    result.setdefault("checks", {}).setdefault("counted_equals_predicted", {})[DENSITY_ROW] = (
        section["run"]["counted_equals_predicted"]
    )
    return result


def _speed(value: float) -> float | str:
    """A chunk speed for JSON: 'inf' where a person appears or vanishes (strict JSON has no
    infinity)."""
    return round(value, 2) if math.isfinite(value) else "inf"


# --- runs ---------------------------------------------------------------------------------------


def bench_request(
    preset: str,
    long_side: int,
    seed: int = 1,
    overrides: dict | None = None,
    coherence: Coherence | None = None,
):
    from serve.schemas import JobRequest, OutputSpec

    width, height, fps = OUTPUT
    return JobRequest(
        prompt=PROMPT,
        negative_prompt="blurry",
        styles=["smooth"],
        preset=preset,
        seed=seed,
        output=OutputSpec(width=width, height=height, fps=fps, keep_audio=False),
        overrides={"generation_long_side": long_side, **FIXED_DENSITY, **(overrides or {})},
        coherence=coherence,
    )


def run_plan(clip: Path, request, args, seconds: float, label: str) -> dict[str, Any]:
    """One `edit_video` job; its measured stages and its counted vs predicted work."""
    from serve.local_run import edit_video

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-cost-out-") as folder:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        report = asyncio.run(edit_video(clip, Path(folder) / "out.mp4", request, args))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    result = summarize_run(report, seconds)
    result.update(
        label=label,
        wall_s=round(wall, 2),
        process_cpu_s=round(cpu, 2),
        load_average_at_start=round(load, 2),
    )
    print(f"  {label}: {wall:.1f} s wall, {cpu:.1f} CPU s, load {load:.1f}", flush=True)
    return result


def summarize_run(report: dict[str, Any], seconds: float) -> dict[str, Any]:
    plan = report["plan"]
    counted, predicted = plan["work_units"], plan["predicted_work_units"]
    count_keys = ("unet_evals", "controlnet_evals", "vae_decodes", "anchor_attention_evals")
    stages: dict[str, dict[str, float]] = {}
    for stage in plan["stages"]:
        entry = stages.setdefault(stage["stage"], {"seconds": 0.0, "calls": 0, "cache_hits": 0})
        entry["seconds"] = round(entry["seconds"] + stage["seconds"], 3)
        entry["calls"] += stage["calls"]
        entry["cache_hits"] += stage["cache_hits"]
    return {
        "seconds_of_clip": seconds,
        "plan_explained": report["plan_explained"],
        "generated_frames": plan["generated_frames"],
        "counted": {k: counted[k] for k in count_keys},
        "predicted": {k: predicted[k] for k in count_keys},
        "counted_equals_predicted": all(counted[k] == predicted[k] for k in count_keys),
        "counted_units_tiny_weights": round(WorkUnits.model_validate(counted).total, 4),
        "stages": stages,
    }


def run_plans(clip: Path, args, app_args) -> dict[str, Any]:
    """Every asked plan (scaled generation size), the cache repeat and the scaled naive run."""
    from benchmarks.fixtures import warm_models
    from serve.config import AppArgs

    runs: dict[str, Any] = {}
    excerpt = clip_excerpt(clip, args.seconds)
    naive_clip = clip_excerpt(clip, args.naive_seconds)
    with warm_models(app_args), tempfile.TemporaryDirectory(prefix="bench-cost-") as folder:
        for preset in args.plans:
            store = Path(folder) / preset
            plan_args = AppArgs(**{**app_args.model_dump(), "storage_uri": str(store)})
            request = bench_request(preset, args.long_side)
            runs[preset] = run_plan(excerpt, request, plan_args, args.seconds, preset)
            if preset == "standard":  # same input, request and store: every stage is a hit
                runs["standard_repeat"] = run_plan(
                    excerpt, request, plan_args, args.seconds, "standard, repeated (cache)"
                )
                plain_args = AppArgs(
                    **{**app_args.model_dump(), "storage_uri": str(Path(folder) / "plain")}
                )
                plain = bench_request(preset, args.long_side, coherence=NO_COHERENCE)
                runs[NO_COHERENCE_ROW] = run_plan(
                    excerpt, plain, plain_args, args.seconds, "standard, no coherence"
                )
        naive_args = AppArgs(**{**app_args.model_dump(), "storage_uri": f"{folder}/naive"})
        request = bench_request("naive", args.long_side)
        runs["naive"] = run_plan(
            naive_clip, request, naive_args, args.naive_seconds, "naive, scaled down"
        )
    return runs


# --- CPU-side seconds at full size --------------------------------------------------------------


def calibrate(clip: Path, app_args, sizes: list[tuple[int, int]], frames: int, long_side: int):
    """CPU seconds per upscaled frame at each full generation size, and the extra flow cost
    per interpolated pair at that size over the run's size (same real frames)."""
    from deployments import interpolate
    from deployments.video import DecodeSettings, decode_all
    from serve.factory import make_upscaler

    upscaler = make_upscaler(app_args)
    upscaler.load()
    backend = interpolate.make_backend(full_plan("standard").interpolation)
    run_size = _fit(long_side)
    out_size = OUTPUT[:2]
    result = {}
    for width, height in sizes:
        settings = DecodeSettings(fps=12, width=width, height=height, max_frames=frames + 1)
        pictures = decode_all(clip, settings)
        upscaler.upscale(pictures[:1], out_size)  # untimed: first call allocates
        cpu0 = time.process_time()
        for picture in pictures[:frames]:
            upscaler.upscale(picture[None], out_size)
        upscale_s = (time.process_time() - cpu0) / frames
        small = decode_all(
            clip, DecodeSettings(fps=12, width=run_size[0], height=run_size[1], max_frames=2)
        )
        flow_full = _flow_seconds(backend, pictures[0], pictures[1])
        flow_run = _flow_seconds(backend, small[0], small[1])
        result[f"{width}x{height}"] = {
            "upscale_cpu_s_per_frame": round(upscale_s, 4),
            "upscale_frames_measured": frames,
            "flow_cpu_s_per_pair": round(flow_full, 5),
            "flow_cpu_s_per_pair_at_run_size": round(flow_run, 5),
        }
        print(
            f"  calibration {width}x{height}: upscale {upscale_s:.2f} CPU s/frame, "
            f"flow {flow_full * 1000:.1f} ms/pair",
            flush=True,
        )
    upscaler.unload()
    return result


def _flow_seconds(backend, frame0, frame1, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        cpu0 = time.process_time()
        backend.estimate(frame0, frame1)
        best = min(best, time.process_time() - cpu0)
    return best


def _fit(long_side: int) -> tuple[int, int]:
    from serve.pipeline import fit_size

    return fit_size(OUTPUT[0], OUTPUT[1], long_side, 8)


def interpolated_pairs(plan, frames: int) -> int:
    """Pairs of generated frames the interpolation estimates a flow for."""
    from deployments.interpolate import output_positions

    positions = output_positions(
        frames, plan.generation.fps, plan.output_fps, plan.interpolation.pad_tail
    )
    return len({index for index, t in positions if t > 0})


def cpu_side_seconds(preset: str, run: dict, calibration: dict | None) -> dict[str, dict]:
    """CPU-side seconds per stage for the 10 s clip at the plan's full generation size.

    Diffusion is left out (it is the GPU's work, priced from work units); naive drops the
    upscale and interpolation it does not have.
    """
    plan = full_plan(preset)
    frames = generated_frames(plan)
    scale = CLIP_SECONDS / run["seconds_of_clip"]
    basis = "measured" if scale == 1 else f"measured on {run['seconds_of_clip']:g} s, x{scale:g}"
    seconds: dict[str, dict] = {}
    for stage, entry in run["stages"].items():
        if stage == "diffusion" or (preset == "naive" and stage in NAIVE_SKIPS):
            continue
        seconds[stage] = {"seconds": round(entry["seconds"] * scale, 3), "basis": basis}
    size = f"{plan.generation.width}x{plan.generation.height}"
    if preset != "naive" and calibration and size in calibration:
        calib = calibration[size]
        upscaled = frames + math.ceil(frames / plan.chunk_frames) - 1  # + next chunk's first
        seconds["upscale"] = {
            "seconds": round(calib["upscale_cpu_s_per_frame"] * upscaled, 3),
            "basis": f"calibrated: {calib['upscale_cpu_s_per_frame']:.3f} CPU s/frame at "
            f"{size} -> 1920x1080 (measured on {calib['upscale_frames_measured']} frame(s)) x "
            f"{upscaled} frames",
            "at_run_size": seconds.get("upscale", {}).get("seconds"),
        }
        pairs = interpolated_pairs(plan, frames)
        extra = max(0.0, calib["flow_cpu_s_per_pair"] - calib["flow_cpu_s_per_pair_at_run_size"])
        measured = seconds.get("interpolate", {}).get("seconds", 0.0)
        seconds["interpolate"] = {
            "seconds": round(measured + extra * pairs, 3),
            "basis": f"{basis}, + flow at {size}: {extra * 1000:.2f} ms/pair x {pairs} pairs "
            "(calibrated)",
            "at_run_size": measured,
        }
    return seconds


# --- dollars ------------------------------------------------------------------------------------


def tier_rows() -> list[tuple[str, str, Any]]:
    """(tier, hardware, price) of every tier but 'local' (priced as dev)."""
    from serve.cost import DEFAULT_PRICES

    return [
        (tier, *DEFAULT_PRICES.for_tier(tier)) for tier in DEFAULT_PRICES.tiers if tier != "local"
    ]


def plan_dollars(units: float, cpu_s: float, price, *, naive: bool) -> dict[str, float]:
    """GPU seconds are predicted (units x the tier's reference s/unit); CPU seconds measured.
    Naive holds the GPU machine for its CPU-side stages too."""
    from serve.cost import cpu_dollars, gpu_dollars

    gpu_s = units * price.seconds_per_work_unit
    if naive:
        dollars = gpu_dollars(gpu_s + cpu_s, price)
    else:
        dollars = gpu_dollars(gpu_s, price) + cpu_dollars(cpu_s)
    return {
        "gpu_s": round(gpu_s, 1),
        "cpu_s": round(cpu_s, 1),
        "spot": round(dollars.spot, 5),
        "on_demand": round(dollars.on_demand, 5),
    }


def price_plans(plans: dict[str, dict]) -> None:
    """Adds `per_tier` dollars and `ratios_vs_naive` to every plan entry (naive included)."""
    for entry in plans.values():
        cpu_s = sum(s["seconds"] for s in entry["cpu_side_seconds"].values())
        entry["cpu_side_total_s"] = round(cpu_s, 2)
        entry["per_tier"] = {
            tier: {
                "hardware": hardware,
                **plan_dollars(
                    entry["work_units"]["total"], cpu_s, price, naive=entry["name"] == "naive"
                ),
            }
            for tier, hardware, price in tier_rows()
        }
    naive = plans["naive"]
    for entry in plans.values():
        entry["ratios_vs_naive"] = {
            "work_units": _ratio(naive["work_units"]["total"], entry["work_units"]["total"]),
            **{
                f"dollars_spot_{tier}": _ratio(naive["per_tier"][tier]["spot"], t["spot"])
                for tier, t in entry["per_tier"].items()
            },
        }


def _ratio(naive: float, plan: float) -> float | None:
    # JSON has no infinity: a side that costs nothing has no ratio here.
    return round(savings_ratio(naive, plan), 2) if plan > 0 else None


# --- levers -------------------------------------------------------------------------------------


def batching_factor(path: Path) -> dict[str, Any]:
    """Seconds per work unit at batch 4 / at batch 1, from benchmarks.batching's engine rows."""
    try:
        data = json.loads(path.read_text())
        rows = {row["batch"]: row for row in data["engine"]["rows"]}
        factor = rows[BATCH_FOR_GAIN]["s_per_unit"] / rows[1]["s_per_unit"]
    except (OSError, KeyError, ValueError, ZeroDivisionError) as exc:
        return {
            "factor": 1.0,
            "measured": False,
            "basis": f"not measured: {path.name} unusable ({type(exc).__name__})",
        }
    engine = data["engine"]
    return {
        "factor": round(factor, 4),
        "measured": True,
        "basis": f"measured: {path.name} ({data.get('when', '?')}), diffusion engine, batch of "
        f"{BATCH_FOR_GAIN} vs 1 chunk, tiny models on CPU {engine.get('precision', 'fp32')} at "
        f"{engine.get('size', '?')}: seconds per unit x{factor:.2f} (a GPU's gain differs)",
    }


def lever_table(fp16: dict[str, Any], batching: dict[str, Any], tier: str) -> dict[str, Any]:
    """Each lever alone on top of naive, and all of them stacked in order, for the standard
    plan's 10 s clip: work units (exact), GPU seconds and dollars at the tier. Coherence is
    the one lever that adds work (the standard preset's anchor; its job noise is free), so
    the stack before the cache reaches the standard plan."""
    from serve.cost import DEFAULT_PRICES, gpu_dollars, naive_settings
    from serve.cost import predict_generation_units as predict

    standard = full_plan("standard")
    g = standard.generation
    width, height, fps = OUTPUT
    naive = naive_settings(g, width, height, fps)
    _, price = DEFAULT_PRICES.for_tier(tier)
    chunk = standard.chunk_frames
    # (label, key, settings changed, time factor, basis); the cache makes a repeat free.
    levers = [
        ("micro-batching (batch of 4)", "batching", {}, batching["factor"], batching["basis"]),
        (f"{g.fps:g} fps + interpolation", "fps", {"fps": g.fps}, 1.0, "exact (work units)"),
        (
            f"{g.width}x{g.height} + upscaling",
            "resolution",
            {"width": g.width, "height": g.height},
            1.0,
            "exact (work units)",
        ),
        (f"{g.steps} steps (15-20)", "steps", {"steps": g.steps}, 1.0, "exact (work units)"),
        ("fp16", "fp16", {"precision": "fp16"}, fp16["time_factor"], fp16["basis"]),
        (
            f"keyframe ControlNet (every {g.controlnet_every}th)",
            "keyframe",
            {"controlnet_every": g.controlnet_every},
            1.0,
            "exact (work units)",
        ),
        (
            f"coherence (anchor pool {g.anchor_pool} + job noise)",
            "coherence",
            {"anchor": g.anchor, "anchor_pool": g.anchor_pool},
            1.0,
            "exact (work units): a cost, not a saving; job noise is free",
        ),
        (
            "cache (repeat of a request)",
            "cache",
            {},
            0.0,
            "exact: a repeat runs no diffusion (measured: the repeat run counted 0 units)",
        ),
    ]

    def cost(settings, factor: float) -> dict[str, float]:
        """Units of the clip at these settings; a factor of 0 is a repeat (no work at all)."""
        frames = math.ceil(CLIP_SECONDS * settings.fps - 1e-6)
        units = predict(settings, frames, chunk).total if factor > 0 else 0.0
        seconds = units * price.seconds_per_work_unit * factor
        dollars = gpu_dollars(seconds, price)
        return {
            "units": round(units, 1),
            "gpu_s": round(seconds, 1),
            "spot": round(dollars.spot, 4),
            "on_demand": round(dollars.on_demand, 4),
        }

    base = cost(naive, 1.0)
    rows, stacked, stacked_factor, previous = [], naive, 1.0, base
    for label, key, change, factor, basis in levers:
        alone = cost(naive.model_copy(update=change), factor)
        stacked = stacked.model_copy(update=change)
        stacked_factor *= factor
        cumulative = cost(stacked, stacked_factor)
        rows.append(
            {
                "lever": label,
                "key": key,
                "expected": EXPECTED[key],
                "basis": basis,
                "alone": {**alone, "saving_pct": _saving(alone["gpu_s"], base["gpu_s"])},
                "cumulative": {
                    **cumulative,
                    "step_saving_pct": _saving(cumulative["gpu_s"], previous["gpu_s"]),
                    "saving_pct": _saving(cumulative["gpu_s"], base["gpu_s"]),
                },
            }
        )
        previous = cumulative
    standard_units = predict(g, generated_frames(standard), chunk).total
    before_cache = rows[-2]["cumulative"]["units"]
    return {
        "tier": tier,
        "hardware": price.gpu,
        "seconds_per_work_unit": price.seconds_per_work_unit,
        "naive": base,
        "rows": rows,
        "stack_reaches_standard_units": math.isclose(before_cache, standard_units, rel_tol=1e-4),
        "note": "dollars here are the diffusion's GPU time only (units x the tier's reference "
        "seconds per unit x the time factors); the plan table adds the CPU-side stages",
    }


def _saving(value: float, reference: float) -> float:
    return round(100.0 * (1.0 - value / reference), 1) if reference else 0.0


# --- fp16 on a GPU ------------------------------------------------------------------------------


def measure_precisions(model_dir: Path, device: str, size: tuple[int, int], steps: int):
    """Peak memory and seconds per work unit of one 16-frame chunk at fp32 and fp16, each on a
    freshly loaded engine. On CUDA the peaks are torch.cuda.max_memory_allocated (weights
    included); on a CPU (a check of this code path) both run fp32 and no peak is read."""
    import numpy as np
    import torch

    from deployments.diffusion import (
        ChunkRequest,
        DiffusionEngine,
        EngineConfig,
        GenerationSettings,
    )
    from deployments.model_loading import tiny_sd_controlnet_sources

    base, controlnet = tiny_sd_controlnet_sources(model_dir)
    cuda = device == "cuda"
    rows = []
    for precision in ("fp32", "fp16"):
        config = EngineConfig(
            model_id="bench",
            base=base,
            controlnet=controlnet,
            device=device,
            precision=precision,
            max_frames_per_forward=GPU_CHUNK_FRAMES,
        )
        engine = DiffusionEngine(config)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        engine.load()
        weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
        settings = GenerationSettings(
            model_id="bench", width=size[0], height=size[1], steps=steps, precision=precision
        )
        maps = np.random.default_rng(0).integers(
            0, 256, (GPU_CHUNK_FRAMES, size[1], size[0], 3), dtype=np.uint8
        )
        request = ChunkRequest(
            job_id="bench",
            chunk_index=0,
            prompt=PROMPT,
            seed=0,
            control_images=maps,
            settings=settings,
        )
        engine.generate([request])  # warm-up: kernels, allocator
        (result,) = engine.generate([request])
        rows.append(
            {
                "precision": result.precision,
                "weights_gib": round(weights_gib, 3) if cuda else None,
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
                "s_per_unit": round(result.device_seconds / result.work_units.total, 5),
            }
        )
        engine.unload()
        del engine
        gc.collect()
    return rows


def fp16_part(args) -> dict[str, Any]:
    """fp16 vs fp32 with an SD 1.5-size random-weight model where CUDA is available."""
    import torch

    if args.no_gpu or not torch.cuda.is_available():
        reason = "--no-gpu" if args.no_gpu else "torch.cuda.is_available() is False (CPU only)"
        return {
            "measured": False,
            "time_factor": 1.0,
            "basis": f"not measured: no GPU ({reason}); expected ~45% less VRAM and faster "
            "steps on tensor cores; taken as x1.0 in the sums",
        }
    from benchmarks.fixtures import build_sd15_random
    from serve.config import Settings
    from serve.factory import ensure_tiny_models

    size = _fit(768)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-cost-sd15-") as scratch,
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", RuntimeWarning)  # NaNs from random fp16 weights
            model_dir = build_sd15_random(
                Path(scratch) / "sd15", ensure_tiny_models(Settings().cache_dir), torch.float16
            )
            rows = measure_precisions(model_dir, "cuda", size, GPU_STEPS)
    except Exception as exc:  # e.g. out of memory at fp32: the CPU results still get written
        return {
            "measured": False,
            "time_factor": 1.0,
            "basis": f"not measured: the GPU run failed ({type(exc).__name__}: {exc})",
        }
    fp32, fp16 = rows
    factor = fp16["s_per_unit"] / fp32["s_per_unit"]
    return {
        "measured": True,
        "device": torch.cuda.get_device_name(),
        "size": f"{size[0]}x{size[1]}",
        "chunk_frames": GPU_CHUNK_FRAMES,
        "steps": GPU_STEPS,
        "rows": rows,
        "vram_saving_pct": _saving(fp16["peak_gib"], fp32["peak_gib"]),
        "time_factor": round(factor, 4),
        "basis": f"measured on {torch.cuda.get_device_name()}: SD 1.5-size random weights, one "
        f"{GPU_CHUNK_FRAMES}-frame chunk at {size[0]}x{size[1]}: seconds per unit x{factor:.2f}, "
        f"peak VRAM {fp16['peak_gib']:.1f} vs {fp32['peak_gib']:.1f} GiB "
        f"({_saving(fp16['peak_gib'], fp32['peak_gib']):.0f}% less)",
    }


# --- the whole benchmark ------------------------------------------------------------------------


def run(args) -> dict[str, Any]:
    import torch

    from benchmarks.common import pin_threads
    from benchmarks.fixtures import machine_info, make_1080p_clip, quiet_progress_bars
    from serve.config import AppArgs, Settings

    pin_threads(args.threads)
    quiet_progress_bars()
    started = time.perf_counter()
    machine = machine_info(args.threads)
    clip = make_1080p_clip(Settings().cache_dir)
    app_args = AppArgs(
        max_chunks_in_flight=1, **({"upscaler_model": args.upscaler} if args.upscaler else {})
    )
    print("full-size CPU calibration", flush=True)
    sizes = sorted({_size_of(full_plan(p)) for p in PLANS}, key=lambda s: s[0] * s[1])
    calibration = calibrate(clip, app_args, sizes, args.calibration_frames, args.long_side)
    print(f"runs (generation at {args.long_side} px long side)", flush=True)
    runs = run_plans(clip, args, app_args)
    plans = {}
    for preset in (*PLANS, "naive"):
        predicted = full_size_prediction(preset if preset != "naive" else "standard")
        work = predicted["naive"]["work_units"] if preset == "naive" else predicted["work_units"]
        source = runs.get(preset) or runs["standard"]
        plans[preset] = {
            "name": preset,
            "ran": preset in runs,
            "cpu_side_from": preset if preset in runs else "standard (not run in this mode)",
            "full_size": predicted["naive"] if preset == "naive" else predicted,
            "work_units": work,
            "cpu_side_seconds": cpu_side_seconds(preset, source, calibration),
        }
        if preset == "standard":  # standard as it was, beside it: what coherence adds
            plain = full_size_prediction("standard", coherence=NO_COHERENCE)
            plans[preset]["anchor"] = anchor_overhead(plain, predicted)
            plans[NO_COHERENCE_ROW] = {
                "name": NO_COHERENCE_ROW,
                "ran": NO_COHERENCE_ROW in runs,
                "cpu_side_from": NO_COHERENCE_ROW if NO_COHERENCE_ROW in runs else "standard",
                "full_size": plain,
                "work_units": plain["work_units"],
                "cpu_side_seconds": cpu_side_seconds(
                    "standard", runs.get(NO_COHERENCE_ROW) or runs["standard"], calibration
                ),
            }
    repeat = runs["standard_repeat"]
    plans["standard_repeat"] = {
        "name": "standard_repeat",
        "ran": True,
        "cpu_side_from": "standard_repeat",
        "full_size": {"note": "every stage a cache hit"},
        "work_units": {**repeat["counted"], "total": repeat["counted_units_tiny_weights"]},
        "cpu_side_seconds": cpu_side_seconds("standard", repeat, None),
    }
    price_plans(plans)
    density = density_rows(clip)
    density["run"] = density_run(clip, args, app_args)
    runs[DENSITY_ROW] = density["run"]
    fp16 = fp16_part(args)
    batching = batching_factor(args.batching_json)
    return {
        "benchmark": "cost",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "default",
        "machine": {**machine, "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "gpu": {"available": fp16["measured"], "note": fp16["basis"]},
        "clip": f"{clip.name}: the sample video at 1920x1080, forward then backward to 10 s, "
        f"30 fps, no audio; output 1920x1080 at 25 fps",
        "settings": {
            "run_seconds": args.seconds,
            "naive_run_seconds": args.naive_seconds,
            "run_generation_long_side": args.long_side,
            "run_generation": "x".join(map(str, _fit(args.long_side))),
            "threads": args.threads,
            "upscaler_model": app_args.upscaler_model,
            "max_chunks_in_flight": 1,
            "why_one_chunk_in_flight": "stage CPU seconds are process CPU time; with one chunk "
            "in flight no other stage runs beside the one measured",
            "lever_tier": args.tier,
            "runs_device": "cpu"
            if not torch.cuda.is_available()
            else "cuda available: the runs' diffusion (and upscale) may use it, so their "
            "'CPU-side' seconds are those stages' seconds wherever they ran",
        },
        "labels": {
            "measured": "counted work at the run size, CPU seconds of CPU-side stages, cache",
            "calibrated": "upscale and optical flow at full generation size, from a few frames",
            "predicted": "full-size work units (exact formula, SD 1.5 weights), GPU seconds "
            "(units x the tier's reference seconds per unit: estimates), the naive plan",
        },
        "prices": price_table(),
        "calibration": calibration,
        "runs": runs,
        "plans": plans,
        "levers": lever_table(fp16, batching, args.tier),
        "coherence": coherence_rows(),
        "motion_module": motion_module_rows(),
        "conditioner": conditioner_rows(),
        "turbo": turbo_levers(),
        "density": density,
        "peer": peer_summary(),  # benchmarks/peer.py's latest ratios (FLOP counts)
        "fp16": fp16,
        "batching": batching,
        "checks": checks(runs, plans),
        "total_s": round(time.perf_counter() - started, 1),
    }


def _size_of(plan) -> tuple[int, int]:
    return plan.generation.width, plan.generation.height


def price_table() -> dict[str, Any]:
    from serve.cost import DEFAULT_PRICES

    return {
        "tiers": {
            tier: {
                "hardware": hardware,
                "gpu": p.gpu,
                "spot_gpu_hour": p.spot_gpu_hour,
                "on_demand_gpu_hour": p.on_demand_gpu_hour,
                "seconds_per_work_unit": p.seconds_per_work_unit,
                "source": p.source,
            }
            for tier, hardware, p in tier_rows()
        },
        "vcpu_spot_hour": DEFAULT_PRICES.vcpu_spot_hour,
        "vcpu_on_demand_hour": DEFAULT_PRICES.vcpu_on_demand_hour,
        "vcpu_source": DEFAULT_PRICES.vcpu_source,
    }


def checks(runs: dict, plans: dict) -> dict[str, Any]:
    repeat = runs["standard_repeat"]
    return {
        # A repeat counts nothing while its prediction ignores the cache: checked apart.
        "counted_equals_predicted": {
            k: r["counted_equals_predicted"] for k, r in runs.items() if k != "standard_repeat"
        },
        "repeat_ran_no_diffusion": repeat["counted"]["unet_evals"] == 0,
        "repeat_cache_hits": sum(s["cache_hits"] for s in repeat["stages"].values()),
        "standard_ratio_vs_naive_units": plans["standard"]["ratios_vs_naive"]["work_units"],
        "standard_without_coherence_ratio_vs_naive_units": plans[NO_COHERENCE_ROW][
            "ratios_vs_naive"
        ]["work_units"],
        "coherence_overhead_pct": plans["standard"]["anchor"]["overhead_pct"],
    }


# --- output -------------------------------------------------------------------------------------


def print_report(result: dict[str, Any]) -> None:
    m, s = result["machine"], result["settings"]
    print(
        f"\ncost of a 10 s clip at 1080p25 ({result['mode']}), {result['when']}, {m['cpu']} "
        f"x{m['cpu_count']}; {m['shared']}"
    )
    print(f"GPU: {result['gpu']['note']}")
    print(
        f"runs: generation at {s['run_generation']} (the plans' fps, steps, ControlNet, "
        f"output), first {s['run_seconds']:g} s of the clip; naive run: first "
        f"{s['naive_run_seconds']:g} s"
    )
    print("\n" + format_runs(result["runs"]))
    print("\n" + format_plans(result["plans"]))
    print(format_anchor(result["plans"]["standard"]))
    print("\n" + format_stage_seconds(result["plans"], s["lever_tier"]))
    print("\n" + format_dollars(result["plans"]))
    print("\n" + format_levers(result["levers"]))
    print("\n" + format_coherence(result["coherence"]))
    if "motion_module" in result:
        print("\n" + format_motion_module(result["motion_module"]))
    if "conditioner" in result:
        print("\n" + format_conditioner(result["conditioner"]))
    if "turbo" in result:
        print("\n" + format_turbo(result["turbo"]))
    if "density" in result:
        print("\n" + format_density(result["density"]))
    if result.get("peer"):
        print("\n" + format_peer(result["peer"]))
    c = result["checks"]
    print(
        f"\nchecks: counted == predicted {c['counted_equals_predicted']}; repeat ran no "
        f"diffusion: {c['repeat_ran_no_diffusion']} ({c['repeat_cache_hits']} cache hits)"
    )


def format_runs(runs: dict[str, Any]) -> str:
    stages = ("decode", "pose", "motion", "render", "diffusion", "upscale", "interpolate", "encode",
              "join")  # fmt: skip
    lines = [
        "measured runs (CPU s per stage; diffusion = tiny models on CPU, not a GPU figure)",
        f"{'run':28} {'s clip':>6} {'frames':>6} {'unet':>6} {'cnet':>5} {'=pred':>5} "
        + " ".join(f"{name[:6]:>6}" for name in stages)
        + f" {'wall':>6}",
    ]
    for run in runs.values():
        cells = " ".join(f"{run['stages'].get(n, {}).get('seconds', 0):>6.2f}" for n in stages)
        repeat = run["counted"]["unet_evals"] == 0  # the cache repeat: nothing to compare
        check = "-" if repeat else str(run["counted_equals_predicted"])
        lines.append(
            f"{run['label']:28} {run['seconds_of_clip']:>6g} {run['generated_frames']:>6} "
            f"{run['counted']['unet_evals']:>6} {run['counted']['controlnet_evals']:>5} "
            f"{check:>5} {cells} {run['wall_s']:>6.1f}"
        )
    return "\n".join(lines)


def format_plans(plans: dict[str, Any]) -> str:
    lines = [
        "per 10 s clip at full size: work units predicted (exact), CPU-side s measured "
        "(scaled/calibrated where noted)",
        f"{'plan':16} {'generate':>18} {'steps':>5} {'cn':>3} {'frames':>6} "
        f"{'work units':>10} {'x naive':>7} {'CPU s':>7}  CPU side from",
    ]
    for name, p in plans.items():
        full = p["full_size"]
        generate = f"{full['generation']}@{full['fps']:g}" if "generation" in full else "cache"
        every = full.get("controlnet_every", 1 if name == "naive" else "-")
        lines.append(
            f"{name:16} {generate:>18} {full.get('steps', '-'):>5} {every:>3} "
            f"{full.get('generated_frames', 0):>6} {p['work_units']['total']:>10.1f} "
            f"{_x(p['ratios_vs_naive']['work_units']):>7} {p['cpu_side_total_s']:>7.1f}  "
            f"{p['cpu_side_from']}"
        )
    return "\n".join(lines)


def format_anchor(row: dict[str, Any]) -> str:
    a = row["anchor"]
    return (
        f"coherence on standard (anchor pool 4, job noise): +{a['overhead_pct']:.2f}% work "
        f"units over standard without it (keyframe "
        f"+{a['keyframe_pct']:.2f}%, anchor pass +{a['anchor_pass_pct']:.2f}%, wider attention "
        f"+{a['wider_attention_pct']:.2f}%); "
        f"{_x(row['ratios_vs_naive']['work_units'])} fewer than naive; budget "
        f"+{a['budget_pct']:g}%"
    )


def format_stage_seconds(plans: dict[str, Any], tier: str) -> str:
    """Seconds per stage and device of each plan's 10 s clip; m measured, s measured on part
    of the clip and scaled, c calibrated at full size, p predicted."""
    names = [n for n in plans if n != "standard_repeat"]
    stages = ["decode", "pose", "motion", "render", "diffusion", "upscale", "interpolate", "encode",
              "join"]  # fmt: skip
    lines = [
        f"seconds per stage and device per 10 s clip (diffusion: predicted GPU s on {tier}; "
        "m measured, s scaled from part of the clip, c calibrated at full size, p predicted; "
        "naive runs every stage on the GPU)",
        f"{'stage':12} " + " ".join(f"{n:>16}" for n in names),
    ]
    for stage in stages:
        cells = []
        for name in names:
            plan = plans[name]
            device = "gpu" if name == "naive" or stage == "diffusion" else "cpu"
            if stage == "diffusion":
                value, mark = plan["per_tier"][tier]["gpu_s"], "p"
            elif stage in plan["cpu_side_seconds"]:
                entry = plan["cpu_side_seconds"][stage]
                value, mark = entry["seconds"], _basis_mark(entry["basis"])
            else:
                cells.append(f"{'-':>16}")
                continue
            cells.append(f"{f'{value:.1f} {device} {mark}':>16}")
        lines.append(f"{stage:12} " + " ".join(cells))
    return "\n".join(lines)


def _basis_mark(basis: str) -> str:
    if "calibrated" in basis:
        return "c"
    return "s" if basis.startswith("measured on") else "m"


def format_dollars(plans: dict[str, Any]) -> str:
    tiers = list(next(iter(plans.values()))["per_tier"])
    head = " ".join(f"{t + ' ' + plans['naive']['per_tier'][t]['hardware']:>17}" for t in tiers)
    lines = [
        "dollars per 10 s clip, spot / on-demand (GPU s predicted: units x tier's reference "
        "s/unit, no batching gain; CPU s measured; naive bills its CPU-side stages on the "
        "GPU)",
        f"{'plan':16} {head}",
    ]
    for name, p in plans.items():
        cells = " ".join(
            f"{p['per_tier'][t]['spot']:>8.4f}/{p['per_tier'][t]['on_demand']:<8.4f}" for t in tiers
        )
        lines.append(f"{name:16} {cells}")
    ratios = " ".join(
        f"{_x(plans['standard']['ratios_vs_naive'][f'dollars_spot_{t}']):>17}" for t in tiers
    )
    lines.append(f"{'naive/standard':16} {ratios}")
    return "\n".join(lines)


def format_levers(levers: dict[str, Any]) -> str:
    n = levers["naive"]
    lines = [
        f"levers for the standard plan's 10 s clip, diffusion GPU time on {levers['tier']} "
        f"({levers['hardware']}, {levers['seconds_per_work_unit']} s/unit); naive "
        f"{n['units']:.0f} units, {n['gpu_s']:.0f} GPU s, ${n['spot']:.3f} spot / "
        f"${n['on_demand']:.3f} on-demand",
        f"{'lever':34} {'alone':>7} {'stacked units':>13} {'step':>6} {'total':>6} "
        f"{'$ spot':>8} {'$ on-dem':>8}  expected / basis",
    ]
    for row in levers["rows"]:
        a, c = row["alone"], row["cumulative"]
        lines.append(
            f"{row['lever']:34} {a['saving_pct']:>6.1f}% {c['units']:>13.0f} "
            f"{c['step_saving_pct']:>5.1f}% {c['saving_pct']:>5.1f}% {c['spot']:>8.4f} "
            f"{c['on_demand']:>8.4f}  {row['expected']} / {row['basis']}"
        )
    lines.append(
        f"total expected: {EXPECTED['total']}; stack (before cache) equals the standard "
        f"plan's units: {levers['stack_reaches_standard_units']}"
    )
    return "\n".join(lines)


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1f}x"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levers = result["levers"]
    tier = levers["tier"]
    plans = {k: v for k, v in result["plans"].items() if k != "standard_repeat"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    names = list(plans)
    spot = [plans[n]["per_tier"][tier]["spot"] for n in names]
    on_demand = [plans[n]["per_tier"][tier]["on_demand"] for n in names]
    x = range(len(names))
    left.bar([i - 0.2 for i in x], spot, 0.4, label="spot")
    left.bar([i + 0.2 for i in x], on_demand, 0.4, label="on-demand")
    left.set_xticks(list(x), names)
    left.set_yscale("log")
    left.set_ylabel(f"USD per 10 s clip ({tier}: {levers['hardware']})")
    left.set_title("plans: GPU predicted from work units + CPU measured")
    left.axhline(0.80, color="grey", linestyle=":", label="expected naive ($0.80)")
    left.axhspan(0.15, 0.25, color="grey", alpha=0.2, label="expected optimized ($0.15-0.25)")
    left.legend(fontsize=8)
    labels = ["naive"] + [row["key"] for row in levers["rows"]]
    units = [levers["naive"]["spot"]] + [row["cumulative"]["spot"] for row in levers["rows"]]
    right.plot(labels, units, marker="o")
    right.set_yscale("symlog", linthresh=1e-3)
    right.set_ylabel("diffusion GPU USD per clip, spot (stacked levers)")
    right.set_title("levers stacked in order")
    right.tick_params(axis="x", rotation=30)
    gpu = "GPU" if result["gpu"]["available"] else "no GPU"
    fig.suptitle(
        f"motionserve cost per 10 s 1080p25 clip ({result['when'][:10]}; "
        f"{machine_label(result['machine'])}; {gpu})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models only; never a hub
    args = parse_args(argv)
    if args.density_only:
        result = density_only(args)
        print(format_density(result["density"]))
        write_json(args.output, result)
        print(f"\nwrote the density section into {args.output} ({result['density']['run_s']} s)")
        if not result["density"]["run"]["counted_equals_predicted"]:
            raise SystemExit("checks failed: counted != predicted with motion density")
        return result
    result = run(args)
    print_report(result)
    write_json(args.output, result)
    plot(result, args.plot)
    print(f"\nwrote {args.output} and {args.plot} ({result['total_s']} s)")
    failed = [k for k, ok in result["checks"]["counted_equals_predicted"].items() if not ok]
    if failed or not result["checks"]["repeat_ran_no_diffusion"]:
        raise SystemExit(f"checks failed: counted != predicted in {failed} or the repeat ran work")
    return result


if __name__ == "__main__":
    main()
