"""Diffusion work units and CPU seconds per frame with the tiny SD 1.5 + ControlNet.

For every combination of controlnet_every (1/2/4), steps (15/20/30) and guidance on/off, one
chunk runs through `DiffusionEngine` on the CPU (fp32); the table shows the counted work units
per frame (which equal the formula's prediction; checked here too) and the measured CPU seconds
per frame. Seconds on tiny models say how the loop scales, not what SD 1.5 costs on a GPU.

    python -m benchmarks.diffusion_units [--frames 8] [--size 64] [--repeats 1] [--threads 1]
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
    parser.add_argument("--frames", type=int, default=8, help="frames per chunk (1..64)")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (64..256)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; best is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--model-dir", type=Path, help="tiny model directory (built if absent)")
    parser.add_argument("--output", type=Path, help="JSON results path (default: results dir)")
    args = parser.parse_args(argv)
    args.output = args.output or results_dir() / "diffusion_units.json"
    if not 1 <= args.frames <= 64 or not 64 <= args.size <= 256 or args.size % 8:
        parser.error("--frames must be 1..64 and --size a multiple of 8 in 64..256")
    if not 1 <= args.repeats <= 5:
        parser.error("--repeats must be 1..5")
    return args


def make_engine(model_dir: Path | None, cache_dir: Path):
    from deployments.diffusion import DiffusionEngine, EngineConfig
    from deployments.model_loading import tiny_sd_controlnet_sources
    from deployments.tiny_models import build_tiny_sd_controlnet

    if model_dir is None or not (model_dir / "model_index.json").exists():
        model_dir = build_tiny_sd_controlnet(model_dir or cache_dir / "tiny-sd")
    base, controlnet = tiny_sd_controlnet_sources(model_dir)
    config = EngineConfig(
        model_id="tiny", base=base, controlnet=controlnet, device="cpu", cache_dir=cache_dir
    )
    return DiffusionEngine(config)


def run(args: argparse.Namespace) -> dict:
    import torch

    from deployments.diffusion import ChunkRequest, GenerationSettings, predict_chunk_units

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
            request = ChunkRequest(
                job_id="bench",
                chunk_index=0,
                prompt="a person dancing",
                seed=0,
                control_images=maps.astype(np.uint8),
                settings=settings,
            )
            best = None
            for _ in range(args.repeats):
                result = engine.generate([request])[0]
                if best is None or result.device_seconds < best.device_seconds:
                    best = result
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
    }


def print_table(result: dict) -> None:
    print(
        f"tiny SD 1.5 + ControlNet, {result['frames']} frames of {result['size']}px, CPU fp32, "
        f"{result['threads']} thread(s); ControlNet weight {result['controlnet_weight']}, "
        f"VAE weight {result['vae_weight']}"
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    result = run(args)
    result["total_s"] = round(time.perf_counter() - started, 1)
    print_table(result)
    write_json(args.output, result)
    print(f"wrote {args.output} ({result['total_s']} s)")


if __name__ == "__main__":
    main()
