"""Diffusion work units and CPU seconds per frame with the tiny SD 1.5 + ControlNet.

For every combination of controlnet_every (1/2/4), steps (15/20/30) and guidance on/off, one
chunk runs through `DiffusionEngine` on the CPU (fp32); the table shows the counted work units
per frame (which equal the formula's prediction; checked here too) and the measured CPU seconds
per frame. Seconds on tiny models say how the loop scales, not what SD 1.5 costs on a GPU.

    python -m benchmarks.diffusion_units [--frames 8] [--size 64] [--repeats 1] [--threads 1]

The result also holds SD 1.5's calls (UNet, ControlNet, VAE decode and encode) at the presets'
generation sizes and at 1080p in work units by FLOPs against the linear area rule used before
(`sd15_flops`; no model is run: the formulas, which a test checks against torch's counter).

`--motion-module`: the AnimateDiff motion module's cost instead (results/motion_module_units.json):
its weights relative to the UNet, counted with torch's FLOP counter on meta copies of SD 1.5's
UNet + the AnimateDiff v1-5-2 adapter architecture at 512x512 for windows of 8, 16 and 24
frames, and of the tiny models; then one chunk (a window of --frames, default 16) with the
module off and on through the engine, counted == predicted, and the CPU seconds of both.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.common import machine_summary, results_dir, write_json

EVERY = (1, 2, 4)
STEPS = (15, 20, 30)
GUIDANCE = (7.5, 1.0)  # on, off


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--frames", type=int, default=None, help="frames per chunk (1..64; 8, 16 with the module)"
    )
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (64..256)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; best is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--model-dir", type=Path, help="tiny model directory (built if absent)")
    parser.add_argument("--output", type=Path, help="JSON results path (default: results dir)")
    parser.add_argument(
        "--motion-module", action="store_true", help="measure the motion module's cost"
    )
    args = parser.parse_args(argv)
    if args.frames is None:
        args.frames = 16 if args.motion_module else 8  # 16: one AnimateDiff context window
    name = "motion_module_units.json" if args.motion_module else "diffusion_units.json"
    args.output = args.output or results_dir() / name
    if not 1 <= args.frames <= 64 or not 64 <= args.size <= 256 or args.size % 8:
        parser.error("--frames must be 1..64 and --size a multiple of 8 in 64..256")
    if not 1 <= args.repeats <= 5:
        parser.error("--repeats must be 1..5")
    return args


def make_engine(model_dir: Path | None, cache_dir: Path, motion_module: bool = False):
    from deployments.diffusion import DiffusionEngine, EngineConfig
    from deployments.model_loading import ModelSource, tiny_sd_controlnet_sources
    from deployments.tiny_models import build_tiny_motion_adapter, build_tiny_sd_controlnet

    if model_dir is None or not (model_dir / "model_index.json").exists():
        model_dir = build_tiny_sd_controlnet(model_dir or cache_dir / "tiny-sd")
    base, controlnet = tiny_sd_controlnet_sources(model_dir)
    motion = None
    if motion_module:
        motion = ModelSource(uri=str(build_tiny_motion_adapter(cache_dir / "tiny-motion")))
    config = EngineConfig(
        model_id="tiny",
        base=base,
        controlnet=controlnet,
        motion_module=motion,
        device="cpu",
        cache_dir=cache_dir,
    )
    return DiffusionEngine(config)


def sd15_motion_flops(windows: tuple[int, ...] = (8, 16, 24)) -> dict:
    """SD 1.5 UNet and UNetMotionModel (AnimateDiff v1-5-2 adapter) GFLOPs per frame at 512x512,
    counted on meta copies (nothing computed), against the motion formulas SD 1.5's defaults
    carry (`ModelWeights.motion_module` + F x `motion_attention`)."""
    import torch
    from diffusers import MotionAdapter

    from benchmarks.sd15_random import SD15_MOTION_ADAPTER, SD15_UNET
    from deployments.diffusion import SD15_MODEL_WEIGHTS as weights
    from deployments.diffusion.flops import build_motion_meta, motion_flops_per_frame

    with torch.device("meta"):
        adapter = MotionAdapter(**SD15_MOTION_ADAPTER)
    motion = build_motion_meta(SD15_UNET, adapter.config)
    with torch.device("meta"):
        per_frame = {w: motion_flops_per_frame(motion, 64, 64, w) for w in windows}
    unet_flops = weights.unit_flops
    return {
        "adapter_parameters": sum(p.numel() for p in adapter.parameters()),
        "unet_gflops": round(unet_flops / 1e9, 2),
        "motion_gflops_per_frame": {str(w): round(per_frame[w] / 1e9, 2) for w in windows},
        "extra_unet_evals_per_frame": {
            str(w): round(per_frame[w] / unet_flops - 1, 6) for w in windows
        },
        "motion_module_weight": round(weights.motion_module_weight, 6),
        "motion_attention_weight": round(weights.motion_attention_weight, 9),
    }


# Generation sizes the presets use (draft, standard/high) and the naive plan's 1080p output.
FLOP_SIZES = ((512, 512), (512, 288), (768, 432), (1920, 1080))


def sd15_flop_ratios() -> dict:
    """SD 1.5's calls in work units by FLOPs (the formulas the cost model predicts with; a test
    checks them against torch's FLOP counter) against the linear rule used before: latent area
    x the model's cost at 512x512 (for ControlNet, x its parameter ratio 0.4203, which the
    rule used)."""
    from deployments.diffusion import SD15_MODEL_WEIGHTS as weights

    parameter_ratio = weights.controlnet_parameters / weights.unet_parameters
    models = {
        "unet": (weights.unet, 1.0),
        "controlnet": (weights.controlnet, parameter_ratio),
        "vae_decode": (weights.vae_decode, weights.vae_weight),
        "vae_encode": (weights.vae_encode, weights.vae_encode_weight),
    }
    rows = []
    for width, height in FLOP_SIZES:
        area = (width // 8) * (height // 8) / 64**2
        for name, (formula, linear_weight) in models.items():
            flops_units = weights.units(formula, width, height)
            rows.append(
                {
                    "size": f"{width}x{height}",
                    "model": name,
                    "gflops": round(formula.flops(height // 8, width // 8) / 1e9, 2),
                    "units": round(flops_units, 4),
                    "linear_units": round(area * linear_weight, 4),
                    "x_linear": round(flops_units / (area * linear_weight), 4),
                }
            )
    return {
        "unit_gflops": round(weights.unit_flops / 1e9, 2),
        "controlnet_parameter_ratio": round(parameter_ratio, 4),
        "weights_at_512": {k: round(v, 6) for k, v in weights.reference_weights().items()},
        "rows": rows,
    }


def print_flop_ratios(section: dict) -> None:
    print(f"SD 1.5 calls, work units by FLOPs vs the linear area rule (1 unit = "
          f"{section['unit_gflops']} GFLOPs):")  # fmt: skip
    print(f"{'size':>10} {'model':>11} {'GFLOPs':>9} {'units':>8} {'linear':>8} {'x lin':>6}")
    for row in section["rows"]:
        print(
            f"{row['size']:>10} {row['model']:>11} {row['gflops']:>9.1f} {row['units']:>8.4f} "
            f"{row['linear_units']:>8.4f} {row['x_linear']:>6.3f}"
        )


def fastest_chunk(engine, settings, maps, repeats: int):
    """The benchmark's one chunk generated `repeats` times; the result with the least device
    time (its work units are the same every time)."""
    from deployments.diffusion import ChunkRequest

    request = ChunkRequest(job_id="bench", chunk_index=0, prompt="a person dancing", seed=0,
                           control_images=maps.astype(np.uint8), settings=settings)  # fmt: skip
    results = [engine.generate([request])[0] for _ in range(repeats)]
    return min(results, key=lambda result: result.device_seconds)


def run_motion(args: argparse.Namespace) -> dict:
    """The motion module's cost: SD 1.5 FLOP counts, and one tiny chunk off vs on."""
    import torch

    from deployments.diffusion import GenerationSettings, predict_chunk_units

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(args.model_dir, Path(scratch), motion_module=True)
        load_seconds = engine.load()
        maps = np.random.default_rng(0).integers(0, 256, (args.frames, args.size, args.size, 3))
        for every, motion in itertools.product((1, 4), (False, True)):
            settings = GenerationSettings(
                model_id="tiny",
                width=args.size,
                height=args.size,
                steps=15,
                precision="fp32",
                guidance_scale=7.5,
                controlnet_every=every,
                motion_module=motion,
            )
            best = fastest_chunk(engine, settings, maps, args.repeats)
            units = best.work_units
            rows.append(
                {
                    "controlnet_every": every,
                    "motion_module": motion,
                    "unet_evals": units.unet_evals,
                    "motion_module_evals": units.motion_module_evals,
                    "motion_attention_evals": units.motion_attention_evals,
                    "units_per_frame": round(units.total / args.frames, 4),
                    "cpu_s_per_frame": round(best.device_seconds / args.frames, 4),
                    "prediction_matches": units
                    == predict_chunk_units(settings, args.frames, engine.model_weights),
                }
            )
        weights = engine.model_weights
    for every in (1, 4):
        off, on = (r for r in rows if r["controlnet_every"] == every)
        on["units_vs_off"] = round(on["units_per_frame"] / off["units_per_frame"], 4)
        on["cpu_s_vs_off"] = round(on["cpu_s_per_frame"] / off["cpu_s_per_frame"], 4)
    return {
        "benchmark": "motion_module_units",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_summary(),
        "note": "SD 1.5 figures: FLOPs counted on meta copies (torch.utils.flop_counter); tiny "
        "figures: random-weight models on the CPU in fp32, 15 steps, CFG on",
        "method": "motion model FLOPs per frame at 512x512 for windows of 8, 16 and 24 frames, "
        "counted; the weights are SD 1.5's fitted motion formulas at 512x512 (flops.py: "
        "intercept and slope of (FLOPs per frame - UNet FLOPs) against the window length, "
        "linear in each level's tokens) / UNet FLOPs",
        "sd15": sd15_motion_flops(),
        "frames": args.frames,
        "size": args.size,
        "threads": args.threads,
        "repeats": args.repeats,
        "load_s": round(load_seconds, 3),
        "tiny_motion_module_weight": round(weights.motion_module_weight, 6),
        "tiny_motion_attention_weight": round(weights.motion_attention_weight, 9),
        "rows": rows,
    }


def print_motion_table(result: dict) -> None:
    sd15 = result["sd15"]
    print(
        f"SD 1.5 + AnimateDiff v1-5-2 ({sd15['adapter_parameters']:,} adapter parameters): "
        f"UNet {sd15['unet_gflops']} GFLOPs/frame; with the module "
        f"{sd15['motion_gflops_per_frame']} -> {sd15['motion_module_weight']} + "
        f"{sd15['motion_attention_weight']} x F UNet evaluations per frame"
    )
    print(f"tiny, {result['frames']} frames of {result['size']}px, CPU fp32:")
    print(f"{'every':>5} {'module':>6} {'units/fr':>9} {'cpu s/fr':>9} {'=pred':>6} {'x off':>6}")
    for row in result["rows"]:
        print(
            f"{row['controlnet_every']:>5} {'on' if row['motion_module'] else 'off':>6} "
            f"{row['units_per_frame']:>9.3f} {row['cpu_s_per_frame']:>9.4f} "
            f"{str(row['prediction_matches']):>6} {row.get('units_vs_off', ''):>6}"
        )


def run(args: argparse.Namespace) -> dict:
    import torch

    from deployments.diffusion import GenerationSettings, predict_chunk_units

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(args.model_dir, Path(scratch))
        load_seconds = engine.load()
        maps = np.random.default_rng(0).integers(0, 256, (args.frames, args.size, args.size, 3))
        for every, steps, guidance in itertools.product(EVERY, STEPS, GUIDANCE):
            settings = GenerationSettings(
                model_id="tiny",
                width=args.size,
                height=args.size,
                steps=steps,
                precision="fp32",
                guidance_scale=guidance,
                controlnet_every=every,
            )
            best = fastest_chunk(engine, settings, maps, args.repeats)
            predicted = predict_chunk_units(settings, args.frames, engine.model_weights)
            units = best.work_units
            rows.append(
                {
                    "controlnet_every": every,
                    "steps": steps,
                    "cfg": guidance > 1,
                    "unet_evals": units.unet_evals,
                    "controlnet_evals": units.controlnet_evals,
                    "vae_decodes": units.vae_decodes,
                    "units_per_frame": round(units.total / args.frames, 4),
                    "cpu_s_per_frame": round(best.device_seconds / args.frames, 4),
                    "cpu_s_per_unit": round(best.device_seconds / units.total, 5),
                    "prediction_matches": units == predicted,
                }
            )
        weights = engine.model_weights
    return {
        "benchmark": "diffusion_units",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_summary(),
        "note": "tiny random-weight models, CPU fp32",
        "frames": args.frames,
        "size": args.size,
        "threads": args.threads,
        "repeats": args.repeats,
        "load_s": round(load_seconds, 3),
        "controlnet_weight": round(weights.controlnet_weight, 4),
        "vae_weight": round(weights.vae_weight, 4),
        "rows": rows,
        "sd15_flops": sd15_flop_ratios(),
    }


def print_table(result: dict) -> None:
    print(
        f"tiny SD 1.5 + ControlNet, {result['frames']} frames of {result['size']}px, CPU fp32, "
        f"{result['threads']} thread(s); ControlNet weight {result['controlnet_weight']}, "
        f"VAE weight {result['vae_weight']} (at 512x512, by FLOPs)"
    )
    header = f"{'every':>5} {'steps':>5} {'cfg':>4} {'unet':>6} {'cnet':>6} {'units/fr':>9}"
    print(header + f" {'cpu s/fr':>9} {'s/unit':>8} {'=pred':>6}")
    for row in result["rows"]:
        print(
            f"{row['controlnet_every']:>5} {row['steps']:>5} {'on' if row['cfg'] else 'off':>4} "
            f"{row['unet_evals']:>6} {row['controlnet_evals']:>6} {row['units_per_frame']:>9.3f} "
            f"{row['cpu_s_per_frame']:>9.4f} {row['cpu_s_per_unit']:>8.4f} "
            f"{str(row['prediction_matches']):>6}"
        )
    print_flop_ratios(result["sd15_flops"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    result = run_motion(args) if args.motion_module else run(args)
    result["total_s"] = round(time.perf_counter() - started, 1)
    (print_motion_table if args.motion_module else print_table)(result)
    write_json(args.output, result)
    print(f"wrote {args.output} ({result['total_s']} s)")


if __name__ == "__main__":
    main()
