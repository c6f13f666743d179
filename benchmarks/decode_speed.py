"""Decode speed: a 10 s 1080p30 H.264 clip decoded to 12 fps at 512 px width.

Target (issue 4): >= 5x realtime. The clip is made from the real sample video (scaled to 1080p,
looped to 10 s, encoded with x264 'medium' and B-frames like a camera file) and cached.

    python -m benchmarks.decode_speed [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import machine_summary, results_dir, write_json
from benchmarks.fixtures import make_1080p_clip
from deployments.video import DecodeSettings, decode_chunks
from serve.config import Settings


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(clip: Path, repeats: int) -> dict:
    settings = DecodeSettings(fps=12, width=512)
    walls, cpus, frames = [], [], 0
    for _ in range(repeats):
        wall0, cpu0 = time.perf_counter(), cpu_seconds()
        frames = sum(len(chunk.frames) for chunk in decode_chunks(clip, settings))
        walls.append(time.perf_counter() - wall0)
        cpus.append(cpu_seconds() - cpu0)
    best = min(walls)
    return {
        "clip": clip.name,
        "output_frames": frames,
        "wall_s_best": round(best, 3),
        "wall_s_all": [round(w, 3) for w in walls],
        "cpu_s_best": round(min(cpus), 3),
        "realtime_factor": round(10.0 / best, 2),
        "target_realtime_factor": 5.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs; the best is reported")
    args = parser.parse_args()
    clip = make_1080p_clip(Settings().cache_dir)
    result = measure(clip, args.repeats)
    result.update(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine_summary(),
        note="decode uses libavcodec frame threads on all cores of the machine",
    )
    output = write_json(results_dir() / "decode_speed.json", result)
    print(f"{'clip':32} {'frames':>6} {'wall s':>7} {'cpu s':>6} {'x realtime':>10}")
    print(
        f"{result['clip']:32} {result['output_frames']:>6} {result['wall_s_best']:>7} "
        f"{result['cpu_s_best']:>6} {result['realtime_factor']:>10} (target >= 5)"
    )
    print(f"written to {output}")


if __name__ == "__main__":
    main()
