"""Prometheus metrics through Ray Serve's metrics API (exported by every Ray node's agent).

Names start with `motionserve_`; Ray adds `ray_` in front and Serve adds deployment, replica and
application tags. Job-level figures come from the job's cost report when it ends, so metrics and
reports can never disagree.
"""

from __future__ import annotations

from typing import Any

from ray.serve import metrics

from deployments.diffusion.work_units import WorkUnits

STAGE_SECONDS_BUCKETS = [0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]
BATCH_SIZE_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 32]


class JobMetrics:
    """Counters of jobs, their stages and their costs (lives in the ingress replica)."""

    def __init__(self):
        self.jobs = metrics.Counter(
            "motionserve_jobs", "Jobs that reached a state.", tag_keys=("state",)
        )
        self.active = metrics.Gauge(
            "motionserve_jobs_active", "Jobs queued or running on this ingress replica."
        )
        self.rejected = metrics.Counter(
            "motionserve_jobs_rejected", "Submissions refused with 503 (backpressure)."
        )
        self.stage_seconds = metrics.Histogram(
            "motionserve_stage_seconds",
            "Billed seconds per stage call (CPU seconds, or fraction-scaled GPU seconds).",
            boundaries=STAGE_SECONDS_BUCKETS,
            tag_keys=("stage", "device"),
        )
        self.gpu_seconds = metrics.Counter(
            "motionserve_gpu_seconds", "Billed GPU seconds (scaled by the replica's GPU share)."
        )
        self.cpu_seconds = metrics.Counter("motionserve_cpu_seconds", "Billed CPU seconds.")
        self.work_units = metrics.Counter(
            "motionserve_work_units", "Diffusion work units (UNet-evaluations at 512x512)."
        )
        self.dollars = metrics.Counter(
            "motionserve_dollars", "Cost of finished jobs in USD.", tag_keys=("pricing",)
        )
        self.cache_hits = metrics.Counter(
            "motionserve_cache_hits", "Stage calls served from the cache.", tag_keys=("stage",)
        )

    def state(self, state: str) -> None:
        self.jobs.inc(tags={"state": state})

    def queue_depth(self, active: int) -> None:
        self.active.set(active)

    def finished(self, ledger: list[dict[str, Any]], report: dict[str, Any] | None) -> None:
        """Count a finished job's stage calls and costs (its ledger and report)."""
        for record in ledger:
            device = "gpu" if str(record.get("device", "cpu")).startswith("cuda") else "cpu"
            seconds = record["gpu_s"] if device == "gpu" else record["cpu_s"]
            self.stage_seconds.observe(seconds, tags={"stage": record["stage"], "device": device})
            if record.get("cache_hit"):
                self.cache_hits.inc(tags={"stage": record["stage"]})
        if not report:
            return
        plan = report["preview"] if report.get("kind") == "preview" else report["plan"]
        _add(self.gpu_seconds, plan["gpu_seconds"])
        _add(self.cpu_seconds, plan["cpu_seconds"])
        units = plan["work_units"]
        _add(self.work_units, WorkUnits.model_validate(units).total)
        for pricing, value in plan["dollars"].items():
            _add(self.dollars, value, {"pricing": pricing})


def _add(counter, value: float, tags: dict[str, str] | None = None) -> None:
    """Counters only take positive increments; a job that cost nothing adds nothing."""
    if value > 0:
        counter.inc(value, tags=tags)


class BatchMetrics:
    """Micro-batch sizes (lives in the diffusion replica)."""

    def __init__(self):
        self.size = metrics.Histogram(
            "motionserve_batch_size",
            "Chunk requests per executed diffusion batch.",
            boundaries=BATCH_SIZE_BUCKETS,
        )
        self.frames = metrics.Histogram(
            "motionserve_batch_frames",
            "Frames per executed diffusion batch.",
            boundaries=[1, 4, 8, 16, 32, 64, 128, 256],
        )

    def batch(self, requests: int, frames: int) -> None:
        self.size.observe(requests)
        self.frames.observe(frames)


class _NoBatchMetrics:
    def batch(self, requests: int, frames: int) -> None:
        pass


def batch_metrics() -> BatchMetrics | _NoBatchMetrics:
    """Serve metrics exist only inside a replica; the server class used directly (tests,
    scripts) records nothing."""
    from ray.serve.exceptions import RayServeException

    try:
        return BatchMetrics()
    except RayServeException:
        return _NoBatchMetrics()
