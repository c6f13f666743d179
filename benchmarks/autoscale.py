"""Spot autoscaling on one machine: Ray's real autoscaler (v2) on its fake multi-node provider,
the app from a config derived from serve/configs/scale.yaml (serve/autoscale_scenario.py).

Measured, in one run on one cluster:

- scale-from-zero latency: from the burst's first request to the first Diffusion replica
  running (a spot node launched, Ray started on it, the replica built its models);
- jobs lost and chunk calls retried when a spot node is hard-killed mid-job, and when one is
  drained with a preemption notice mid-job (lost must be 0 in both);
- from the last job's end to the last GPU node gone (idle_timeout_s of the GPU groups: 10 s);
- the on-demand fallback when the spot group has no capacity.

Writes benchmarks/results/autoscale.json and autoscale.png (GPU nodes per group, Diffusion
replicas and jobs in flight over time, the faults marked).

    python -m benchmarks.autoscale
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import machine_label, machine_summary, results_dir, write_json
from serve.autoscale_scenario import Scenario, job_summary


def run() -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="msb-", dir="/tmp"))  # short: Ray's socket paths
    scenario = Scenario(root)
    started = time.monotonic()
    result: dict[str, Any] = {"when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        scenario.start()
        burst = scenario.burst(jobs=3)
        result["burst"] = {**_without_jobs(burst), **job_summary(burst["jobs"])}
        kill = scenario.fault("kill", jobs=3)
        result["hard_kill"] = job_summary(kill["jobs"])
        drain = scenario.fault("drain", jobs=2)
        result["drain"] = job_summary(drain["jobs"])
        result["idle"] = {**scenario.idle(), "idle_timeout_s": scenario.idle_timeout_s}
        fallback = scenario.fallback(jobs=1)
        result["fallback"] = {
            "spot_nodes_during": fallback["spot_nodes_during"],
            **job_summary(fallback["jobs"]),
        }
    finally:
        result["timeline"] = scenario.timeline.as_dict()
        scenario.stop()
    result["total_s"] = round(time.monotonic() - started, 1)
    result["machine"] = machine_summary()
    return result


def _without_jobs(phase: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in phase.items() if k != "jobs"}


MARKED_EVENTS = ("burst submitted", "spot node killed", "spot node drained",
                 "last GPU node gone", "spot capacity gone (max 0)")  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["timeline"]["samples"]
    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    ax.step(t, [s["spot"] for s in samples], where="post", label="spot GPU nodes")
    ax.step(t, [s["on_demand"] for s in samples], where="post", label="on-demand GPU nodes")
    ax.step(t, [s["diffusion"] for s in samples], where="post", label="Diffusion replicas",
            linestyle="--")  # fmt: skip
    ax.step(t, [s["jobs"] for s in samples], where="post", label="jobs in flight", alpha=0.5)
    top = ax.get_ylim()[1]
    marked = [e for e in result["timeline"]["events"] if e["event"] in MARKED_EVENTS]
    for i, event in enumerate(marked):
        ax.axvline(event["t"], color="grey", linewidth=0.8)
        # labels alternate between two heights: events can fall within a second of each other
        ax.text(event["t"], top * (0.97 if i % 2 == 0 else 0.55), " " + event["event"],
                fontsize=7, rotation=90, va="top")  # fmt: skip
    ax.set_xlabel("seconds")
    ax.set_ylabel("count")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(
        f"motionserve spot autoscaling (fake multi-node provider), {result['when']} "
        f"({machine_label(result['machine'])})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw autoscale.png from the existing autoscale.json")  # fmt: skip
    args = parser.parse_args(argv)
    if args.plot_only:
        out = results_dir()
        plot(json.loads((out / "autoscale.json").read_text()), out / "autoscale.png")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("ray", "ray.serve", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    result = run()
    out = results_dir()
    write_json(out / "autoscale.json", result)
    plot(result, out / "autoscale.png")
    print(
        f"scale from zero {result['burst']['scale_from_zero_s']} s; jobs lost: hard kill "
        f"{result['hard_kill']['lost']}, drain {result['drain']['lost']}; chunk calls retried: "
        f"hard kill {result['hard_kill']['chunk_retries']}, drain "
        f"{result['drain']['chunk_retries']}; last GPU node gone "
        f"{result['idle']['nodes_to_zero_s']} s after the last job"
    )
    bad = result["hard_kill"]["lost"] or result["drain"]["lost"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
