"""`make bench`: every benchmark once, in its quick form, one after another (never in
parallel: they time the same cores). Quick runs write to benchmarks/results/quick/ (ignored by
git: a smoke check of the whole suite); full runs to benchmarks/results/, or
benchmarks/results/<gpu name>/ on a CUDA machine (see benchmarks/common.py).

    python -m benchmarks.run_all [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchmarks.common import RESULTS_ENV, RESULTS_ROOT

# (module, quick arguments, full arguments)
BENCHMARKS = [
    ("decode_speed", ["--repeats", "1"], []),
    ("pose_speed", ["--frames", "120"], []),
    ("diffusion_units", ["--repeats", "1"], []),
    ("interpolation", ["--quick"], []),
    ("keyframe_density", ["--quick"], []),
    ("upscale", ["--repeats", "1", "--skip-rrdb"], []),
    ("batching", ["--quick"], []),
    ("overhead", ["--quick"], []),
    ("peer", ["--frames", "1"], []),  # before cost, which reports its latest ratios
    ("cost", ["--quick"], []),
    ("load", ["--quick"], []),
    ("cancel", ["--quick"], []),
    ("preview", ["--quick"], []),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick form of each")
    parser.add_argument("--only", nargs="*", help="run only these benchmarks")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.quick:
        env.setdefault(RESULTS_ENV, str(RESULTS_ROOT / "quick"))
    failures = []
    started_all = time.perf_counter()
    for name, quick, full in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        command = [sys.executable, "-m", f"benchmarks.{name}", *(quick if args.quick else full)]
        if subprocess.run(command, env=env).returncode != 0:
            failures.append(name)
        print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)
    print(f"== all: {time.perf_counter() - started_all:.0f} s", flush=True)
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
