"""Cancelled work stops costing: device time a cancelled chunk still runs, and how fast the
Diffusion replica's queue empties.

On a local Ray (2 CPUs, 1 logical GPU, 0.5 GPU per replica), the `DiffusionServer` deployment
with the tiny SD 1.5 + ControlNet: each round sends `--chunks` chunk calls (batches of
`--batch`, so one batch runs and the rest queue), waits for the batch to start, then cancels
every call at a random point within a denoising step, as the orchestrator does when a job is
cancelled (`DeploymentResponse.cancel()`). Per cancelled row of a running batch the replica
records the device seconds the batch ran between the cancel and the row leaving it
(`recent_batches()[...]["dropped"]`); this benchmark reports them in denoising steps (target:
under one step per cancelled chunk) and in GPU seconds at the replica's GPU share, beside what
the batch would have run to the end without cancellation. A cancelled chunk returns no result,
so the job's ledger bills it nothing; the figure here is what the device spent anyway.

Seconds on the tiny models on a CPU say how the mechanism behaves, not what SD 1.5 costs on a
GPU: the ratio to one step is the figure that carries over.

    python -m benchmarks.cancel [--quick] [--rounds 5] [--steps 30]
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine_label, pin_threads, results_dir, write_json
from benchmarks.fixtures import machine_info, quiet_progress_bars

GPU_FRACTION = 0.5
EMPTY_TARGET_S = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=6, help="cancel rounds")
    parser.add_argument("--chunks", type=int, default=8, help="chunk calls per round")
    parser.add_argument("--batch", type=int, default=2, help="the replica's max_batch_size")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per chunk")
    parser.add_argument("--frames", type=int, default=3, help="frames per chunk")
    parser.add_argument("--size", type=int, default=128, help="generation long side")
    parser.add_argument("--seed", type=int, default=19, help="where within a step to cancel")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 2
    return args


def tiny_plan(args: argparse.Namespace):
    from serve.pipeline import make_plan

    overrides = {
        "generation_long_side": args.size,
        "output_long_side": args.size,
        "steps": args.steps,
        "precision": "fp32",
    }
    plan = make_plan("draft", args.size, args.size, model_id="tiny", overrides=overrides)
    return plan.model_copy(update={"cache": False})  # every call runs: nothing from the cache


def chunk_call(handle, plan, index: int, frames: int):
    from serve.chunks import ChunkSpec
    from serve.stages import Frames, StageRecord

    g = plan.generation
    rng = np.random.default_rng(index)
    images = rng.integers(0, 255, (frames, g.height, g.width, 3), dtype=np.uint8)
    maps = Frames(images, [StageRecord(stage="render")])
    chunk = ChunkSpec(job_id=f"job{index}", chunk_index=index, prompt=f"take {index}", seed=index)
    return handle.generate.remote(maps, chunk, "0" * 64, plan)


def wait_for(condition, timeout: float) -> float:
    """Seconds until `condition()` holds (polling the replica), or raise after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not reached within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def deploy(args: argparse.Namespace, store: Path):
    from ray import serve

    from serve.app import DiffusionServer
    from serve.config import AppArgs

    deployment = serve.deployment(
        DiffusionServer,
        name="Diffusion",
        ray_actor_options={"num_cpus": 1, "num_gpus": GPU_FRACTION},
        max_ongoing_requests=args.chunks * 2,
        user_config={"max_batch_size": args.batch, "batch_wait_timeout_s": 0.0},
    )
    return serve.run(deployment.bind(AppArgs(storage_uri=str(store))), name="cancel",
                     route_prefix=None)  # fmt: skip


def one_round(handle, keyed, plan, args, first: int, delay_s: float) -> dict[str, Any]:
    status = handle.status.remote
    seen = len(handle.recent_batches.remote().result())
    calls = [chunk_call(keyed, plan, first + i, args.frames) for i in range(args.chunks)]
    wait_for(lambda: status().result()["running"] > 0, 120)
    time.sleep(delay_s)  # a random point within a denoising step, not a wait for a condition
    for call in calls:
        call.cancel()
    empty_s = wait_for(
        lambda: (s := status().result())["waiting"] == s["running"] == s["in_flight"] == 0, 120
    )
    batches = handle.recent_batches.remote().result()[seen:]
    rows = []
    for batch in batches:
        step_s = batch["longest_step_s"] or 0.0
        for row in batch.get("dropped", []):
            rows.append({
                "after_cancel_s": row["after_cancel_s"],
                "step_s": step_s,
                "steps_after_cancel": row["after_cancel_s"] / step_s if step_s else 0.0,
                "gpu_s_after_cancel": row["after_cancel_s"] * GPU_FRACTION,
            })  # fmt: skip
    return {"empty_s": empty_s, "batches_run": len(batches), "dropped": rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    logging.getLogger("ray").setLevel(logging.WARNING)
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING)  # fmt: skip
    serve.start(proxy_location="Disabled")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            handle = deploy(args, Path(scratch) / "store")
            plan = tiny_plan(args)
            keyed = handle.options(multiplexed_model_id=plan.generation.batch_key())
            chunk_call(keyed, plan, 0, args.frames).result()  # loads the engine
            started = time.monotonic()
            chunk_call(keyed, plan, 1, args.frames).result()
            chunk_s = time.monotonic() - started  # one chunk alone, all its steps
            step_s = chunk_s / args.steps
            rng = random.Random(args.seed)
            rounds = [
                one_round(handle, keyed, plan, args, 100 * (r + 1), rng.uniform(0, step_s))
                for r in range(args.rounds)
            ]
    finally:
        serve.shutdown()
        ray.shutdown()
    dropped = [row for r in rounds for row in r["dropped"]]
    steps_after = [row["steps_after_cancel"] for row in dropped]
    return {
        "benchmark": "cancel",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(threads=1),
        "args": vars(args),
        "chunk_alone_s": chunk_s,
        "step_s_estimate": step_s,
        "rounds": rounds,
        "summary": {
            "cancelled_calls": args.rounds * args.chunks,
            "dropped_from_running_batches": len(dropped),
            "queued_calls_that_never_ran": args.rounds * args.chunks - len(dropped),
            "max_empty_s": max(r["empty_s"] for r in rounds),
            "empty_target_s": EMPTY_TARGET_S,
            "mean_steps_after_cancel": statistics.fmean(steps_after) if steps_after else 0.0,
            "max_steps_after_cancel": max(steps_after, default=0.0),
            "max_gpu_s_after_cancel": max(
                (row["gpu_s_after_cancel"] for row in dropped), default=0.0
            ),
            # Without cancellation each dropped row's batch would have run to its end: on
            # average about half its steps were still ahead when we cancelled.
            "steps_a_batch_runs": args.steps,
        },
    }


def print_report(result: dict[str, Any]) -> None:
    s = result["summary"]
    print(f"cancel: {s['cancelled_calls']} chunk calls cancelled over {len(result['rounds'])} "
          f"rounds; {s['dropped_from_running_batches']} left a running batch, "
          f"{s['queued_calls_that_never_ran']} never ran")  # fmt: skip
    print(f"  device time after a cancel: mean {s['mean_steps_after_cancel']:.2f} steps, "
          f"max {s['max_steps_after_cancel']:.2f} steps (target < 1; a batch runs "
          f"{s['steps_a_batch_runs']}), max {s['max_gpu_s_after_cancel']:.3f} GPU s")  # fmt: skip
    print(f"  queue empty after the cancel: max {s['max_empty_s']:.2f} s "
          f"(target < {s['empty_target_s']:.0f} s)")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    pin_threads(1)
    quiet_progress_bars()
    result = run(args)
    path = write_json(results_dir() / "cancel.json", result)
    print_report(result)
    print(f"wrote {path} ({machine_label(result['machine'])})")
    s = result["summary"]
    if s["max_steps_after_cancel"] >= 1.0 or s["max_empty_s"] >= EMPTY_TARGET_S:
        raise SystemExit("cancel: a target was missed (see above)")
    return result


if __name__ == "__main__":
    main()
