"""Frame interpolation: quality on real frames, single-core speed, before/after upscaling.

Quality: the real sample clip decoded at its native 30 fps and 512 px wide. The default
settings were tuned on frames 0-114 (first half); they are evaluated on frames 115-229 (second
half, which also holds exposure flicker): skip-one triples (frames i, i+2 -> true i+1, t=1/2)
and skip-three runs (i, i+4 -> i+1, i+2, i+3 at t=1/4, 1/2, 3/4: motion like 7.5 fps). Every
method is compared in the same run with two baselines: (a) the average of the neighbours, (b) a
plain symmetric half-flow warp (full-size DIS 'medium' both ways, flows scaled by t, bilinear,
50/50 blend). PSNR on RGB, SSIM (Gaussian window, sigma 1.5) on luma.

Speed: a worker pinned to one core (`taskset -c 0`, cv2.setNumThreads(1)) times 512x512
frames; every timing is the best of several repeats, because the machine is shared with other
work. It also times the OpenCV flow methods considered, and the cost of interpolating after a
4x upscale (emulated with bicubic resizing) with the flow from the small frames.

    python -m benchmarks.interpolation [--quick] [--repeats 3] [--upscale 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import machine_summary, results_dir, write_json
from deployments.interpolate import FlowBackend, FrameRetimer, InterpolationSettings
from deployments.video import DecodeSettings, decode_all
from serve.config import Settings
from serve.samples import sample_video_path

TUNE_FRAMES = range(0, 115)
EVAL_FRAMES = range(115, 230)
TARGET_FPS = 25.0

Interpolator = Callable[[np.ndarray, np.ndarray, list[float]], list[np.ndarray]]


# ------------------------------------------------------------------------------- methods


def neighbour_average(frame0, frame1, times):
    return [cv2.addWeighted(frame0, 1 - t, frame1, t, 0) for t in times]


def plain_half_flow_warp(frame0, frame1, times):
    """Baseline (b): full-size DIS medium both ways, flows scaled by t, 50/50, bilinear."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    grey0 = cv2.cvtColor(frame0, cv2.COLOR_RGB2GRAY)
    grey1 = cv2.cvtColor(frame1, cv2.COLOR_RGB2GRAY)
    flow01, flow10 = dis.calc(grey0, grey1, None), dis.calc(grey1, grey0, None)
    height, width = grey0.shape
    gx, gy = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    out = []
    for t in times:
        maps0 = (gx - t * flow01[..., 0], gy - t * flow01[..., 1])
        maps1 = (gx - (1 - t) * flow10[..., 0], gy - (1 - t) * flow10[..., 1])
        warped0 = cv2.remap(frame0, *maps0, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        warped1 = cv2.remap(frame1, *maps1, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out.append(cv2.addWeighted(warped0, 0.5, warped1, 0.5, 0))
    return out


def flow_method(**options) -> Interpolator:
    backend = FlowBackend(InterpolationSettings(**options))
    return backend.interpolate


# Name -> (factory, what it shows). Factories build fresh objects per process.
METHODS: dict[str, tuple[Callable[[], Interpolator], str]] = {
    "average": (lambda: neighbour_average, "baseline (a): average of the neighbours"),
    "plain-dis-warp": (lambda: plain_half_flow_warp, "baseline (b): DIS medium, 50/50"),
    "flow (default)": (lambda: flow_method(), "the default backend"),
    "flow no-shift": (lambda: flow_method(candidate_shift_px=0), "without shifted candidates"),
    "flow bilinear": (lambda: flow_method(sampling="linear"), "bilinear colour sampling"),
    "flow +occlusion": (lambda: flow_method(occlusion=True), "with occlusion weights"),
    "flow scale 1.0": (lambda: flow_method(flow_scale=1.0), "flow on full-size frames"),
    "flow scale 0.5": (lambda: flow_method(flow_scale=0.5), "flow on half-size frames"),
}


# ------------------------------------------------------------------------------- metrics


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of the luma (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5)."""
    x, y = luma(a), luma(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(image):
        return cv2.GaussianBlur(image, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return float(np.mean((numerator / denominator)[5:-5, 5:-5]))


def detail(rgb: np.ndarray) -> float:
    """Mean absolute Laplacian of the luma: how much fine detail a frame holds."""
    return float(np.mean(np.abs(cv2.Laplacian(luma(rgb), cv2.CV_64F))))


# ------------------------------------------------------------------------------ datasets


def eval_sets(frames: np.ndarray, step: int) -> dict[str, list[tuple[int, int, list[int]]]]:
    """(first, last, truths) groups: interpolate frames first and last, compare with truths."""

    def groups(frame_range: range, gap: int, stride: int):
        last = frame_range.stop - 1
        return [
            (i, i + gap, list(range(i + 1, i + gap)))
            for i in range(frame_range.start, last - gap + 1, stride)
        ]

    return {
        "eval skip-1": groups(EVAL_FRAMES, 2, step),
        "eval skip-3": groups(EVAL_FRAMES, 4, 4 * max(1, step // 2)),
        "tuning skip-1": groups(TUNE_FRAMES, 2, 2 * step),
    }


def measure_quality(frames: np.ndarray, sets: dict, names: list[str]) -> dict:
    results: dict[str, dict] = {}
    for name in names:
        method = METHODS[name][0]()
        results[name] = {}
        for set_name, groups in sets.items():
            psnrs, ssims, details, true_details = [], [], [], []
            for first, last, truths in groups:
                gap = last - first
                times = [(k - first) / gap for k in truths]
                outs = method(frames[first], frames[last], times)
                for out, k in zip(outs, truths, strict=True):
                    psnrs.append(psnr(out, frames[k]))
                    ssims.append(ssim(out, frames[k]))
                    details.append(detail(out))
                    true_details.append(detail(frames[k]))
            results[name][set_name] = {
                "psnr": round(float(np.mean(psnrs)), 3),
                "ssim": round(float(np.mean(ssims)), 4),
                # Below 1: interpolated frames are softer than real ones (a visible pulse).
                "detail_kept": round(float(np.sum(details) / np.sum(true_details)), 3),
                "frames": len(psnrs),
            }
        print(f"  quality: {name:18} done", file=sys.stderr, flush=True)
    return results


def upscale_quality(frames: np.ndarray, factor: int, count: int) -> dict:
    """PSNR at output size of: interpolate then upscale, vs upscale then interpolate with the
    flow from the small frames, vs upscale then interpolate with flow on the large frames."""
    scores: dict[str, list[float]] = {name: [] for name in UPSCALE_WAYS}
    for i in list(EVAL_FRAMES)[: 2 * count : 2]:
        small0, small1, truth = frames[i], frames[i + 2], frames[i + 1]
        large_truth = _upscale(truth, factor)
        for name, way in UPSCALE_WAYS.items():
            scores[name].append(psnr(way(small0, small1, factor), large_truth))
    return {name: round(float(np.mean(values)), 3) for name, values in scores.items()}


def _before(small0, small1, factor, backend=FlowBackend()):  # noqa: B008 (one shared backend)
    return _upscale(backend.interpolate(small0, small1, [0.5])[0], factor)


def _after_small_flow(sampling: str):
    backend = FlowBackend(InterpolationSettings(sampling=sampling))

    def way(small0, small1, factor):
        large0, large1 = _upscale(small0, factor), _upscale(small1, factor)
        return backend.interpolate_with_flow_from(small0, small1, large0, large1, [0.5])[0]

    return way


def _after_large_flow(small0, small1, factor, backend=FlowBackend()):  # noqa: B008
    return backend.interpolate(_upscale(small0, factor), _upscale(small1, factor), [0.5])[0]


UPSCALE_WAYS = {
    "before: interpolate small, then upscale": _before,
    "after: flow from small frames (bilinear)": _after_small_flow("auto"),
    "after: flow from small frames, bicubic": _after_small_flow("cubic"),
    "after: flow on the large frames": _after_large_flow,
}


def _upscale(frame: np.ndarray, factor: int) -> np.ndarray:
    height, width = frame.shape[:2]
    return cv2.resize(frame, (width * factor, height * factor), interpolation=cv2.INTER_CUBIC)


# -------------------------------------------------------------------------- speed worker


def best_seconds(fn: Callable[[], object], repeats: int, inner: int) -> float:
    """Wall seconds of the fastest of repeats * inner calls: on a shared machine, the least
    disturbed one."""
    return best_seconds_each({"only": fn}, repeats, inner)["only"][0]


def best_seconds_each(
    fns: dict[str, Callable[[], object]], repeats: int, inner: int
) -> dict[str, tuple[float, float]]:
    """(best wall seconds, best CPU seconds) per function, taking turns so that bursts of load
    from other work hit them all alike. CPU time (this single-threaded process) is what the
    call costs one core when other work preempts it; wall time includes the preemption."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(inner):
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def flow_methods() -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    def dis(preset):
        engine = cv2.DISOpticalFlow_create(preset)
        return lambda a, b: engine.calc(a, b, None)

    def farneback(a, b):
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 4, 15, 3, 5, 1.2, 0)

    def rlof(a, b):
        bgr = cv2.COLOR_GRAY2BGR
        return cv2.optflow.calcOpticalFlowDenseRLOF(
            cv2.cvtColor(a, bgr), cv2.cvtColor(b, bgr), None
        )

    pca, deep = cv2.optflow.createOptFlow_PCAFlow(), cv2.optflow.createOptFlow_DeepFlow()
    return {
        "DIS ultrafast": dis(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST),
        "DIS fast": dis(cv2.DISOPTICAL_FLOW_PRESET_FAST),
        "DIS medium": dis(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM),
        "Farneback": farneback,
        "PCAFlow": lambda a, b: pca.calc(a, b, None),
        "DenseRLOF": rlof,
        "DeepFlow": lambda a, b: deep.calc(a, b, None),
    }


def half_flow_warp_with(flow, frame0, frame1):
    """Baseline (b) with another flow method: for the flow-method quality column."""
    grey0 = cv2.cvtColor(frame0, cv2.COLOR_RGB2GRAY)
    grey1 = cv2.cvtColor(frame1, cv2.COLOR_RGB2GRAY)
    flow01, flow10 = flow(grey0, grey1), flow(grey1, grey0)
    height, width = grey0.shape
    gx, gy = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    warp = {"interpolation": cv2.INTER_LINEAR, "borderMode": cv2.BORDER_REPLICATE}
    warped0 = cv2.remap(frame0, gx - flow01[..., 0] / 2, gy - flow01[..., 1] / 2, **warp)
    warped1 = cv2.remap(frame1, gx - flow10[..., 0] / 2, gy - flow10[..., 1] / 2, **warp)
    return cv2.addWeighted(warped0, 0.5, warped1, 0.5, 0)


def speed_worker(args: argparse.Namespace) -> dict:
    """Runs on one core; prints its results as JSON on stdout."""
    cv2.setNumThreads(1)
    source = sample_video_path(Settings().cache_dir)
    square = decode_all(source, DecodeSettings(fps=12, width=512, height=512, max_frames=13))
    wide = decode_all(source, DecodeSettings(fps=30, width=512, max_frames=130))
    frame0, frame1 = square[4], square[5]
    repeats, inner = args.repeats, 3 if args.quick else 8
    result: dict = {"methods": {}, "flow_methods": {}, "retime": {}, "upscale": {}}
    calls = {}
    for name in args.methods:
        method = METHODS[name][0]()
        calls[name] = lambda m=method: m(frame0, frame1, [0.5])
    for name, (wall, cpu) in best_seconds_each(calls, repeats, inner).items():
        result["methods"][name] = {
            "ms_per_frame": round(wall * 1e3, 2),
            "fps": round(1 / wall, 2),
            "cpu_ms_per_frame": round(cpu * 1e3, 2),
            "cpu_fps": round(1 / cpu, 2),
        }
    result["retime"] = retime_speed(square, repeats)
    result["flow_methods"] = flow_method_table(wide, args.quick)
    result["upscale"] = upscale_speed(wide[100], wide[102], args.upscale, repeats)
    result["upscale"]["learned_upscaler_s"] = learned_upscaler_seconds(wide[100], args.upscale)
    return result


def learned_upscaler_seconds(frame: np.ndarray, factor: int) -> dict:
    """One-core seconds per frame of the Real-ESRGAN general-x4v3 architecture (SRVGGNetCompact,
    64 features, 32 convs) with random weights: what each extra upscaled frame costs."""
    import torch
    from spandrel.architectures.Compact import Compact

    torch.set_num_threads(1)
    model = Compact(num_feat=64, num_conv=32, upscale=factor).eval()
    image = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        model(image[..., :64, :64])  # warm-up
        seconds = best_seconds(lambda: model(image), 1, 1)
    height, width = frame.shape[:2]
    return {
        "model": "SRVGGNetCompact 64x32 (realesr-general-x4v3 shape)",
        "size": f"{width}x{height}",
        "s_per_frame": round(seconds, 3),
    }


def retime_speed(frames: np.ndarray, repeats: int) -> dict:
    """12 -> 25 fps over 13 frames of 512x512: output frames per second (exact ones included)."""
    produced = 0

    def run():
        nonlocal produced
        produced = sum(1 for _ in FrameRetimer(12, 25).run([frames]))

    wall, cpu = best_seconds_each({"retime": run}, repeats, 1)["retime"]
    return {
        "in_fps": 12,
        "out_fps": 25,
        "source_frames": len(frames),
        "output_frames": produced,
        "output_fps": round(produced / wall, 2),
        "ms_per_output_frame": round(wall / produced * 1e3, 2),
        "cpu_output_fps": round(produced / cpu, 2),
    }


def flow_method_table(frames: np.ndarray, quick: bool) -> dict:
    """Per-flow time at 512x288 and the plain half-flow warp quality (first-half triples)."""
    table = {}
    # The same few triples for every method (the slow ones bound how many).
    triples = list(TUNE_FRAMES)[4 : 112 : 36 if quick else 18]
    grey0 = cv2.cvtColor(frames[60], cv2.COLOR_RGB2GRAY)
    grey1 = cv2.cvtColor(frames[62], cv2.COLOR_RGB2GRAY)
    for name, flow in flow_methods().items():
        slow = name in ("DenseRLOF", "DeepFlow")

        def one_flow(f=flow):
            f(grey0, grey1)

        seconds = best_seconds(one_flow, 2 if slow else 3, 1 if slow else 5)
        scores = [
            psnr(half_flow_warp_with(flow, frames[i], frames[i + 2]), frames[i + 1])
            for i in triples
        ]
        table[name] = {
            "ms_per_flow_512x288": round(seconds * 1e3, 2),
            "half_warp_psnr": round(float(np.mean(scores)), 3),
            "triples_first_frames": triples,
        }
        print(f"  flow method: {name:14} done", file=sys.stderr, flush=True)
    return table


def upscale_speed(small0: np.ndarray, small1: np.ndarray, factor: int, repeats: int) -> dict:
    """Seconds per interpolated output frame, before the (emulated) upscale or after it. The
    upscale itself is excluded from the 'after' ways (it is paid for source frames only) and
    included in 'before' (paid for every output frame, here only a cheap bicubic resize)."""
    large0, large1 = _upscale(small0, factor), _upscale(small1, factor)
    calls = {}
    for name, way in UPSCALE_WAYS.items():
        if name.startswith("before"):
            calls[name] = lambda w=way: w(small0, small1, factor)
            continue
        sampling = "cubic" if "bicubic" in name else "auto"
        backend = FlowBackend(InterpolationSettings(sampling=sampling))
        if "small" in name:
            guides = (small0, small1)
        else:
            guides = (large0, large1)
        calls[name] = lambda b=backend, g=guides: b.interpolate_with_flow_from(
            *g, large0, large1, [0.5]
        )
    seconds = best_seconds_each(calls, repeats, 2)
    height, width = large0.shape[:2]
    return {
        "small_size": f"{small0.shape[1]}x{small0.shape[0]}",
        "large_size": f"{width}x{height}",
        "s_per_frame": {name: round(wall, 4) for name, (wall, _) in seconds.items()},
        "resize_only_s": best_seconds(lambda: _upscale(small0, factor), repeats, 3),
    }


def run_speed_worker(args: argparse.Namespace) -> tuple[dict, str]:
    command = [sys.executable, "-m", "benchmarks.interpolation", "--speed-worker"]
    command += ["--repeats", str(args.repeats), "--upscale", str(args.upscale)]
    command += ["--quick"] if args.quick else []
    pinned = shutil.which("taskset") is not None
    if pinned:
        command = ["taskset", "-c", "0", *command]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=_repo_root())
    note = "taskset -c 0 and cv2.setNumThreads(1)" if pinned else "cv2.setNumThreads(1) only"
    return json.loads(out.stdout), note


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------- report


def print_report(result: dict) -> None:
    quality, speed = result["quality"], result["speed"]
    sets = list(next(iter(quality.values())))
    header = f"{'method':16}" + "".join(
        f" {s + ' PSNR':>19} {'SSIM':>6} {'detail':>6}" for s in sets
    )
    print(header + f" {'512x512 fps, 1 core':>20} {'(CPU time)':>10}")
    for name, per_set in quality.items():
        row = f"{name:16}"
        for s in sets:
            values = per_set[s]
            row += f" {values['psnr']:>19.3f} {values['ssim']:>6.4f} {values['detail_kept']:>6.3f}"
        timing = speed["methods"][name]
        print(row + f" {timing['fps']:>20.1f} {timing['cpu_fps']:>10.1f}")
    print("(detail: fine detail kept, mean |Laplacian| of the output over that of the true frame)")
    default = speed["methods"]["flow (default)"]
    print(
        f"default at 512x512 on one core: {default['fps']:.1f} frames/s wall, "
        f"{default['cpu_fps']:.1f} by CPU time (target >= {TARGET_FPS:g})"
    )
    retime = speed["retime"]
    print(
        f"\nretime 12->25 fps, 512x512, one core: {retime['output_fps']} output frames/s "
        f"({retime['ms_per_output_frame']} ms each; by CPU time {retime['cpu_output_fps']}/s)"
    )
    print(f"\n{'flow method (half-warp)':24} {'ms/flow 512x288':>16} {'PSNR':>8}")
    for name, row in speed["flow_methods"].items():
        print(f"{name:24} {row['ms_per_flow_512x288']:>16.2f} {row['half_warp_psnr']:>8.3f}")
    up = speed["upscale"]
    print(f"\ninterpolation and a {result['upscale_factor']}x upscale ({up['large_size']}):")
    for name, seconds in up["s_per_frame"].items():
        psnr_value = result["upscale_quality"][name]
        print(f"  {name:42} {seconds:7.3f} s/frame   PSNR {psnr_value:.3f}")
    print(f"  (bicubic resize alone: {up['resize_only_s']:.3f} s/frame)")
    learned = up["learned_upscaler_s"]
    print(
        f"  a learned upscaler ({learned['model']}, {learned['size']}, one core): "
        f"{learned['s_per_frame']:.2f} s/frame; interpolating before it means upscaling "
        f"25/12 = {25 / 12:.2f}x as many frames at 12->25 fps"
    )
    print(f"\n{result['machine_note']}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality, speed = result["quality"], result["speed"]["methods"]
    names = list(quality)
    sets = [s for s in next(iter(quality.values())) if s.startswith("eval")]
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(sets)
    for j, set_name in enumerate(sets):
        values = [quality[n][set_name]["psnr"] for n in names]
        bars.bar(np.arange(len(names)) + j * width, values, width, label=set_name)
    bars.set_xticks(np.arange(len(names)) + width * (len(sets) - 1) / 2)
    bars.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    low = min(quality[n][s]["psnr"] for n in names for s in sets)
    bars.set_ylim(low - 1, None)
    bars.set_ylabel("PSNR (dB), second half of the clip")
    bars.legend(fontsize=8)
    bars.set_title("Quality on real frames (not tuned on)")
    for j, name in enumerate(n for n in names if n != "average"):
        fps, value = speed[name]["fps"], quality[name]["eval skip-1"]["psnr"]
        scatter.scatter(fps, value)
        offset = (4, 6 if j % 2 else -10)
        scatter.annotate(name, (fps, value), textcoords="offset points", xytext=offset, fontsize=7)
    average = quality["average"]["eval skip-1"]["psnr"]
    scatter.axhline(average, color="grey", linestyle=":", linewidth=1)
    scatter.annotate("average of neighbours", (TARGET_FPS, average), fontsize=7)
    scatter.axvline(TARGET_FPS, color="grey", linestyle="--", linewidth=1)
    scatter.set_xlabel("512x512 frames/s on one core (best of repeats, shared machine)")
    scatter.set_ylabel("PSNR (dB), eval skip-1")
    scatter.set_title("Speed against quality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames and repeats")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats; best is kept")
    parser.add_argument("--upscale", type=int, default=4, help="emulated upscale factor")
    parser.add_argument("--speed-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.methods = list(METHODS)
    if args.speed_worker:
        print(json.dumps(speed_worker(args)))
        return
    started = time.perf_counter()
    load_before = os.getloadavg()
    frames = decode_all(sample_video_path(Settings().cache_dir), DecodeSettings(fps=30, width=512))
    sets = eval_sets(frames, step=4 if args.quick else 1)
    quality = measure_quality(frames, sets, args.methods)
    upscale = upscale_quality(frames, args.upscale, count=3 if args.quick else 8)
    speed, pinning = run_speed_worker(args)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_summary(),
        "machine_note": (
            f"Shared machine (load average {load_before[0]:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after): timings are the best of {args.repeats} "
            f"repeats, on one core ({pinning})."
        ),
        "frames": f"sample clip at 30 fps, {frames.shape[2]}x{frames.shape[1]}",
        "tuned_on": f"frames {TUNE_FRAMES.start}-{TUNE_FRAMES.stop - 1}",
        "evaluated_on": f"frames {EVAL_FRAMES.start}-{EVAL_FRAMES.stop - 1}",
        "methods": {name: METHODS[name][1] for name in args.methods},
        "default_settings": InterpolationSettings().model_dump(),
        "quality": quality,
        "upscale_factor": args.upscale,
        "upscale_quality": upscale,
        "speed": speed,
        "target_fps_one_core_512": TARGET_FPS,
        "quick": args.quick,
        "run_s": round(time.perf_counter() - started, 1),
    }
    output = results_dir()
    write_json(output / "interpolation.json", result)
    plot(result, output / "interpolation.png")
    print_report(result)


if __name__ == "__main__":
    main()
