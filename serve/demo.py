"""`motionserve demo` (what `make demo` runs): the real sample video through the pipeline.

Until the diffusion stage lands this runs the CPU stages (decode, pose, motion edit, pose maps)
and writes the pose-map video that ControlNet will be conditioned on, then prints what each stage
cost. Run it twice to see the cache: the second run reads no frames.
"""

from __future__ import annotations

from pathlib import Path

from serve.cache import ArtifactCache
from serve.config import Settings
from serve.orchestrator import LocalRunner, RunReport
from serve.pipeline import Plan
from serve.samples import sample_video_path
from serve.storage import open_store

DEMO_STYLES = ["smooth", "stabilize", "exaggerate=1.3"]


def run_demo(output_dir: Path, settings: Settings | None = None) -> RunReport:
    settings = settings or Settings()
    video = sample_video_path(settings.cache_dir)
    store = open_store(
        settings.resolved_storage_uri(),
        s3_endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
    )
    runner = LocalRunner(ArtifactCache(store), settings.input_limits())
    plan = Plan(styles=DEMO_STYLES)
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / "pose_maps.mp4"
    print(f"input:  {video}")
    print(
        f"styles: {', '.join(plan.styles)}; generation {plan.decode.fps:g} fps, "
        f"{plan.decode.width} px wide"
    )
    report = runner.pose_map_video(video, plan, output)
    print(format_report(report))
    print(f"output: {output.resolve()}")
    return report


def format_report(report: RunReport) -> str:
    lines = [f"{'stage':16} {'cache':>6} {'wall s':>8} {'cpu s':>8} {'frames':>7}"]
    for record in report.stages:
        lines.append(
            f"{record.stage:16} {'hit' if record.cache_hit else 'miss':>6} "
            f"{record.wall_s:8.2f} {record.cpu_s:8.2f} {record.frames or '':>7}"
        )
    lines.append(f"{'total':16} {'':>6} {'':>8} {report.cpu_s:8.2f}")
    lines.append("GPU seconds: 0 (no stage so far needs a GPU)")
    return "\n".join(lines)
