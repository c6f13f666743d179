"""`motionserve demo` (what `make demo` runs): the real sample video edited end to end.

The sample clip goes through every stage in this process with the tiny random-weight models on
CPU (the frames look like noise: the models are untrained; the pipeline, timing and costs are
real), and the cost table of the plan against the naive baseline is printed. Run it twice to
see the cache: the second run generates nothing.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from serve.config import AppArgs, Settings
from serve.jobs import JobRequest
from serve.samples import sample_video_path

DEMO_REQUEST = JobRequest(
    prompt="a robot dancing in a park, cinematic lighting",
    negative_prompt="blurry, deformed",
    styles=["smooth", "stabilize", "exaggerate=1.3"],
    preset="draft",
    seed=7,
    # Small enough for 2 CPU cores in a few minutes; the levers are the draft preset's.
    overrides={"generation_long_side": 256, "output_long_side": 1024},
)


def run_demo(output_dir: Path, settings: Settings | None = None) -> dict[str, Any]:
    from serve.orchestrator import edit_video

    settings = settings or Settings()
    video = sample_video_path(settings.cache_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / "edited.mp4"
    print(f"input:   {video}")
    print(f"request: {DEMO_REQUEST.prompt!r}, styles {', '.join(DEMO_REQUEST.styles)}")
    started = time.perf_counter()
    report = asyncio.run(
        edit_video(video, output, DEMO_REQUEST, AppArgs(), on_progress=_print_progress)
    )
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    print(format_report(report))
    print(f"output:  {output.resolve()}")
    return report


def _print_progress(stage: str, done: int, total: int) -> None:
    print(f"\r  {stage:8} {done}/{total}", end="", flush=True)


def format_report(report: dict[str, Any]) -> str:
    """The cost table: per stage, plan against naive, and totals in dollars."""
    plan, naive = report["plan"], report["naive"]
    lines = [
        f"cost report (tier {report['tier']}: {report['hardware']})",
        f"{'stage':12} {'device':6} {'calls':>5} {'hits':>4} {'seconds':>9}  {'naive s':>9}",
    ]
    naive_by_stage = {s["stage"]: s for s in naive["stages"]}
    for stage in plan["stages"]:
        other = naive_by_stage.get(stage["stage"])
        lines.append(
            f"{stage['stage']:12} {stage['device']:6} {stage['calls']:>5} "
            f"{stage['cache_hits']:>4} {stage['seconds']:>9.2f}  "
            f"{(other['seconds'] if other else 0):>9.2f}"
        )
    for side, name in ((plan, "plan"), (naive, "naive")):
        units = side["work_units"]
        total_units = units["unet_units"] + units["controlnet_units"] + units["vae_units"]
        lines.append(
            f"{name:6} frames {side['generated_frames']:>4}  work units {total_units:>10.1f}  "
            f"GPU s {side['gpu_seconds']:>8.2f}  CPU s {side['cpu_seconds']:>8.2f}  "
            f"$ spot {side['dollars']['spot']:.6f}  on-demand {side['dollars']['on_demand']:.6f}"
        )
    ratios = report["ratios"]
    lines.append(
        f"naive / plan: work units x{ratios['work_units']:.1f}, "
        f"dollars (spot) x{ratios['dollars_spot']:.1f}"
    )
    return "\n".join(lines)
