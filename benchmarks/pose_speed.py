"""Pose speed: MediaPipe Pose frames/s and CPU-seconds/frame on ONE core, per model complexity.

Target: >= 25 frames/s on one core at 512 px width in tracking mode. Real frames of the sample
video are decoded first (not timed), then `PoseExtractor.extract` runs chunk by chunk (16 frames,
as the pipeline calls it) with the process pinned to one core before MediaPipe creates its
threads, so every thread it starts shares that core (the same as `taskset -c 0`). CPU time is
the process's user+system time over all threads. Complexities whose model is not bundled in the
mediapipe wheel are reported as such (they would need a download, which motionserve refuses).

    python -m benchmarks.pose_speed [--frames 150] [--complexity 0 1] [--cpu 0] [--max-seconds 30]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.common import machine_summary, results_dir, write_json
from deployments.pose import PoseExtractor, PoseSettings, bundled_model_complexities
from deployments.video import DecodeSettings, decode_all
from serve.config import Settings
from serve.samples import sample_video_path

TARGET_FPS = 25.0
CHUNK_FRAMES = 16
# Graph creation and the first detection are start-up costs, timed apart from the throughput.
WARMUP_FRAMES = 8


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_count() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1


def measure(frames: np.ndarray, fps: float, complexity: int, max_seconds: float) -> dict:
    if complexity not in bundled_model_complexities():
        return {"model_complexity": complexity, "status": "model not bundled in the wheel"}
    settings = PoseSettings(model_complexity=complexity, tracking=True)
    threads_before = thread_count()
    with PoseExtractor(settings) as extractor:
        start = time.perf_counter()
        extractor.extract(frames[:WARMUP_FRAMES], fps)
        startup_s = time.perf_counter() - start
        threads = thread_count() - threads_before
        timed = frames[WARMUP_FRAMES:]
        wall0, cpu0, done, found = time.perf_counter(), cpu_seconds(), 0, 0
        for begin in range(0, len(timed), CHUNK_FRAMES):
            seq = extractor.extract(timed[begin : begin + CHUNK_FRAMES], fps)
            done, found = done + len(seq), found + int(seq.present.sum())
            if time.perf_counter() - wall0 > max_seconds:
                break
        wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    return {
        "model_complexity": complexity,
        "status": "ok",
        "frames": done,
        "wall_s": round(wall, 3),
        "frames_per_s": round(done / wall, 1),
        "cpu_s_per_frame": round(cpu / done, 4),
        "cpu_per_wall": round(cpu / wall, 2),
        "person_found_fraction": round(found / done, 3),
        "startup_s": round(startup_s, 3),
        "threads_started_by_mediapipe": threads,
        "meets_target": done / wall >= TARGET_FPS,
    }


def print_table(result: dict) -> None:
    print(
        f"pose at {result['width']}x{result['height']}, tracking, cores {result['cpu_affinity']}"
        f" (target >= {TARGET_FPS:g} frames/s)"
    )
    print(f"{'complexity':>10} {'frames':>6} {'fps':>7} {'cpu s/frame':>11} {'found':>6}  target")
    for row in result["results"]:
        if row["status"] != "ok":
            print(f"{row['model_complexity']:>10}  {row['status']}")
            continue
        print(
            f"{row['model_complexity']:>10} {row['frames']:>6} {row['frames_per_s']:>7} "
            f"{row['cpu_s_per_frame']:>11} {row['person_found_fraction']:>6}  "
            f"{'met' if row['meets_target'] else 'MISSED'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--video", type=Path, help="input video (default: the sample clip)")
    parser.add_argument("--frames", type=int, default=150, help="frames to decode and time")
    parser.add_argument("--width", type=int, default=512, help="pose input width in pixels")
    parser.add_argument("--fps", type=float, default=30.0, help="decode frame rate")
    parser.add_argument(
        "--complexity", type=int, nargs="+", default=[0, 1], choices=[0, 1, 2], help="models"
    )
    parser.add_argument(
        "--cpu", type=int, default=0, help="core to pin to; -1 leaves the affinity as it is"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=30.0, help="time budget per complexity"
    )
    parser.add_argument("--output", type=Path, help="JSON result file (default: results dir)")
    args = parser.parse_args()
    args.output = args.output or results_dir() / "pose_speed.json"

    video = args.video or sample_video_path(Settings().cache_dir)
    frames = decode_all(
        video, DecodeSettings(fps=args.fps, width=args.width, max_frames=args.frames)
    )
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})  # before MediaPipe starts its threads
    results = [measure(frames, args.fps, c, args.max_seconds) for c in args.complexity]
    result = {
        "benchmark": "pose_speed",
        "video": video.name,
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
        "decode_fps": args.fps,
        "chunk_frames": CHUNK_FRAMES,
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "target_frames_per_s": TARGET_FPS,
        "results": results,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_summary(),
        "note": "one pinned core; the machine was shared with other jobs, so numbers are a "
        "lower bound",
    }
    write_json(args.output, result)
    print_table(result)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
