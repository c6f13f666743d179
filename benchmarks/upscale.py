"""Upscale speed: seconds per frame from the 512x288 generation size, on CPU (or the GPU if any).

Cases: Lanczos (+ unsharp mask); realesr-animevideov3 (SRVGGNetCompact) in PyTorch at several
tile sizes, in NCHW layout (the stage uses channels-last) and in the ncnn runtime (in a process
of its own); realesrgan-x4plus (RRDB) on a 128x72 input (about 20x slower per pixel on CPU),
scaled to a 512x288 frame by pixel count. The machine may be shared with other jobs, so every
case runs `--repeats` times after two warm-up runs, round-robin over the cases, and the best is
reported (all runs are in the JSON); CPU seconds count every thread.

    python -m benchmarks.upscale [--repeats 3] [--threads 2] [--skip-rrdb] [--skip-ncnn]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_summary, results_dir, write_json
from deployments.upscale import Upscaler, UpscaleSettings
from deployments.video import DecodeSettings, decode_all
from serve.config import Settings
from serve.samples import sample_video_path
from serve.weights import fetch_upscaler_weights, upscaler_dir

GENERATION_SIZE = (512, 288)
RRDB_INPUT = (128, 72)


def real_frame(cache_dir: Path, size: tuple[int, int]) -> np.ndarray:
    settings = DecodeSettings(fps=1, width=size[0], height=size[1], max_frames=1)
    return decode_all(sample_video_path(cache_dir), settings)[0]


def timed_round_robin(runs: list[Callable[[], object]], repeats: int) -> list[dict]:
    """Time every run `repeats` times, one round over all runs at a time, so a burst of load
    from other jobs on the shared machine hits every case alike instead of one of them."""
    for run in runs:
        run(), run()  # warm-up: the first runs pay page faults and kernel setup
    walls: list[list[float]] = [[] for _ in runs]
    cpus: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for index, run in enumerate(runs):
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            walls[index].append(time.perf_counter() - wall)
            cpus[index].append(time.process_time() - cpu)
    return [
        {
            "wall_s_best": round(min(w), 3),
            "cpu_s_best": round(min(c), 3),
            "wall_s_all": [round(x, 3) for x in w],
        }
        for w, c in zip(walls, cpus, strict=True)
    ]


def ncnn_runner(folder: Path, name: str, rgb: np.ndarray, threads: int) -> Callable[[], object]:
    """The original ncnn model in the ncnn runtime (default options, CPU), whole frame."""
    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads
    net.load_param(str(folder / "ncnn" / f"{name}.param"))
    net.load_model(str(folder / "ncnn" / f"{name}.bin"))
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0

    def run():
        extractor = net.create_extractor()
        mat = ncnn.Mat(chw)  # does not own `chw`; the closure keeps it alive
        extractor.input("data", mat)
        _, out = extractor.extract("output")
        return np.array(out)

    return run


def cases(args, folder: Path, frame: np.ndarray, small: np.ndarray) -> list[dict]:
    compact = str(folder / "realesr-animevideov3-x4.safetensors")
    x4 = (GENERATION_SIZE[0] * 4, GENERATION_SIZE[1] * 4)
    full_hd = (1920, 1080)
    plan = [
        ("lanczos", "opencv", 0, frame, x4, UpscaleSettings()),
        ("lanczos", "opencv", 0, frame, full_hd, UpscaleSettings()),
        ("lanczos+unsharp", "opencv", 0, frame, full_hd, UpscaleSettings(sharpen_amount=0.8)),
    ]
    for tile in (512, 256, 128):
        plan.append(("compact", "torch", tile, frame, x4, UpscaleSettings(weights=compact)))
    nchw = UpscaleSettings(weights=compact, channels_last=False)
    # None: the stage's default tile size for the device.
    plan.append(("compact", "torch-nchw", None, frame, x4, nchw))
    plan.append(("compact", "torch", None, frame, full_hd, UpscaleSettings(weights=compact)))
    if not args.skip_rrdb:
        rrdb = str(folder / "realesrgan-x4plus.safetensors")
        small_x4 = (RRDB_INPUT[0] * 4, RRDB_INPUT[1] * 4)
        plan.append(("rrdb-x4plus", "torch", None, small, small_x4, UpscaleSettings(weights=rrdb)))
    rows, runs = [], []
    for model, runtime, tile, source, out_size, settings in plan:
        settings = settings.model_copy(update={"tile_size": tile, "device": args.device})
        upscaler = Upscaler(settings)
        started = time.perf_counter()
        upscaler.load()
        load_s = time.perf_counter() - started
        batch = source[None]
        runs.append(lambda u=upscaler, b=batch, o=out_size: u.upscale(b, o))
        info = upscaler.describe()
        rows.append(
            {
                "model": model,
                "runtime": runtime,
                "threads": torch.get_num_threads(),
                "device": info["device"],
                "dtype": info["dtype"],
                "tile": info["tile_size"],
                "overlap": info["tile_overlap"],
                "input": f"{source.shape[1]}x{source.shape[0]}",
                "output": f"{out_size[0]}x{out_size[1]}",
                "load_s": round(load_s, 3),
            }
        )
    for row, timing in zip(rows, timed_round_robin(runs, args.repeats), strict=True):
        row.update(timing)
    if not args.skip_ncnn:
        rows += ncnn_rows_isolated(args, folder, frame, small)
    return rows


def ncnn_rows_isolated(args, folder: Path, frame: np.ndarray, small: np.ndarray) -> list[dict]:
    """The ncnn rows in a process of their own: ncnn's OpenMP workers spin-wait, and next to
    torch's thread pool in one process they slowed both by 10x and more on this machine."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(ncnn_rows, (args, folder, frame, small))


def ncnn_rows(args, folder: Path, frame: np.ndarray, small: np.ndarray) -> list[dict]:
    try:
        import ncnn  # noqa: F401  (a dev dependency: the reference runtime)
    except ImportError:
        print("ncnn is not installed (pip install motionserve[dev]); skipping the ncnn rows")
        return []
    plan = [("compact", "realesr-animevideov3-x4", frame)]
    if not args.skip_rrdb:
        plan.append(("rrdb-x4plus", "realesrgan-x4plus", small))
    rows, runs = [], []
    for model, name, source in plan:
        runs.append(ncnn_runner(folder, name, source, args.threads))
        height, width = source.shape[:2]
        rows.append(
            {
                "model": model,
                "runtime": "ncnn",
                "threads": args.threads,
                "device": "cpu",
                "dtype": "ncnn default",
                "tile": 0,
                "overlap": 0,
                "input": f"{width}x{height}",
                "output": f"{width * 4}x{height * 4}",
                "load_s": None,
            }
        )
    for row, timing in zip(rows, timed_round_robin(runs, args.repeats), strict=True):
        row.update(timing)
    return rows


def per_generation_frame(row: dict) -> float:
    """Best wall seconds scaled to one 512x288 input frame by pixel count."""
    width, height = (int(side) for side in row["input"].split("x"))
    factor = GENERATION_SIZE[0] * GENERATION_SIZE[1] / (width * height)
    return round(row["wall_s_best"] * factor, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; best is reported")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and ncnn)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--skip-rrdb", action="store_true", help="leave out the slow RRDB rows")
    parser.add_argument("--skip-ncnn", action="store_true", help="leave out the ncnn rows")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default: results dir)")
    args = parser.parse_args()
    args.out = args.out or results_dir() / "upscale.json"
    torch.set_num_threads(args.threads)
    cache_dir = Settings().cache_dir
    fetch_upscaler_weights(cache_dir, keep_sources=not args.skip_ncnn)
    folder = upscaler_dir(cache_dir)
    frame = real_frame(cache_dir, GENERATION_SIZE)
    small = real_frame(cache_dir, RRDB_INPUT)
    rows = cases(args, folder, frame, small)
    for row in rows:
        row["s_per_512x288_frame"] = per_generation_frame(row)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine_summary(), "torch": torch.__version__},
        "threads": args.threads,
        "repeats": args.repeats,
        "note": "shared machine: best of the repeats; RRDB rows run a 128x72 input and "
        "s_per_512x288_frame scales them by pixel count",
        "rows": rows,
    }
    write_json(args.out, result)
    header = (
        f"{'model':16} {'runtime':10} {'dev':4} {'tile':>4} {'ovl':>3} {'input':>8} "
        f"{'output':>9} {'wall s':>7} {'cpu s':>6} {'s/512x288':>9}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['model']:16} {row['runtime']:10} {row['device']:4} {row['tile']:>4} "
            f"{row['overlap']:>3} {row['input']:>8} {row['output']:>9} {row['wall_s_best']:>7} "
            f"{row['cpu_s_best']:>6} {row['s_per_512x288_frame']:>9}"
        )
    print(f"best of {args.repeats} runs on a shared machine; written to {args.out}")


if __name__ == "__main__":
    main()
