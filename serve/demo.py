"""`motionserve demo` (what `make demo` runs): the real sample video edited end to end.

It starts the app on a private local Ray cluster (serve/configs/local.yaml: every stage a Serve
deployment, the tiny random-weight models on CPU), submits the sample clip over HTTP like any
client, follows the job, downloads the MP4 and prints the cost table of the plan against the
naive baseline. Then it asks the same app for the motion preview (`POST /v1/previews`, CPU only)
and writes side_by_side.mp4: source | edited skeleton | generated frames on the result's
timeline (deployments/comparison.py). The generated frames look like noise (the models are
untrained); the pipeline, timing and costs are real. Run it twice to see the cache: the second
run generates nothing.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from deployments.comparison import compose_comparison
from deployments.diffusion.work_units import WorkUnits
from serve.config import Settings
from serve.samples import sample_video_path
from serve.schemas import JobRequest

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
    """Edit the sample through a local Ray Serve app over HTTP; returns the job's status."""
    from serve.client import Client, progress_bars
    from serve.local_app import free_port, load_config, local_app

    settings = settings or Settings()
    video = sample_video_path(settings.cache_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / "edited.mp4"
    side_by_side = output_dir / "side_by_side.mp4"
    print(f"input:   {video}")
    print(f"request: {DEMO_REQUEST.prompt!r}, styles {', '.join(DEMO_REQUEST.styles)}")
    started = time.perf_counter()
    print("starting the app on a local Ray cluster (serve/configs/local.yaml) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="motionserve-demo-") as scratch:
        skeletons = Path(scratch) / "preview.mp4"
        with local_app(load_config(port=free_port()), quiet=True) as url:
            print(f"app up in {time.perf_counter() - started:.0f} s at {url}", flush=True)
            client = Client(url)
            job_id = client.submit(video, DEMO_REQUEST)["job_id"]
            print(f"job:     {job_id} (POST {url}/v1/jobs)")
            status = client.wait(job_id, poll_s=0.5, show=progress_bars)
            _check_done("job", status)
            client.download(job_id, output)
            # The comparison's edited skeleton is the service's own motion preview (CPU only;
            # the job left the poses and the edited motion in the cache: only the drawing runs).
            preview_id = client.submit(video, DEMO_REQUEST, kind="previews")["preview_id"]
            print(f"preview: {preview_id} (POST {url}/v1/previews)")
            _check_done("preview", client.wait(preview_id, poll_s=0.5, kind="previews"))
            client.download(preview_id, skeletons, kind="previews")
        # After the app has stopped: the composition is plain CPU work on three files.
        composed = compose_comparison(video, skeletons, output, side_by_side)
    print(f"\ndone in {time.perf_counter() - started:.0f} s (app start included)")
    print(format_report(status["report"]))
    print(f"output:  {output.resolve()}")
    print(
        f"side by side: {composed.path.resolve()} (source | edited skeleton | generated, "
        f"{composed.frames} frames at {composed.fps:g} fps)"
    )
    return status


def _check_done(what: str, status: dict[str, Any]) -> None:
    if status["state"] != "done":
        error = status.get("error") or {}
        raise RuntimeError(f"demo {what} {status['state']}: {error.get('message', '')}")


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
        total_units = WorkUnits.model_validate(units).total
        lines.append(
            f"{name:6} frames {side['generated_frames']:>4}  work units {total_units:>10.1f}  "
            f"GPU s {side['gpu_seconds']:>8.2f}  CPU s {side['cpu_seconds']:>8.2f}  "
            f"$ spot {side['dollars']['spot']:.6f}  on-demand {side['dollars']['on_demand']:.6f}"
        )
    ratios = report["ratios"]
    if plan["dollars"]["spot"] < 1e-6:  # a ratio to ~0 says nothing
        lines.append(
            f"naive / plan: work units x{ratios['work_units']:.1f} (as planned); this run cost "
            "< $0.000001: everything came from the cache"
        )
    else:
        lines.append(
            f"naive / plan: work units x{ratios['work_units']:.1f}, "
            f"dollars (spot) x{ratios['dollars_spot']:.1f}"
        )
    lines.append(format_consistency(report.get("consistency")))
    return "\n".join(lines)


def format_consistency(section: dict[str, Any] | None) -> str:
    """One line: the report's consistency figures (serve/stages.ConsistencySection)."""
    if not section:
        return "consistency: not measured"
    if "error" in section:
        return f"consistency: not measured ({section['error']})"
    out = section["output"]

    def figure(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return (
        f"consistency: warp error {figure(out['warp_error'])} grey levels, seam ratio "
        f"{figure(out['seam_ratio'])} over {out['boundaries']} chunk boundaries (1.0 = no "
        f"seam); measured in {section['wall_s']:.1f} s on CPU, not billed"
    )


def format_preview_report(report: dict[str, Any]) -> str:
    """A preview's own cost (CPU only) per stage, then the estimate of the full job."""
    preview, estimate = report["preview"], report["estimate"]
    gpu = preview["work_units"]["unet_evals"] > 0  # the anchor frame was asked for
    lines = [
        f"preview (tier {report['tier']}: {report['hardware']}): "
        + ("CPU, and one GPU frame (the anchor keyframe)" if gpu else "CPU only"),
        f"{'stage':12} {'calls':>5} {'hits':>4} {'seconds':>9}",
    ]
    for stage in preview["stages"]:
        lines.append(
            f"{stage['stage']:12} {stage['calls']:>5} {stage['cache_hits']:>4} "
            f"{stage['seconds']:>9.2f}"
        )
    lines.append(
        f"preview: work units {preview['work_units']['unet_evals']:.0f} diffusion, GPU s "
        f"{preview['gpu_seconds']:.0f}, CPU s {preview['cpu_seconds']:.2f}"
    )
    lines.append("the full job (estimate):")
    for name in ("plan", "naive"):
        side = estimate[name]
        lines.append(
            f"  {name:6} frames {side['generated_frames']:>5}  work units "
            f"{side['work_units']:>10.1f}  GPU s {side['gpu_seconds']:>8.1f}  "
            f"$ spot {side['dollars']['spot']:.4f}  on-demand {side['dollars']['on_demand']:.4f}"
        )
    lines.append(f"  naive / plan work units: x{estimate['ratio']:.1f}")
    return "\n".join(lines)
