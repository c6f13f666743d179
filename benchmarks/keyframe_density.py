"""Motion-aware keyframe density: the interpolator's error against frame gap and motion, and
the displacement threshold `deployments.density` uses (issue 18, item 4).

What is measured: the interpolator the service uses (`InterpolationSettings()`, the default
DIS-flow backend) making held-out real frames from the frames around them, at the size the
`standard` plan generates the sample clip at (768x432: where the service measures its flow).

- Real: the sample clip (a person moving, 7.7 s) decoded at its native 30 fps, MediaPipe pose
  on every frame (the pose stage) smoothed as `standard` smooths it (`smooth`). For each gap g
  (2, 3, 4, 5, 6, 8 source frames: a generated rate of 15, 10, 7.5, 6, 5, 3.75 fps) and every
  `--stride`-th start i, the interpolator makes the middle frame i + g//2 from frames i and
  i+g (t = (g//2) / g: the in-between farthest from both, so the largest error of the gap;
  one per gap keeps the run within minutes on 2 shared cores), compared with the real frame:
  PSNR on RGB inside the person's box (the skeleton's bounding box over the gap, padded by
  24 px: the background is static and would hide the error), PSNR over the whole frame, SSIM
  in the box. Motion of a sample: the 95th percentile over the skeleton's 18 OpenPose joints
  of their displacement from frame i to frame i+g, pixels at 768x432: what
  `deployments.density` estimates as stride x the chunk's joint speed.
- Synthetic: a textured patch cut from a real frame slides and turns over a real background
  (speeds 1-14 px per 30 fps frame, 0.6 degrees per frame), the truth rendered exactly at the
  middle time; its motion is the p95 displacement of nine points on the patch across the gap.

The curve: box PSNR against displacement across the gap (binned), per gap and pooled. The error
budget: the in-between frames of a slow chunk generated at a lower rate must be no worse, on
average, than the in-betweens the fixed 12 fps plan makes on this clip (the mean box PSNR over
all its gaps, 12 fps = 2.5 source frames, taken as the mean of gaps 2 and 3). The threshold is
the largest displacement bin edge below which the real clip's curve, every gap pooled, stays
at or above that budget in every bin of at least 5 frames (the clip has too few slow samples
per gap; displacement, not the gap, drives the error: at equal displacement the gaps' curves
agree within their noise, and the synthetic ones, shown beside, within 2-4 dB in no order). It also
reports which joint statistic (p95 or median over joints) predicts the error better. A chunk
then takes stride s where s x its p95 joint speed (px per 12 fps frame) is within it.

Also: the schedule `deployments.density` gives the sample clip at 12 fps under that threshold
(the fraction of the clip judged slow), as the service computes it.

    python -m benchmarks.keyframe_density [--quick] [--stride 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.common import machine_summary, results_dir, write_json
from benchmarks.interpolation import psnr, ssim
from deployments.density import CALIBRATED_MAX_GAP_PX, KeyframeDensity, density_schedule
from deployments.interpolate import FlowBackend, InterpolationSettings
from deployments.motion import MotionEditor
from deployments.pose import PoseExtractor, PoseSequence
from deployments.pose_maps import openpose18_keypoints
from deployments.video import DecodeSettings, decode_all, probe
from serve.config import Settings
from serve.samples import sample_video_path

SIZE = (768, 432)  # `standard`'s generation size for the 16:9 sample clip
SOURCE_FPS = 30.0
GAPS = (2, 3, 4, 5, 6, 8)  # source frames at 30 fps: 15, 10, 7.5, 6, 5, 3.75 fps
BUDGET_GAPS = (2, 3)  # 12 fps = 2.5 source frames: the fixed plan's in-betweens
BINS = (0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 1000)
BOX_PAD = 24
MIN_BIN_SAMPLES = 5
SYNTH_SPEEDS = (1, 2, 3, 4, 6, 8, 10, 14)  # px per 30 fps frame
SYNTH_TURN_DEG = 0.6  # per 30 fps frame
SYNTH_FRAMES = 25


# ------------------------------------------------------------------------------ real frames


def real_samples(frames: np.ndarray, poses: PoseSequence, stride: int) -> list[dict[str, Any]]:
    backend = FlowBackend(InterpolationSettings())
    points = openpose18_keypoints(poses.landmarks)  # the joints density measures
    samples = []
    for gap in GAPS:
        for start in range(0, len(frames) - gap, stride):
            stop = start + gap
            if not (poses.present[start] and poses.present[stop]):
                continue
            moved = np.linalg.norm(points[stop] - points[start], axis=-1)
            moved = moved[np.isfinite(moved)]
            if not len(moved):
                continue
            box = person_box(points[start : stop + 1])
            k = gap // 2  # the middle frame: the farthest from both, the largest error
            for out in backend.interpolate(frames[start], frames[stop], [k / gap]):
                truth = frames[start + k]
                samples.append(
                    {
                        "gap": gap,
                        "start": start,
                        "displacement_px": float(np.percentile(moved, 95)),
                        "displacement_p50_px": float(np.percentile(moved, 50)),
                        "box_psnr": psnr(crop(out, box), crop(truth, box)),
                        "frame_psnr": psnr(out, truth),
                        "box_ssim": ssim(crop(out, box), crop(truth, box)),
                    }
                )
        print(f"  real: gap {gap} done ({len(samples)} frames)", file=sys.stderr, flush=True)
    return samples


def person_box(points: np.ndarray) -> tuple[int, int, int, int]:
    xy = points.reshape(-1, 2)
    xy = xy[np.isfinite(xy).all(axis=1)]
    x0, y0 = np.floor(xy.min(axis=0)) - BOX_PAD
    x1, y1 = np.ceil(xy.max(axis=0)) + BOX_PAD
    width, height = SIZE
    return int(max(0, x0)), int(max(0, y0)), int(min(width, x1)), int(min(height, y1))


def crop(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return frame[y0:y1, x0:x1]


# ------------------------------------------------------------------------- synthetic moves


def synthetic_samples(background: np.ndarray, patch: np.ndarray) -> list[dict[str, Any]]:
    backend = FlowBackend(InterpolationSettings())
    samples = []
    for speed in SYNTH_SPEEDS:
        times = np.arange(SYNTH_FRAMES, dtype=np.float64)
        rendered = [render_patch(background, patch, speed, t) for t in times]
        frames = [frame for frame, _points in rendered]
        for gap in GAPS:
            for start in range(0, SYNTH_FRAMES - gap, 3):
                stop = start + gap
                moved = np.linalg.norm(rendered[stop][1] - rendered[start][1], axis=-1)
                box = person_box(np.concatenate([rendered[start][1], rendered[stop][1]]))
                k = gap // 2
                for out in backend.interpolate(frames[start], frames[stop], [k / gap]):
                    truth = frames[start + k]
                    samples.append(
                        {
                            "gap": gap,
                            "speed_px_per_frame": speed,
                            "displacement_px": float(np.percentile(moved, 95)),
                            "box_psnr": psnr(crop(out, box), crop(truth, box)),
                            "frame_psnr": psnr(out, truth),
                            "box_ssim": ssim(crop(out, box), crop(truth, box)),
                        }
                    )
    print(f"  synthetic: {len(samples)} frames", file=sys.stderr, flush=True)
    return samples


def render_patch(background: np.ndarray, patch: np.ndarray, speed: float, t: float):
    """The background with `patch` moved right by speed x t px and turned by t x the turn rate
    about its centre; returns the frame and nine points on the patch where they are then."""
    height, width = patch.shape[:2]
    x = 120 + speed * t
    y = 140 + 0.5 * speed * t
    angle = SYNTH_TURN_DEG * t
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    matrix[:, 2] += (x, y)
    size = (background.shape[1], background.shape[0])
    moved = cv2.warpAffine(patch, matrix, size, flags=cv2.INTER_CUBIC)
    mask = cv2.warpAffine(np.ones(patch.shape[:2], np.float32), matrix, size)[..., None]
    frame = background.astype(np.float32) * (1 - mask) + moved.astype(np.float32) * mask
    grid = np.array([(u * width, v * height) for u in (0, 0.5, 1) for v in (0, 0.5, 1)])
    points = grid @ matrix[:, :2].T + matrix[:, 2]
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8), points


# ------------------------------------------------------------------------------ the curve


def curve(samples: list[dict[str, Any]], gap: int | None = None) -> list[dict[str, Any]]:
    """Mean box PSNR (and its spread) per displacement bin; `gap` None pools every gap."""
    rows = []
    chosen = [s for s in samples if gap is None or s["gap"] == gap]
    for low, high in zip(BINS, BINS[1:], strict=False):
        inside = [s for s in chosen if low <= s["displacement_px"] < high]
        if not inside:
            continue
        values = np.array([s["box_psnr"] for s in inside])
        rows.append(
            {
                "bin_px": [low, high],
                "frames": len(inside),
                "box_psnr_mean": round(float(values.mean()), 2),
                "box_psnr_p10": round(float(np.percentile(values, 10)), 2),
                "box_ssim_mean": round(float(np.mean([s["box_ssim"] for s in inside])), 4),
                "frame_psnr_mean": round(float(np.mean([s["frame_psnr"] for s in inside])), 2),
            }
        )
    return rows


def statistic_fit(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """How well each joint statistic predicts the error: correlation of box PSNR with the log
    of the displacement (p95 or median over joints), every gap pooled."""
    psnrs = np.array([s["box_psnr"] for s in samples])
    fits = {}
    for name, key in (("p95", "displacement_px"), ("p50", "displacement_p50_px")):
        moved = np.array([max(s[key], 0.1) for s in samples])
        fits[name] = round(float(np.corrcoef(np.log(moved), psnrs)[0, 1]), 3)
    return {"correlation_box_psnr_vs_log_displacement": fits, "frames": len(samples)}


def threshold(rows: list[dict[str, Any]], budget: float) -> float:
    """The upper edge of the last bin before the first (well-sampled) bin under the budget."""
    edge = 0.0
    for row in rows:
        if row["frames"] < MIN_BIN_SAMPLES:
            continue
        if row["box_psnr_mean"] < budget:
            break
        edge = float(row["bin_px"][1])
    return edge


def clip_schedule(clip: Path, max_gap_px: float) -> dict[str, Any]:
    """The sample clip as the service sees it at `standard`: 12 fps at 768x432, pose, smooth;
    the density schedule under the threshold."""
    frames = decode_all(clip, DecodeSettings(fps=12, width=SIZE[0], height=SIZE[1], fit="crop"))
    with PoseExtractor() as extractor:
        poses = extractor.extract(frames, 12.0)
    edited = MotionEditor(["smooth"]).edit(poses)
    settings = KeyframeDensity(mode="motion", max_gap_px=max_gap_px)
    schedule = density_schedule(edited.landmarks, edited.present, 16, settings, 12.0)
    return {
        "frames": schedule.frames,
        "strides": list(schedule.strides),
        "speeds_px_per_12fps_frame": [_speed(s) for s in schedule.speeds],
        "slow_fraction": round(schedule.slow_fraction(), 3),
        "explained": schedule.explain(12.0),
    }


def _speed(value: float) -> float | str:
    """A chunk speed for JSON: 'inf' where a person appears or vanishes."""
    return round(value, 2) if np.isfinite(value) else "inf"


# ----------------------------------------------------------------------------------- main


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, kind in zip(axes, ("real", "synthetic"), strict=True):
        for gap, rows in result["curves"][kind].items():
            rows = [r for r in rows if r["frames"] >= MIN_BIN_SAMPLES]
            if not rows:
                continue
            x = [(r["bin_px"][0] + min(r["bin_px"][1], 96)) / 2 for r in rows]
            label = "all gaps" if gap == "pooled" else f"gap {gap} ({SOURCE_FPS / int(gap):g} fps)"
            style = {"color": "black", "linewidth": 2} if gap == "pooled" else {}
            ax.plot(x, [r["box_psnr_mean"] for r in rows], marker="o", markersize=3,
                    label=label, **style)  # fmt: skip
        ax.axhline(result["budget_box_psnr"], color="grey", linestyle="--", linewidth=1)
        ax.axvline(result["max_gap_px"], color="red", linestyle=":", linewidth=1, label="threshold")
        ax.set_xscale("log")
        ax.set_xlim(2, 100)
        ax.set_xlabel("joint displacement across the gap, p95, px at 768x432")
        ax.set_title(f"{kind}: interpolated vs held-out frame")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("PSNR in the person's box (dB)")
    axes[0].annotate("budget: 12 fps mean", (2.2, result["budget_box_psnr"] + 0.3), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer starts (every 6th frame)")
    parser.add_argument("--stride", type=int, default=2, help="frames between real starts")
    parser.add_argument(
        "--samples", type=Path, help="keep the real frames' samples in this JSON (and reuse them)"
    )
    args = parser.parse_args(argv)
    stride = 6 if args.quick else args.stride
    started, load_before = time.perf_counter(), os.getloadavg()
    clip = sample_video_path(Settings().cache_dir)
    info = probe(clip)
    width, height = SIZE
    frames = decode_all(
        clip, DecodeSettings(fps=SOURCE_FPS, width=width, height=height, fit="crop")
    )
    with PoseExtractor() as extractor:
        poses = MotionEditor(["smooth"]).edit(extractor.extract(frames, SOURCE_FPS))
    if args.samples and args.samples.exists():  # a rerun of the curve and plot only
        real = json.loads(args.samples.read_text())
    else:
        real = real_samples(frames, poses, stride)
        if args.samples:
            args.samples.write_text(json.dumps(real))
    seen = int(np.flatnonzero(poses.present)[0])  # the first frame with the person
    box = person_box(poses.landmarks[seen : seen + 1, :, :2].astype(np.float64))
    patch = crop(frames[seen], box)[:160, :120]
    synthetic = synthetic_samples(frames[len(frames) // 2], patch)
    budget_rows = [s for s in real if s["gap"] in BUDGET_GAPS]
    budget = float(np.mean([np.mean([s["box_psnr"] for s in real if s["gap"] == g])
                            for g in BUDGET_GAPS]))  # fmt: skip
    curves = {
        kind: {str(g): curve(samples, g) for g in GAPS} | {"pooled": curve(samples)}
        for kind, samples in (("real", real), ("synthetic", synthetic))
    }
    max_gap = threshold(curves["real"]["pooled"], budget)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_summary(),
        "load_average_before": round(load_before[0], 2),
        "clip": f"sample clip {info.width}x{info.height} {info.fps:g} fps, {info.duration_s:.1f} s",
        "size": list(SIZE),
        "interpolator": InterpolationSettings().model_dump(),
        "gaps_source_frames": list(GAPS),
        "budget_box_psnr": round(budget, 2),
        "budget": "mean box PSNR of the in-betweens of gaps "
        f"{BUDGET_GAPS} (12 fps = 2.5 source frames) on the real clip, "
        f"{len(budget_rows)} frames",
        "threshold_from": "the real clip's curve with every gap pooled (too few slow "
        "samples per gap; at equal displacement the gaps' curves agree within their noise)",
        "which_statistic": statistic_fit(real),
        "max_gap_px": max_gap,
        "service_max_gap_px": CALIBRATED_MAX_GAP_PX,
        "speed_threshold_6fps_px_per_12fps_frame": max_gap / 2,
        "curves": curves,
        "sample_clip_schedule": clip_schedule(clip, CALIBRATED_MAX_GAP_PX),
        "real_frames": len(real),
        "synthetic_frames": len(synthetic),
        "quick": args.quick,
        "run_s": round(time.perf_counter() - started, 1),
    }
    output = results_dir()
    write_json(output / "keyframe_density.json", result)
    plot(result, output / "keyframe_density.png")
    print_report(result)
    return result


def print_report(result: dict[str, Any]) -> None:
    print(f"budget: box PSNR >= {result['budget_box_psnr']} dB ({result['budget']})")
    for kind in ("real", "synthetic"):
        print(f"\n{kind}: mean box PSNR per displacement bin (frames)")
        for gap, rows in result["curves"][kind].items():
            cells = " ".join(
                f"{r['bin_px'][0]}-{r['bin_px'][1]}:{r['box_psnr_mean']}({r['frames']})"
                for r in rows
            )
            print(f"  gap {gap:>6}: {cells}")
    print(
        f"\nthreshold (every gap pooled): {result['max_gap_px']} px across a "
        f"gap; the service uses {result['service_max_gap_px']} px"
    )
    schedule = result["sample_clip_schedule"]
    print(f"sample clip at 12 fps: {schedule['explained']}; strides {schedule['strides']}")
    print(f"speeds {schedule['speeds_px_per_12fps_frame']}")


if __name__ == "__main__":
    main()
