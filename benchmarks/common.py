"""What every benchmark shares: where results go, which machine measured them, torch threads.

Results land in `benchmarks/results/` on a CPU-only machine and in
`benchmarks/results/<gpu name>/` where CUDA is available, so GPU numbers never overwrite the
CPU ones and say which device made them. `MOTIONSERVE_BENCH_RESULTS` overrides both (`make
bench` points it at `benchmarks/results/quick/`, which git ignores: quick runs are a smoke
check, the committed results are full runs).
"""

from __future__ import annotations

import json
import os
import platform
import re
from functools import cache
from pathlib import Path
from typing import Any

RESULTS_ROOT = Path(__file__).parent / "results"
RESULTS_ENV = "MOTIONSERVE_BENCH_RESULTS"


@cache
def gpu_name() -> str | None:
    """The CUDA device's name, or None without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (a folder name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_dir() -> Path:
    """Where this run's JSON and plots go (created)."""
    override = os.environ.get(RESULTS_ENV)
    if override:
        directory = Path(override)
    elif gpu_name():
        directory = RESULTS_ROOT / device_slug(gpu_name())
    else:
        directory = RESULTS_ROOT
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def write_json(path: Path, result: dict[str, Any], default=None) -> Path:
    """A benchmark's result as indented JSON (folders created); `default` as in json.dumps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=default) + "\n")
    return path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> dict[str, Any]:
    """The machine a result came from: CPU, cores, GPU, Python, and the 1-minute load average
    when the summary is taken (batching and cost take it at their start, the others at their
    end; benchmarks that need both record their own)."""
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def machine_label(summary: dict[str, Any]) -> str:
    """A short line for plot titles: 'NVIDIA L4, 8 cores, load 0.4'."""
    device = summary.get("gpu") or summary.get("cpu", "?")
    cores, load = summary.get("cpu_count", "?"), summary.get("load_average_1m", "?")
    return f"{device}, {cores} cores, load {load}"


def pin_threads(threads: int) -> None:
    """Fix torch's CPU threads: on a shared 2-core machine two threads can be far slower."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only settable before the first parallel work; already fixed then
        pass
