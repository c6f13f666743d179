"""Micro-batching of the diffusion stage: seconds per frame against batch size and mixed-key load.

Measured in one run (issue 5, "must reach"):
1. Engine: `DiffusionEngine.generate` on batches of 1, 2, 4, 8 chunk requests (same batch key,
   different prompts and seeds) with the tiny SD 1.5 + ControlNet on the CPU (fp32). Work units
   per frame do not change with batching, so the seconds per unit fall as the seconds per frame
   do. Engine level, so the numbers hold no Serve overhead.
2. Serve: the `DiffusionServer` deployment on a local Ray (2 CPUs, 1 logical GPU, 0.5 GPU per
   replica): a burst of concurrent same-key chunks with max_batch_size 1 vs 4 (user_config), and
   Poisson arrivals of chunks with 1-3 interleaved batch keys at offered loads of 0.5-2x what
   the replica serves at batch 1 (batch fill rate, device seconds per frame, latency), under two
   batching policies: the deployed one (`serve/keyed_batcher.py`: a queue per key, a batch taken
   when the device is free) and Ray Serve's `@serve.batch` split by multiplexed model id (what
   motionserve used before; kept here as the baseline). The keys differ only in guidance scale,
   so every chunk costs the same and only the grouping differs. Every replica gets a warm-up
   chunk per key first (each `serve.run` starts a new replica).
3. Keyframe ControlNet: controlnet_every 1 vs 4 on one chunk (counted units and seconds).
4. `estimate`: naive / standard work units for a 10 s 1080p25 output from a 1920x1080 source;
   the target is >= 20x.
5. On a CUDA machine: an SD 1.5-size random-weight model (UNet, ControlNet, VAE, text encoder
   with the SD 1.5 shapes, written to a temporary directory) in fp16 at batch 1, 2, 4, 8, with
   peak VRAM. Without CUDA the JSON and the output say it was skipped and why.

Seconds on the tiny models say how batching amortises per-call overhead on a CPU, not what
SD 1.5 costs on a GPU. Torch runs one thread per measurement (driver and replica): on the shared
2-core machine two threads are sometimes ~50x slower. Engine timings are the best of a few
repeats, taken in interleaved rounds; Serve bursts the best of a few; Poisson runs run once.
Exits non-zero when the estimate misses 20x, a batch mixes keys, or the Serve part fails.

    python -m benchmarks.batching [--quick] [--repeats 3] [--threads 1] [--no-serve]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine_label, pin_threads, results_dir, write_json
from benchmarks.fixtures import build_sd15_random, machine_info, quiet_progress_bars

BATCHES = (1, 2, 4, 8)
SERVE_BATCH_SIZES = (1, 4)
# Keys that differ only in guidance scale: the same work per chunk, different batch keys.
KEY_GUIDANCE = (7.5, 7.0, 6.5)
TARGET_RATIO = 20.0
BATCH_WAIT_TIMEOUT_S = 0.05  # the deployed default (serve/app.py STAGE_DEFAULTS)
MAX_ONGOING_REQUESTS = 16  # the deployed default; above the batch size, or batches never fill
# "keyed": the deployed KeyedBatcher; "serve.batch": Ray Serve's batching, split by model id.
POLICIES = ("keyed", "serve.batch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small run (< 90 s), for make bench")
    parser.add_argument(
        "--repeats", type=int, help="runs per timing, best kept (default 3; quick 1)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--size", type=int, default=64, help="tiny model frame side (64..256)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 8; quick 4)")
    parser.add_argument("--chunk-frames", type=int, default=4, help="frames per chunk request")
    parser.add_argument("--no-serve", action="store_true", help="skip the Ray Serve part")
    parser.add_argument("--output", type=Path, help="JSON results path (default: results dir)")
    parser.add_argument("--plot", type=Path, help="PNG plot path (default: results dir)")
    args = parser.parse_args(argv)
    args.output = args.output or results_dir() / "batching.json"
    args.plot = args.plot or results_dir() / "batching.png"
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.steps = args.steps or (4 if args.quick else 8)
    if not 64 <= args.size <= 256 or args.size % 8:
        parser.error("--size must be a multiple of 8 in 64..256")
    if not 1 <= args.repeats <= 5 or not 1 <= args.steps <= 50 or not 1 <= args.threads <= 64:
        parser.error("--repeats must be 1..5, --steps 1..50, --threads 1..64")
    if not 1 <= args.chunk_frames <= 16:
        parser.error("--chunk-frames must be 1..16")
    return args


def load_profile(args: argparse.Namespace) -> dict[str, Any]:
    """How much Serve load to apply: bounded so the default run stays under ~4 minutes.

    Offered load is relative to the replica's batch-1 capacity (1 / seconds of one chunk alone,
    measured by the engine part), so the grid means the same on a slow CPU and on a GPU.
    """
    if args.quick:
        return {
            "burst_requests": 8,
            "poisson_requests": 12,
            "loads": (2.0,),
            "keys": (1, 3),
            "policies": POLICIES,
        }
    return {
        "burst_requests": 8,
        "poisson_requests": 16,
        "loads": (0.5, 1.0, 2.0),
        "keys": (1, 2, 3),
        "policies": POLICIES,
    }


# --- shared helpers --------------------------------------------------------------------------


def control_maps(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def tiny_plan(args: argparse.Namespace, guidance: float = KEY_GUIDANCE[0]):
    """A draft plan at the benchmark's size and steps (fp32: what a CPU runs anyway)."""
    from serve.pipeline import make_plan

    overrides = {
        "generation_long_side": args.size,
        "output_long_side": args.size,
        "steps": args.steps,
        "precision": "fp32",
        "guidance_scale": guidance,
    }
    plan = make_plan("draft", args.size, args.size, model_id="tiny", overrides=overrides)
    return plan.model_copy(update={"cache": False})


def chunk_requests(settings, count: int, frames: int, first_seed: int = 0) -> list:
    from deployments.diffusion import ChunkRequest

    return [
        ChunkRequest(
            job_id=f"job{first_seed + i}",
            chunk_index=i,
            prompt=f"a person dancing, take {first_seed + i}",
            seed=first_seed + i,
            control_images=control_maps(frames, settings.height, settings.width, first_seed + i),
            settings=settings,
        )
        for i in range(count)
    ]


class Timed:
    """The best (lowest wall) of a case's runs, and its peak CUDA memory (GiB) if on a GPU."""

    def __init__(self):
        self.wall = math.inf
        self.results: list = []
        self.peak_gib: float | None = None


def best_of_interleaved(engine, cases: list[list], repeats: int) -> list[Timed]:
    """Runs every case once per round, `repeats` rounds, and keeps each case's best run.

    Interleaving spreads a noisy neighbour's bursts over all cases instead of one.
    """
    import torch

    on_cuda = (engine.device or "").startswith("cuda")
    timed = [Timed() for _ in cases]
    for _ in range(repeats):
        for requests, best in zip(cases, timed, strict=True):
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            results = engine.generate(requests)
            wall = time.perf_counter() - started
            if on_cuda:
                peak = torch.cuda.max_memory_allocated() / 2**30
                best.peak_gib = max(best.peak_gib or 0.0, peak)
            if wall < best.wall:
                best.wall, best.results = wall, results
    return timed


def units_of(results: list):
    from deployments.diffusion import WorkUnits

    return sum((r.work_units for r in results), WorkUnits())


# --- 1 and 3: engine level ----------------------------------------------------------------------


def make_tiny_engine():
    from deployments.diffusion import DiffusionEngine, EngineConfig
    from deployments.model_loading import tiny_sd_controlnet_sources
    from serve.config import Settings
    from serve.factory import ensure_tiny_models

    base, controlnet = tiny_sd_controlnet_sources(ensure_tiny_models(Settings().cache_dir))
    config = EngineConfig(
        model_id="tiny", base=base, controlnet=controlnet, device="cpu", max_frames_per_forward=16
    )
    return DiffusionEngine(config)


def batch_rows(engine, settings, batches, chunk_frames: int, repeats: int) -> list[dict]:
    """Seconds per frame and per work unit at each batch size (same key, different prompts)."""
    cases = [chunk_requests(settings, b, chunk_frames, first_seed=100 * b) for b in batches]
    engine.generate(cases[-1])  # warm-up at the largest shape (allocator, kernel choice)
    rows = []
    for batch, best in zip(batches, best_of_interleaved(engine, cases, repeats), strict=True):
        frames = batch * chunk_frames
        units = units_of(best.results).total
        compute = sum(r.device_seconds for r in best.results)
        row = {
            "batch": batch,
            "frames": frames,
            "wall_s": round(best.wall, 4),
            "s_per_frame": round(best.wall / frames, 5),
            "compute_s_per_frame": round(compute / frames, 5),
            "units_per_frame": round(units / frames, 4),
            "s_per_unit": round(best.wall / units, 6),
        }
        if best.peak_gib is not None:
            row["peak_vram_gib"] = round(best.peak_gib, 2)
        rows.append(row)
    for row in rows:
        row["speedup_vs_batch1"] = round(rows[0]["s_per_frame"] / row["s_per_frame"], 3)
    return rows


def keyframe_rows(engine, settings, frames: int, repeats: int, sd15_weights) -> list[dict]:
    """controlnet_every 1 vs 4 on one chunk: counted units, SD 1.5-weighted units, seconds."""
    from deployments.diffusion import predict_chunk_units

    keys = [settings.model_copy(update={"controlnet_every": every}) for every in (1, 4)]
    cases = [chunk_requests(key, 1, frames) for key in keys]
    rows = []
    for key, best in zip(keys, best_of_interleaved(engine, cases, repeats), strict=True):
        units = units_of(best.results)
        rows.append(
            {
                "controlnet_every": key.controlnet_every,
                "frames": frames,
                "unet_evals": units.unet_evals,
                "controlnet_evals": units.controlnet_evals,
                "units": round(units.total, 3),
                "sd15_units": round(predict_chunk_units(key, frames, sd15_weights).total, 3),
                "s_per_frame": round(best.wall / frames, 5),
            }
        )
    every1, every4 = rows
    for name in ("units", "sd15_units", "s_per_frame"):
        every4[f"{name}_saving_pct"] = round(100 * (1 - every4[name] / every1[name]), 1)
    return rows


def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    from deployments.diffusion import SD15_MODEL_WEIGHTS

    engine = make_tiny_engine()
    load_s = engine.load()
    settings = tiny_plan(args).generation
    weights = engine.model_weights
    rows = batch_rows(engine, settings, BATCHES, args.chunk_frames, args.repeats)
    keyframes = keyframe_rows(engine, settings, 16, args.repeats, SD15_MODEL_WEIGHTS)
    return {
        "device": "cpu",
        "precision": "fp32",
        "size": f"{settings.width}x{settings.height}",
        "steps": settings.steps,
        "scheduler": settings.scheduler,
        "guidance_scale": settings.guidance_scale,
        "controlnet_every": settings.controlnet_every,
        "chunk_frames": args.chunk_frames,
        "load_s": round(load_s, 3),
        "controlnet_weight": round(weights.controlnet_weight, 4),
        "vae_weight": round(weights.vae_weight, 4),
        "rows": rows,
        "keyframe_controlnet": {
            "note": "one 16-frame chunk; units counted with the tiny models' measured weights, "
            "sd15_units = the same counts weighted with SD 1.5's weights",
            "rows": keyframes,
        },
    }


# --- 2: through Ray Serve ---------------------------------------------------------------------


def pinned_server_class():
    """DiffusionServer with torch's thread count fixed in the replica (and a probe for it); the
    batching policy is the server's own constructor argument (see `deploy`).

    Self-contained (no module globals), so it pickles by value whichever way this module runs.
    """
    from serve.app import DiffusionServer

    class PinnedDiffusionServer(DiffusionServer):
        def __init__(self, app_args, torch_threads: int, batching: str = "keyed"):
            import torch

            torch.set_num_threads(torch_threads)
            super().__init__(app_args, batching=batching)

        def torch_threads(self) -> int:
            import torch

            return torch.get_num_threads()

    return PinnedDiffusionServer


def deploy(server_cls, app_args, threads: int, user_config: dict, policy: str = "keyed"):
    """(Re)deploy the diffusion server with batching `policy` (one of POLICIES); a changed
    user_config only reconfigures the replica."""
    from ray import serve

    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    deployment = serve.deployment(
        server_cls,
        name="Diffusion",
        ray_actor_options={"num_cpus": 1, "num_gpus": 0.5, "runtime_env": {"env_vars": env}},
        max_ongoing_requests=MAX_ONGOING_REQUESTS,
        user_config=user_config,
    )
    app = deployment.bind(app_args, threads, policy)
    return serve.run(app, name="bench", route_prefix=None)


async def submit(handle, plan, index: int, frames: int, at: float, t0: float) -> dict:
    """One chunk request sent at `t0 + at` (perf_counter); returns its timings and record."""
    from serve.chunks import ChunkSpec
    from serve.stages import Frames, StageRecord

    g = plan.generation
    maps = Frames(control_maps(frames, g.height, g.width, index), [StageRecord(stage="render")])
    chunk = ChunkSpec(job_id=f"job{index}", chunk_index=index, prompt=f"take {index}", seed=index)
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    sent = time.perf_counter()
    keyed = handle.options(multiplexed_model_id=g.batch_key())
    result = await keyed.generate.remote(maps, chunk, f"{index:064d}", plan)
    record = result.records[-1]
    return {
        "sent": sent,
        "done": time.perf_counter(),
        "frames": len(result.frames),
        "device_s": record.gpu_s + record.cpu_s,
        "load_s": record.load_s,
    }


async def send_load(handle, plans: list, arrivals: list[float], frames: int) -> list[dict]:
    t0 = time.perf_counter()
    calls = [
        submit(handle, plans[i % len(plans)], i, frames, at, t0) for i, at in enumerate(arrivals)
    ]
    return await asyncio.gather(*calls)


def load_metrics(handle, outcomes: list[dict], since: float, max_batch: int) -> dict[str, Any]:
    batches = [b for b in handle.recent_batches.remote().result() if b["at"] >= since]
    sizes = [b["size"] for b in batches]
    frames = sum(o["frames"] for o in outcomes)
    span = max(o["done"] for o in outcomes) - min(o["sent"] for o in outcomes)
    latencies = sorted(o["done"] - o["sent"] for o in outcomes)
    return {
        "requests": len(outcomes),
        "frames": frames,
        "batch_sizes": sizes,
        "batch_sizes_text": " ".join(map(str, sizes)),
        "mean_batch": round(float(np.mean(sizes)), 2),
        "fill_rate": round(float(np.mean(sizes)) / max_batch, 3),
        "keys_per_batch_max": max(len(b["keys"]) for b in batches),
        "wall_s_per_frame": round(span / frames, 5),
        "device_s_per_frame": round(sum(o["device_s"] for o in outcomes) / frames, 5),
        "latency_p50_s": round(latencies[len(latencies) // 2], 3),
        "latency_max_s": round(latencies[-1], 3),
    }


def run_burst(handle, plan, requests: int, frames: int, max_batch: int, repeats: int) -> dict:
    """All chunks sent at once (one key); the best repeat by wall seconds per frame."""
    best = None
    for _ in range(repeats):
        since = time.time()
        outcomes = asyncio.run(send_load(handle, [plan], [0.0] * requests, frames))
        metrics = load_metrics(handle, outcomes, since, max_batch)
        if best is None or metrics["wall_s_per_frame"] < best["wall_s_per_frame"]:
            best = metrics
    return {"max_batch_size": max_batch, **best}


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, count)
    return (np.cumsum(gaps) - gaps[0]).tolist()  # the first request arrives at once


def run_mixed(handle, plans, profile, frames: int, max_batch: int, chunk_s: float) -> list[dict]:
    """Poisson runs at each key count and offered load (x the batch-1 capacity 1/chunk_s)."""
    rows = []
    for keys in profile["keys"]:
        for load in profile["loads"]:
            rate = load / chunk_s
            # One seed: every run sees the same arrival pattern, scaled by its rate.
            arrivals = poisson_arrivals(profile["poisson_requests"], rate, seed=7)
            since = time.time()
            outcomes = asyncio.run(send_load(handle, plans[:keys], arrivals, frames))
            metrics = load_metrics(handle, outcomes, since, max_batch)
            rows.append({"keys": keys, "load": load, "rate_per_s": round(rate, 2), **metrics})
    return rows


def start_replica(
    server_cls, app_args, args, plans: list, max_batch: int, timeout: float = BATCH_WAIT_TIMEOUT_S,
    policy: str = "keyed",
) -> tuple[Any, float]:  # fmt: skip
    """Deploy with this batch size and wait timeout and warm the replica up with one chunk per
    key; returns (handle, seconds the warm-up spent loading weights).

    `serve.run` gives every imperative deploy a new random code version, so each call starts a
    fresh replica (a cold start), which the warm-up absorbs before anything is measured.
    """
    config = {"max_batch_size": max_batch, "batch_wait_timeout_s": timeout, "idle_unload_s": 3600}
    handle = deploy(server_cls, app_args, args.threads, config, policy)
    warm = asyncio.run(send_load(handle, plans, [0.0] * len(plans), args.chunk_frames))
    return handle, max(o["load_s"] for o in warm)


def run_serve(
    args: argparse.Namespace, profile: dict, scratch: Path, chunk_s: float
) -> dict[str, Any]:
    """Burst and mixed-key Poisson load through the deployment; `chunk_s` is the engine's
    seconds for one chunk alone (batch 1), which sets the offered load's rates."""
    import ray
    from ray import serve

    from serve.config import AppArgs

    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    started = time.perf_counter()
    # address="local": always a fresh private cluster, never one another process left running.
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    try:
        app_args = AppArgs(storage_uri=str(scratch / "store"))
        plans = [tiny_plan(args, g) for g in KEY_GUIDANCE]
        burst, loads = [], []
        for max_batch in SERVE_BATCH_SIZES:
            handle, load_s = start_replica(pinned_server_class(), app_args, args, plans, max_batch)
            loads.append(round(load_s, 3))
            burst.append(
                run_burst(
                    handle,
                    plans[0],
                    profile["burst_requests"],
                    args.chunk_frames,
                    max_batch,
                    args.repeats,
                )
            )
        replica_threads = handle.torch_threads.remote().result()
        mixed = []
        for policy in profile["policies"]:
            if policy != "keyed":  # the last burst's replica is the deployed policy at batch 4
                handle, load_s = start_replica(
                    pinned_server_class(), app_args, args, plans, SERVE_BATCH_SIZES[-1],
                    policy=policy,
                )  # fmt: skip
                loads.append(round(load_s, 3))
            rows = run_mixed(
                handle, plans, profile, args.chunk_frames, SERVE_BATCH_SIZES[-1], chunk_s
            )
            mixed.append({"policy": policy, "rows": rows})
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "ray": ray.__version__,
        "cluster": "local Ray: num_cpus=2, num_gpus=1 (logical); replica num_cpus=1, num_gpus=0.5",
        "replica_torch_threads": replica_threads,
        "batch_wait_timeout_s": BATCH_WAIT_TIMEOUT_S,
        "max_ongoing_requests": MAX_ONGOING_REQUESTS,
        "serve_part_s": round(time.perf_counter() - started, 1),
        "replica_load_s": loads,
        "keys_note": "keys differ only in guidance scale (7.5/7.0/6.5): equal work per chunk",
        "device_note": "no CUDA: the replica holds 0.5 logical GPU and runs on its CPU; "
        "device seconds are the engine's compute seconds of the chunks",
        "burst": burst,
        "metrics_note": "device s/frame = the engine's compute seconds of the chunks / frames "
        "(what a GPU would bill); wall s/frame = first send to last reply / frames, which under "
        "Poisson load follows the arrival rate; fill = mean batch size / max_batch_size",
        "mixed": {
            "max_batch_size": SERVE_BATCH_SIZES[-1],
            "batch_wait_timeout_s": BATCH_WAIT_TIMEOUT_S,
            "requests": profile["poisson_requests"],
            "chunk_s_batch1": round(chunk_s, 4),
            "load_note": "offered load = arrival rate x seconds of one chunk alone (engine, "
            "batch 1): 1.0 keeps an unbatched replica exactly busy",
            "policy_note": "keyed: serve/keyed_batcher.py (deployed); serve.batch: Ray Serve's "
            "@serve.batch split by multiplexed model id (the previous implementation)",
            "by_policy": mixed,
        },
    }


# --- 4: estimate --------------------------------------------------------------------------------


def run_estimate() -> dict[str, Any]:
    from serve.cost import estimate_plan
    from serve.pipeline import make_plan

    plan = make_plan(
        "standard",
        1920,
        1080,
        model_id="tiny",
        output_fps=25,
        output_width=1920,
        output_height=1080,
    )
    frames = math.ceil(10.0 * plan.generation.fps)
    estimate = estimate_plan(plan, frames)
    return {
        "input": "10 s of 1920x1080 source -> 1920x1080 at 25 fps, preset standard",
        "plan": plan.explain(),
        "standard_frames": estimate.plan.generated_frames,
        "standard_units": round(estimate.plan.work_units, 1),
        "naive_frames": estimate.naive.generated_frames,
        "naive_units": round(estimate.naive.work_units, 1),
        "ratio": round(estimate.ratio, 2),
        "target": TARGET_RATIO,
        "meets_target": estimate.ratio >= TARGET_RATIO,
    }


# --- 5: SD 1.5-size random weights in fp16 on a GPU -------------------------------------------


def measure_sd15(
    device: str, size: int, steps: int, batches, chunk_frames: int, repeats: int, scratch: Path
) -> dict[str, Any]:
    """SD 1.5-size random-weight model at each batch size; `device='cpu'` only for checking
    this code path at a toy size."""
    import torch

    from deployments.diffusion import DiffusionEngine, EngineConfig, GenerationSettings
    from deployments.model_loading import tiny_sd_controlnet_sources
    from serve.config import Settings
    from serve.factory import ensure_tiny_models

    started = time.perf_counter()
    tiny_dir = ensure_tiny_models(Settings().cache_dir)
    model_dir = build_sd15_random(scratch / "sd15-random", tiny_dir, torch.float16)
    build_s = time.perf_counter() - started
    base, controlnet = tiny_sd_controlnet_sources(model_dir)
    config = EngineConfig(
        model_id="sd15-random",
        base=base,
        controlnet=controlnet,
        device=device,
        precision="fp16",
        max_frames_per_forward=max(batches) * chunk_frames,
    )
    engine = DiffusionEngine(config)
    load_s = engine.load()
    weights = engine.model_weights
    settings = GenerationSettings(
        model_id="sd15-random",
        width=size,
        height=size,
        steps=steps,
        precision="fp16",
        guidance_scale=7.5,
        controlnet_every=4,
    )
    rows = batch_rows(engine, settings, batches, chunk_frames, repeats)
    keyframes = keyframe_rows(engine, settings, 16, repeats, weights)
    return {
        "skipped": False,
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "precision": "fp16" if device == "cuda" else "fp32 (cpu)",
        "size": f"{size}x{size}",
        "steps": steps,
        "chunk_frames": chunk_frames,
        "unet_parameters": weights.unet_parameters,
        "controlnet_parameters": weights.controlnet_parameters,
        "build_s": round(build_s, 1),
        "load_s": round(load_s, 2),
        "peak_vram_note": "torch.cuda.max_memory_allocated over the call, weights included",
        "rows": rows,
        "keyframe_controlnet": {"rows": keyframes},
    }


def run_gpu(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {
            "skipped": True,
            "reason": "no GPU: skipped, torch.cuda.is_available() is False on this machine "
            "(CPU only); the SD 1.5-size fp16 measurement needs CUDA",
        }
    steps = 10 if args.quick else 20
    return measure_sd15("cuda", 512, steps, BATCHES, 4, args.repeats, scratch)


# --- output -------------------------------------------------------------------------------------


def print_table(columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """columns: (header, row key, format spec); missing values print as '-'."""
    cells = [
        [format(row[key], spec) if row.get(key) is not None else "-" for _, key, spec in columns]
        for row in rows
    ]
    headers = [header for header, _, _ in columns]
    widths = [max(len(text) for text in column) for column in zip(headers, *cells, strict=True)]
    for line in [headers, *cells]:
        print("  ".join(f"{text:>{width}}" for text, width in zip(line, widths, strict=True)))


BATCH_COLUMNS = [
    ("batch", "batch", "d"),
    ("frames", "frames", "d"),
    ("wall s", "wall_s", ".3f"),
    ("s/frame", "s_per_frame", ".4f"),
    ("units/frame", "units_per_frame", ".3f"),
    ("s/unit", "s_per_unit", ".5f"),
    ("speedup", "speedup_vs_batch1", ".2f"),
]
KEYFRAME_COLUMNS = [
    ("every", "controlnet_every", "d"),
    ("unet evals", "unet_evals", "d"),
    ("cnet evals", "controlnet_evals", "d"),
    ("units", "units", ".3f"),
    ("SD1.5 units", "sd15_units", ".3f"),
    ("s/frame", "s_per_frame", ".4f"),
]
BURST_COLUMNS = [
    ("max batch", "max_batch_size", "d"),
    ("batches formed", "batch_sizes_text", ""),
    ("wall s/frame", "wall_s_per_frame", ".4f"),
    ("device s/frame", "device_s_per_frame", ".4f"),
    ("p50 latency s", "latency_p50_s", ".2f"),
]
MIXED_COLUMNS = [
    ("keys", "keys", "d"),
    ("load", "load", ".1f"),
    ("rate/s", "rate_per_s", ".1f"),
    ("mean batch", "mean_batch", ".2f"),
    ("fill", "fill_rate", ".2f"),
    ("keys/batch", "keys_per_batch_max", "d"),
    ("device s/frame", "device_s_per_frame", ".4f"),
    ("wall s/frame", "wall_s_per_frame", ".4f"),
    ("p50 latency s", "latency_p50_s", ".2f"),
]


def print_engine(engine: dict) -> None:
    print(
        f"\n1. Engine: tiny SD 1.5 + ControlNet, CPU {engine['precision']}, {engine['size']}, "
        f"{engine['steps']} steps {engine['scheduler']}, CFG {engine['guidance_scale']}, "
        f"ControlNet every {engine['controlnet_every']}, "
        f"{engine['chunk_frames']}-frame chunks per request"
    )
    print_table(BATCH_COLUMNS, engine["rows"])


def print_keyframes(title: str, rows: list[dict]) -> None:
    print(f"\n3. Keyframe ControlNet ({title}): one 16-frame chunk, every 1 vs every 4")
    print_table(KEYFRAME_COLUMNS, rows)
    saving = rows[1]
    print(
        f"every 4 saves {saving['units_saving_pct']}% of the units "
        f"({saving['sd15_units_saving_pct']}% at SD 1.5 weights) and "
        f"{saving['s_per_frame_saving_pct']}% of the seconds per frame"
    )


def print_serve(result: dict) -> None:
    if result.get("skipped"):
        print(f"\n2. Serve: skipped ({result['reason']})")
        return
    print(
        f"\n2. Ray Serve DiffusionServer ({result['cluster']}; replica torch threads "
        f"{result['replica_torch_threads']}; batch wait timeout "
        f"{result['batch_wait_timeout_s']} s; replica weight loads {result['replica_load_s']} s)"
    )
    print(f"burst: {result['burst'][0]['requests']} concurrent same-key chunks")
    print_table(BURST_COLUMNS, result["burst"])
    mixed = result["mixed"]
    for grid in mixed["by_policy"]:
        print(
            f"Poisson arrivals, policy {grid['policy']}: {mixed['requests']} chunks per run, "
            f"keys interleaved, max_batch_size {mixed['max_batch_size']}, wait timeout "
            f"{mixed['batch_wait_timeout_s']} s, load x{1 / mixed['chunk_s_batch1']:.1f} "
            "chunks/s (batch-1 capacity)"
        )
        print_table(MIXED_COLUMNS, grid["rows"])
    for row in policy_gains(mixed):
        print(
            f"  {row['keys']} key(s), load {row['load']:g}: keyed fill {row['keyed_fill']:.2f} "
            f"vs serve.batch {row['serve_batch_fill']:.2f}; device s/frame "
            f"{row['device_s_change_pct']:+.1f}%"
        )


def print_estimate(estimate: dict) -> None:
    verdict = "MET" if estimate["meets_target"] else "NOT MET"
    print(f"\n4. estimate: {estimate['input']}")
    print("   plan: " + "; ".join(estimate["plan"][1:4]))
    print(
        f"   standard: {estimate['standard_frames']} frames, {estimate['standard_units']:.0f} "
        f"units; naive: {estimate['naive_frames']} frames, {estimate['naive_units']:.0f} units"
    )
    print(
        f"   naive/standard = {estimate['ratio']:.1f}x (target >= {estimate['target']:g}x): "
        f"{verdict}"
    )


def print_gpu(gpu: dict) -> None:
    if gpu["skipped"]:
        print(f"\n5. SD 1.5-size fp16 on GPU: {gpu['reason']}")
        return
    print(
        f"\n5. SD 1.5-size random weights, {gpu['device']} {gpu['precision']}, {gpu['size']}, "
        f"{gpu['steps']} steps, {gpu['chunk_frames']}-frame chunks (load {gpu['load_s']} s)"
    )
    print_table([*BATCH_COLUMNS, ("peak VRAM GiB", "peak_vram_gib", ".2f")], gpu["rows"])
    print_keyframes(f"SD 1.5 size, {gpu['device']}", gpu["keyframe_controlnet"]["rows"])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    plot_engine(axes[0], result)
    serve_result = result["serve"]
    if serve_result.get("skipped"):
        for ax in axes[1:]:
            ax.text(0.5, 0.5, "Serve part skipped", ha="center", transform=ax.transAxes)
            ax.axis("off")
    else:
        plot_mixed(axes[1], axes[2], serve_result)
    fig.suptitle(
        f"motionserve micro-batching, {result['when']} ({machine_label(result['machine'])})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_engine(ax, result: dict) -> None:
    """Seconds per frame relative to batch 1 (so CPU and GPU share an axis), absolute labels."""
    series = [("tiny model, CPU fp32", result["engine"]["rows"], "o-")]
    if not result["gpu"]["skipped"]:
        series.append((f"SD 1.5 size, {result['gpu']['device']} fp16", result["gpu"]["rows"], "s-"))
    for label, rows, style in series:
        batches = [r["batch"] for r in rows]
        relative = [r["s_per_frame"] / rows[0]["s_per_frame"] for r in rows]
        ax.plot(batches, relative, style, label=label)
        for batch, y, row in zip(batches, relative, rows, strict=True):
            ax.annotate(
                f"{row['s_per_frame']:.3g} s",
                (batch, y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
    ax.minorticks_off()
    ax.set(
        xlabel="requests per batch (same key)",
        ylabel="seconds per frame / batch 1",
        ylim=(0, 1.25),
        title="Engine: seconds per frame vs batch size",
    )
    ax.legend(fontsize=8, loc="lower left")


def policy_gains(mixed: dict) -> list[dict]:
    """Per (keys, load): the keyed policy's fill and device seconds against serve.batch's."""
    by_policy = {grid["policy"]: grid["rows"] for grid in mixed["by_policy"]}
    if set(POLICIES) - set(by_policy):
        return []
    baseline = {(r["keys"], r["load"]): r for r in by_policy["serve.batch"]}
    gains = []
    for row in by_policy["keyed"]:
        base = baseline.get((row["keys"], row["load"]))
        if base is None:
            continue
        saving = 100 * (row["device_s_per_frame"] / base["device_s_per_frame"] - 1)
        gains.append(
            {
                "keys": row["keys"],
                "load": row["load"],
                "keyed_fill": row["fill_rate"],
                "serve_batch_fill": base["fill_rate"],
                "device_s_change_pct": round(saving, 1),
            }
        )
    return gains


def plot_mixed(fill_ax, seconds_ax, serve_result: dict) -> None:
    colors = {1: "tab:blue", 2: "tab:orange", 3: "tab:green"}
    for grid, style in zip(serve_result["mixed"]["by_policy"], ("o-", "s--"), strict=False):
        rows, policy = grid["rows"], grid["policy"]
        for keys in sorted({r["keys"] for r in rows}):
            mine = [r for r in rows if r["keys"] == keys]
            loads = [r["load"] for r in mine]
            label = f"{policy}, {keys} key(s)"
            color = colors.get(keys)
            fill_ax.plot(loads, [r["fill_rate"] for r in mine], style, color=color, label=label)
            seconds = [r["device_s_per_frame"] for r in mine]
            seconds_ax.plot(loads, seconds, style, color=color, label=label)
    for burst, style in zip(serve_result["burst"], (":", "-."), strict=False):
        label = f"burst, max batch {burst['max_batch_size']}"
        seconds_ax.axhline(burst["device_s_per_frame"], color="gray", linestyle=style, label=label)
    batch = serve_result["mixed"]["max_batch_size"]
    rate_label = "offered load (Poisson arrivals / batch-1 capacity)"
    fill_ax.set(
        xlabel=rate_label,
        ylabel=f"mean batch / {batch}",
        ylim=(0, 1.05),
        title="Serve: batch fill vs load (o keyed, s serve.batch)",
    )
    seconds_ax.set(
        xlabel=rate_label,
        ylabel="device seconds per frame",
        title="Serve: device s/frame vs load",
    )
    fill_ax.legend(fontsize=6)
    seconds_ax.legend(fontsize=6, ncol=2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    pin_threads(args.threads)
    quiet_progress_bars()
    result: dict[str, Any] = {
        "benchmark": "batching",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "default",
        "machine": machine_info(args.threads),
        "threads_note": f"torch uses {args.threads} thread(s) in the driver and in the replica "
        "(on a shared 2-core machine 2 threads were sometimes ~50x slower)",
        "repeats": args.repeats,
        "timing": "best of the repeats",
    }
    profile = load_profile(args)
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as scratch:
        result["engine"] = run_engine(args)
        if args.no_serve:
            result["serve"] = {"skipped": True, "reason": "--no-serve"}
        else:
            try:
                chunk_s = result["engine"]["rows"][0]["wall_s"]  # batch 1 = one chunk
                result["serve"] = run_serve(args, profile, Path(scratch), chunk_s)
                result["serve"]["mixed"]["keyed_vs_serve_batch"] = policy_gains(
                    result["serve"]["mixed"]
                )
            except Exception as exc:  # the other parts still get written; main exits non-zero
                reason = f"failed: {type(exc).__name__}: {exc}"
                result["serve"] = {"skipped": True, "failed": True, "reason": reason}
        result["estimate"] = run_estimate()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaNs from random fp16 weights
            result["gpu"] = run_gpu(args, Path(scratch))
    return result


def print_report(result: dict) -> None:
    m = result["machine"]
    print(
        f"batching benchmark ({result['mode']}), {result['when']}, {m['cpu']} x{m['cpu_count']}, "
        f"torch {m['torch']}; {m['shared']}; {result['threads_note']}; best of "
        f"{result['repeats']}"
    )
    print_engine(result["engine"])
    print_serve(result["serve"])
    print_keyframes("tiny model, CPU", result["engine"]["keyframe_controlnet"]["rows"])
    print_estimate(result["estimate"])
    print_gpu(result["gpu"])


def max_keys_per_batch(serve_result: dict) -> int:
    rows = [*serve_result["burst"]]
    for grid in serve_result["mixed"]["by_policy"]:
        rows.extend(grid["rows"])
    return max(row["keys_per_batch_max"] for row in rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    result = run(args)
    result["total_s"] = round(time.perf_counter() - started, 1)
    print_report(result)
    write_json(args.output, result)
    plot(result, args.plot)
    print(f"\nwrote {args.output} and {args.plot} ({result['total_s']} s)")
    problems = []
    if not result["estimate"]["meets_target"]:
        problems.append(f"estimate ratio {result['estimate']['ratio']} is below {TARGET_RATIO}x")
    if result["serve"].get("failed"):
        problems.append(f"the Serve part {result['serve']['reason']}")
    elif not result["serve"].get("skipped") and max_keys_per_batch(result["serve"]) > 1:
        problems.append("a Serve batch mixed batch keys")
    if problems:
        raise SystemExit("; ".join(problems))
    return result


if __name__ == "__main__":
    main()
