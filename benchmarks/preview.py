"""Motion preview vs the full job's CPU-side stages, on a 10 s 1080p clip at `standard`.

Target (issue 16): the CPU motion preview returns in under 15% of the time the full job's
CPU-side stages take, with zero GPU work. Measured in one run, in one process, on one store:

1. the preview (`serve.local_run.preview_video`, the same code the Serve app runs per stage)
   on a cold cache, timed end to end (hash, probe, plan, decode + pose, motion, render +
   encode of the side-by-side MP4, estimate);
2. the full job (`serve.local_run.edit_video`: tiny random-weight SD 1.5 + ControlNet at the
   plan's real generation size, Real-ESRGAN Compact, interpolation, encode, join) with the same
   request, right after: it must find decode, pose and motion in the cache the preview filled.
   Its diffusion runs `--job-steps` steps (default 1) instead of the preset's: diffusion is the
   GPU's work, left out of the ratio, and on this CPU the tiny model at 768x432 takes about
   1.5 s per frame and step; the step count changes no CPU-side stage (same frames, sizes and
   rates) nor the keys of decode, pose and motion. The preview's estimate is for the request
   as given (the preset's steps).

The full job's CPU-side stages are every stage but diffusion (the GPU's work): decode, pose and
motion as measured in the preview (the job's own functions and keys; the job then gets them
from the cache), plus render, upscale, interpolate, encode and join as the job measured them
(wall seconds of each stage call, which run one at a time: see serve.stages.MEASURE_LOCK).

    python -m benchmarks.preview [--quick] [--seconds 10] [--preset standard]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import machine_summary, results_dir, write_json
from benchmarks.fixtures import make_1080p_clip

TARGET_RATIO = 0.15
STYLES = ["smooth", "exaggerate=1.3"]
WHOLE_VIDEO_STAGES = ("decode", "pose", "motion")  # the preview measures these for the job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="make bench: a 2 s clip")
    parser.add_argument("--seconds", type=float, help="clip length (default 10; quick 2)")
    parser.add_argument("--preset", default="standard", choices=("draft", "standard", "high"))
    parser.add_argument("--upscaler", help="upscaler_model (default: the app's, Compact)")
    parser.add_argument(
        "--job-steps", type=int, default=1, help="diffusion steps of the job run (default 1)"
    )
    parser.add_argument("--output", type=Path, help="JSON path (default: results dir)")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    return args


def stage_walls(stages: list[dict[str, Any]]) -> dict[str, float]:
    return {s["stage"]: round(s["wall_seconds"], 3) for s in stages}


def measure(clip: Path, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from deployments.video import probe
    from serve.config import AppArgs
    from serve.local_run import edit_video, preview_video
    from serve.schemas import JobRequest

    extra = {"upscaler_model": args.upscaler} if args.upscaler else {}
    app_args = AppArgs(storage_uri=str(folder / "store"), **extra)
    request = JobRequest(prompt="a robot dancing in a park", styles=STYLES, preset=args.preset,
                         seed=1)  # fmt: skip

    started = time.perf_counter()
    preview = asyncio.run(preview_video(clip, folder / "preview.mp4", request, app_args))
    preview_wall = time.perf_counter() - started
    video = probe(folder / "preview.mp4")

    job_request = request.model_copy(update={"overrides": {"steps": args.job_steps}})
    started = time.perf_counter()
    job = asyncio.run(edit_video(clip, folder / "edited.mp4", job_request, app_args))
    job_wall = time.perf_counter() - started

    preview_side, plan = preview["preview"], job["plan"]
    preview_stages = stage_walls(preview_side["stages"])
    job_stages = stage_walls(plan["stages"])
    hits = {s["stage"]: [s["calls"], s["cache_hits"]] for s in plan["stages"]}
    cpu_side = {name: preview_stages[name] for name in WHOLE_VIDEO_STAGES}
    cpu_side.update(
        {name: wall for name, wall in job_stages.items()
         if name not in WHOLE_VIDEO_STAGES and name != "diffusion"}
    )  # fmt: skip
    cpu_side_total = sum(cpu_side.values())
    ratio = preview_wall / cpu_side_total
    generation = job["plan_explained"][1]
    return {
        "clip": clip.name,
        "clip_seconds": args.seconds,
        "preset": args.preset,
        "styles": STYLES,
        "generation": generation,
        "preview": {
            "wall_s": round(preview_wall, 3),
            "stage_wall_s": preview_stages,
            "gpu_seconds": preview_side["gpu_seconds"],
            "diffusion_work_units": preview_side["work_units"]["unet_evals"],
            "cpu_seconds": round(preview_side["cpu_seconds"], 3),
            "video": {
                "width": video.width,
                "height": video.height,
                "fps": video.fps,
                "frames": video.frame_count,
            },  # fmt: skip
            "estimate": {
                side: {
                    "work_units": round(preview["estimate"][side]["work_units"], 1),
                    "dollars": preview["estimate"][side]["dollars"],
                }
                for side in ("plan", "naive")
            },  # fmt: skip
        },
        "job": {
            "wall_s": round(job_wall, 3),
            "stage_wall_s": job_stages,
            "cache_hits": hits,
            "diffusion_unet_evals": plan["work_units"]["unet_evals"],
            "diffusion_steps": args.job_steps,
        },
        "job_cpu_side_stage_wall_s": cpu_side,
        "job_cpu_side_total_s": round(cpu_side_total, 3),
        "ratio_preview_to_job_cpu_side": round(ratio, 4),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio < TARGET_RATIO
        and preview_side["gpu_seconds"] == 0
        and preview_side["work_units"]["unet_evals"] == 0,
        "checks": {
            "preview_zero_gpu": preview_side["gpu_seconds"] == 0
            and preview_side["work_units"]["unet_evals"] == 0,
            "job_hit_decode_pose_motion": all(
                hits.get(name, [0, 0])[1] == hits.get(name, [0, 0])[0] == 1
                for name in WHOLE_VIDEO_STAGES
            ),
            "estimate_frames_equal_job_frames": preview["estimate"]["plan"]["generated_frames"]
            == plan["generated_frames"],
            "job_generated": plan["work_units"]["unet_evals"] > 0,
        },  # fmt: skip
    }


def print_result(result: dict[str, Any]) -> None:
    p, j = result["preview"], result["job"]
    print(f"clip {result['clip']} ({result['clip_seconds']:g} s), preset {result['preset']}, "
          f"styles {result['styles']}")  # fmt: skip
    print(f"preview: {p['wall_s']:.2f} s wall, GPU s {p['gpu_seconds']}, diffusion work units "
          f"{p['diffusion_work_units']}; MP4 {p['video']['width']}x{p['video']['height']} @ "
          f"{p['video']['fps']:g} fps, {p['video']['frames']} frames")  # fmt: skip
    print("  stages: " + ", ".join(f"{k} {v:.2f}" for k, v in p["stage_wall_s"].items()))
    print(f"job CPU-side stages: {result['job_cpu_side_total_s']:.1f} s "
          + "(" + ", ".join(f"{k} {v:.2f}" for k, v in result["job_cpu_side_stage_wall_s"].items())
          + ")")  # fmt: skip
    print(
        f"job wall (diffusion on CPU included): {j['wall_s']:.1f} s; cache hits "
        + ", ".join(f"{k} {v[1]}/{v[0]}" for k, v in j["cache_hits"].items() if v[1])
    )
    print(
        f"preview / job CPU-side = {result['ratio_preview_to_job_cpu_side']:.3f} "
        f"(target < {result['target_ratio']}): {'met' if result['target_met'] else 'NOT met'}"
    )
    print(f"checks: {result['checks']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from serve.config import Settings

    clip = make_1080p_clip(Settings().cache_dir, seconds=args.seconds)
    with tempfile.TemporaryDirectory(prefix="motionserve-bench-preview-") as scratch:
        result = measure(clip, args, Path(scratch))
    import torch

    result.update(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        machine={**machine_summary(), "torch_threads": torch.get_num_threads()},
        quick=args.quick,
        note="one run, one process, one store: the preview on a cold cache, then the job; the "
        "job's decode, pose and motion seconds are the preview's (same functions and keys), "
        "its other CPU-side stages its own; diffusion (the GPU's work) is left out",
    )
    output = write_json(args.output or results_dir() / "preview.json", result)
    print_result(result)
    print(f"written to {output}")
    return result


if __name__ == "__main__":
    main()
