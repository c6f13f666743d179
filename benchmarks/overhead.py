"""Serve overhead: one job through the Serve app over HTTP against the same stages in one process.

The clip: 10 s of the real sample video (its 7.7 s played forward, then backward), 640 px
wide at 25 fps, no audio, cached under the cache dir (`bench/`). The request: tiny
random-weight models, the draft preset with generation at 128 px, output at 256 px and 4 steps
(`FAST_OVERRIDES` of the tests), the same plan and the same `max_chunks_in_flight` on both
sides; the upscaler is the app's default (Compact, realesr-animevideov3) unless `--upscaler`.

- in process: `serve.local_run.edit_video`, with the models loaded once before timing (as
  they are in a warm replica) and one untimed warm-up job on a 2 s clip; each timed job gets a
  fresh storage directory.
- over HTTP: `motionserve serve` as a subprocess (a local Ray of its own, the app from
  serve/configs/local.yaml with a free port and a fresh storage directory); a job's time is
  submit (upload included) -> done (polled every 0.25 s) -> result downloaded. The artifact
  cache is emptied before every job, so every job runs decode, pose and diffusion again; the
  reports are checked for it (no cache hits, diffusion on every chunk).

Also measured: app cold start (launch -> /readyz 200), first-job latency (replicas load their
models) against warm jobs with other seeds, and the CPU seconds each side burns per job (this
process; or every process of the app's Ray session: replicas, raylet, GCS, controller, proxy).

The machine may be shared, so the in-process rounds run before and after the Serve block (the
app is down while they run) and the best round of each side is compared (medians are reported
too). `--quick` runs one round per side (what `make bench` runs).

    python -m benchmarks.overhead [--quick] [--rounds 3] [--upscaler lanczos]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import machine_summary, results_dir, write_json
from benchmarks.fixtures import (
    CLIP_FPS,
    CLIP_SECONDS,
    CLIP_WIDTH,
    WARMUP_SECONDS,
    ServeApp,
    bench_clips,
    warm_models,
)
from serve.config import AppArgs, Settings
from serve.schemas import JobRequest

TARGET_RATIO = 1.15
POLL_S = 0.25
JOB_TIMEOUT_S = 600.0
IDLE_WINDOW_S = 5.0
# The tests' fast plan: every lever of the pipeline runs, with a bounded run time on 2 cores.
OVERRIDES = {"generation_long_side": 128, "output_long_side": 256, "steps": 4}


def bench_request(seed: int) -> JobRequest:
    return JobRequest(
        prompt="a robot dancing in a park",
        negative_prompt="blurry",
        styles=["smooth"],
        preset="draft",
        seed=seed,
        overrides=OVERRIDES,
    )


# ---------------------------------------------------------------------------------- the clip


# ------------------------------------------------------------------------------- in process


def run_in_process(clip: Path, seed: int, upscaler: str, chunks: int) -> dict[str, Any]:
    from serve.local_run import edit_video

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="overhead-inproc-") as folder:
        args = app_args(folder, upscaler, chunks)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        report = asyncio.run(edit_video(clip, Path(folder) / "out.mp4", bench_request(seed), args))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"seed": seed, "load_average": round(load, 2), "seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2), **report_summary(report)}  # fmt: skip


def app_args(storage: str, upscaler: str, chunks: int) -> AppArgs:
    return AppArgs(storage_uri=storage, upscaler_model=upscaler, max_chunks_in_flight=chunks)


# ------------------------------------------------------------------------------ over HTTP


def run_over_http(app: ServeApp, clip: Path, seed: int) -> dict[str, Any]:
    from serve.client import Client

    client = Client(app.url, timeout_s=120)
    app.clear_cache()
    load = os.getloadavg()[0]
    cpu_before = app.cpu_seconds()
    started = time.perf_counter()
    accepted = client.submit(clip, bench_request(seed))
    submitted = time.perf_counter()
    status = client.wait(accepted["job_id"], poll_s=POLL_S, timeout_s=JOB_TIMEOUT_S)
    done = time.perf_counter()
    if status["state"] != "done":
        raise RuntimeError(f"job {accepted['job_id']} {status['state']}: {status.get('error')}")
    with tempfile.TemporaryDirectory(prefix="overhead-dl-") as folder:
        client.download(accepted["job_id"], Path(folder) / "out.mp4")
    finished = time.perf_counter()
    cpu_after = app.cpu_seconds()
    # Processes that lived through the job (a replica that started mid-job counts from zero).
    cpu = sum(t - cpu_before.get(pid, 0.0) for pid, t in cpu_after.items())
    return {
        "seed": seed,
        "load_average": round(load, 2),
        "seconds": round(finished - started, 2),
        "upload_s": round(submitted - started, 2),
        "submit_to_done_s": round(done - started, 2),
        "download_s": round(finished - done, 2),
        "server_job_s": round(server_seconds(status), 2),
        "cpu_seconds": round(cpu, 2),
        **report_summary(status["report"]),
        **ledger_facts(status.get("ledger") or []),
    }


def ledger_facts(ledger: list[dict[str, Any]]) -> dict[str, Any]:
    """Diffusion batch sizes, and model load seconds (every chunk carries its share of its
    batch's load, so the sum counts each load once)."""
    per_chunk = [
        int(note.split()[2])
        for r in ledger
        if r["stage"] == "diffusion"
        for note in r["notes"]
        if note.startswith("batch of")
    ]
    batches = sorted(
        (size for size in set(per_chunk) for _ in range(per_chunk.count(size) // size)),
        reverse=True,
    )
    return {
        "diffusion_batches": batches,
        "model_load_s": round(sum(r.get("load_s") or 0.0 for r in ledger), 2),
    }


def idle_cpu_share(app: ServeApp, seconds: float = IDLE_WINDOW_S) -> float:
    """CPU the idle app burns (Ray daemons, controller, proxy, replicas' loops), in cores."""
    before = app.cpu_seconds()
    time.sleep(seconds)  # a fixed window on purpose: this measures a rate over time
    after = app.cpu_seconds()
    return sum(t - before.get(pid, 0.0) for pid, t in after.items()) / seconds


def server_seconds(status: dict[str, Any]) -> float:
    """Job created -> last update (done), by the server's clock."""
    created = datetime.fromisoformat(status["created_at"])
    return (datetime.fromisoformat(status["updated_at"]) - created).total_seconds()


# -------------------------------------------------------------------------------- reports


def report_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Per-stage seconds from a cost report, after checking the job really did the work."""
    stages = {s["stage"]: s for s in report["plan"]["stages"]}
    hits = {name: s["cache_hits"] for name, s in stages.items() if s["cache_hits"]}
    diffusion = stages.get("diffusion", {})
    if hits or not diffusion.get("calls"):
        raise RuntimeError(f"not a fresh run: cache hits {hits}, diffusion {diffusion}")
    return {
        "chunks": diffusion["calls"],
        "generated_frames": report["plan"]["generated_frames"],
        "report_load_s": round(sum(s["load_seconds"] for s in stages.values()), 2),
        "stage_seconds": {name: round(s["seconds"], 3) for name, s in stages.items()},
        "stage_wall_seconds": {name: round(s["wall_seconds"], 3) for name, s in stages.items()},
    }


def best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return min(rounds, key=lambda r: r["seconds"])


def median_seconds(rounds: list[dict[str, Any]]) -> float:
    return round(statistics.median(r["seconds"] for r in rounds), 2)


def summarize(in_process: list[dict], serve_block: dict[str, Any]) -> dict[str, Any]:
    warm, first = serve_block["warm"], serve_block["first"]
    fast_local, fast_serve = best(in_process), best(warm)
    ratio = fast_serve["seconds"] / fast_local["seconds"]
    return {
        "ratio_best": round(ratio, 3),
        "ratio_median": round(median_seconds(warm) / median_seconds(in_process), 3),
        "ratio_server_side_best": round(
            min(r["server_job_s"] for r in warm) / fast_local["seconds"], 3
        ),
        "target": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "in_process_best_s": fast_local["seconds"],
        "serve_warm_best_s": fast_serve["seconds"],
        "cpu_seconds_per_job": {
            "in_process": fast_local["cpu_seconds"],
            "serve": fast_serve["cpu_seconds"],
        },
        "serve_idle_cpu_cores": serve_block["idle_cpu_cores"],
        "cold_start_s": serve_block["cold_start_s"],
        "first_job_s": first["submit_to_done_s"],
        "first_job_model_load_s": first["model_load_s"],
        "warm_job_s": min(r["submit_to_done_s"] for r in warm),
        "first_minus_warm_s": round(
            first["submit_to_done_s"] - min(r["submit_to_done_s"] for r in warm), 2
        ),
    }


def format_table(result: dict[str, Any]) -> str:
    s = result["summary"]
    local, serve_ = best(result["in_process"]), best(result["serve_warm"])
    lines = [
        "stage seconds as the cost reports bill them, and wall seconds summed over calls",
        f"{'stage':12} {'in-proc s':>10} {'serve s':>9} {'in-proc wall':>13} {'serve wall':>11}",
    ]
    for stage, seconds in local["stage_seconds"].items():
        lines.append(
            f"{stage:12} {seconds:>10.2f} {serve_['stage_seconds'].get(stage, 0):>9.2f} "
            f"{local['stage_wall_seconds'][stage]:>13.2f} "
            f"{serve_['stage_wall_seconds'].get(stage, 0):>11.2f}"
        )
    rounds_local = ", ".join(f"{r['seconds']:.1f}" for r in result["in_process"])
    rounds_serve = ", ".join(f"{r['seconds']:.1f}" for r in result["serve_warm"])
    lines += [
        f"job (10 s clip, {local['chunks']} chunks)    in process [{rounds_local}] s, "
        f"Serve over HTTP [{rounds_serve}] s",
        f"Serve / in process: {s['ratio_best']:.3f} (best of each; medians "
        f"{s['ratio_median']:.3f}; server-side job time {s['ratio_server_side_best']:.3f}), "
        f"target <= {TARGET_RATIO}: {'met' if s['meets_target'] else 'MISSED'}",
        f"CPU seconds per job: in process {s['cpu_seconds_per_job']['in_process']:.1f}, "
        f"Serve (all app processes) {s['cpu_seconds_per_job']['serve']:.1f}",
        f"idle app: {s['serve_idle_cpu_cores']:.2f} cores busy; diffusion chunks per call: "
        f"in process 1, Serve {serve_['diffusion_batches']}",
        f"cold start (launch -> /readyz 200) {s['cold_start_s']:.1f} s; submit -> done: first job "
        f"{s['first_job_s']:.1f} s (model loads {s['first_job_model_load_s']:.1f} s) vs warm "
        f"{s['warm_job_s']:.1f} s",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    names = ["in process\n(best)", "Serve, warm\n(best)", "Serve,\nfirst job", "app cold\nstart"]
    values = [s["in_process_best_s"], s["serve_warm_best_s"], s["first_job_s"], s["cold_start_s"]]
    fig, axis = plt.subplots(figsize=(6.4, 3.6))
    bars = axis.bar(names, values, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"])
    axis.bar_label(bars, fmt="%.1f s")
    axis.axhline(s["in_process_best_s"] * TARGET_RATIO, color="grey", linestyle="--",
                 label=f"target: in process x {TARGET_RATIO}")  # fmt: skip
    axis.set_ylabel("seconds")
    axis.set_ylim(0, max(values) * 1.2)
    upscaler = result.get("upscaler_model", "")
    axis.set_title(f"10 s clip, tiny models, {upscaler}: Serve / in process {s['ratio_best']:.2f}")
    axis.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main


def run_serve_block(clip: Path, seeds: list[int], upscaler: str, chunks: int) -> dict:
    """Cold start, the first job (seed 0), idle CPU, then the warm jobs; the app is stopped
    before returning."""
    with tempfile.TemporaryDirectory(prefix="ovh-", ignore_cleanup_errors=True) as folder:
        app = ServeApp(Path(folder), upscaler, chunks)
        try:
            cold_start_s = round(app.start(), 2)
            print(f"cold start (launch -> /readyz 200): {cold_start_s:.1f} s", flush=True)
            first = _say("Serve, first job", run_over_http(app, clip, 0))
            idle = round(idle_cpu_share(app), 3)
            warm = [_say("Serve, warm job", run_over_http(app, clip, seed)) for seed in seeds]
        except BaseException:
            print(f"server log (tail):\n{app.log_tail()}", file=sys.stderr)
            raise
        finally:
            stopping = time.perf_counter()
            app.stop()
            stop_s = round(time.perf_counter() - stopping, 2)
    return {"cold_start_s": cold_start_s, "first": first, "idle_cpu_cores": idle, "warm": warm,
            "stop_s": stop_s}  # fmt: skip


def run(options: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()
    clip, warmup = bench_clips(Settings().cache_dir)
    rounds, upscaler, chunks = options.rounds, options.upscaler, options.chunks_in_flight
    seeds = [1 + i for i in range(rounds)]
    before = (rounds + 1) // 2
    with warm_models(app_args("", upscaler, chunks)):
        run_in_process(warmup, 0, upscaler, chunks)  # untimed: first calls of every library
        # In-process rounds before and after the Serve block (the app is down while they run),
        # so a change of load on the shared machine hits both sides.
        in_process = [_say("in process", run_in_process(clip, seed, upscaler, chunks))
                      for seed in seeds[:before]]  # fmt: skip
        serve_block = run_serve_block(clip, seeds, upscaler, chunks)
        in_process += [_say("in process", run_in_process(clip, seed, upscaler, chunks))
                       for seed in seeds[before:]]  # fmt: skip
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_summary(),
        "machine_shared": True,
        "machine_note": (
            f"Shared with other jobs (load average {load_before[0]:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after; each job records the load average at its start): "
            f"each side ran {rounds} timed round(s); the best round of each side is compared, "
            "medians are reported too."
        ),
        "clip": f"{clip.name}: the sample video looped forward/backward to {CLIP_SECONDS:g} s, "
        f"{CLIP_FPS:g} fps, {CLIP_WIDTH} px wide, no audio",
        "request": bench_request(0).model_dump(mode="json", exclude={"seed"}),
        "upscaler_model": upscaler,
        "max_chunks_in_flight": chunks,
        "serve_config": "serve/configs/local.yaml with its port, storage_uri, upscaler_model "
        "and max_chunks_in_flight set",
        "timing": {
            "in_process": "edit_video wall time; models loaded once before and an untimed "
            f"{WARMUP_SECONDS:g} s warm-up job; fresh storage directory per round",
            "serve": f"submit (upload) -> done (polled every {POLL_S} s) -> downloaded; "
            "artifact cache emptied before every job",
            "cpu_seconds": "in process: this process; Serve: every process of the app's "
            "session (replicas, Ray daemons, controller, proxy)",
            "verified": "every timed job: no cache hit in its report, diffusion ran on every chunk",
        },
        "notes": [
            "stage seconds are what the cost reports bill: CPU seconds of the process during "
            "each call (diffusion on CPU: its compute seconds); with several chunks in flight "
            "they include other calls running in the same process at the time, so in process "
            "they overlap across stages",
            "diffusion: in process one chunk per engine call (the engine's lock serialises "
            "them); Serve groups chunks per batch key (KeyedBatcher, max_batch_size 4 in "
            "local.yaml)",
            "torch threads: in process torch's default (one per core); in a Serve replica Ray "
            "sets OMP_NUM_THREADS to its whole CPUs, at least 1 (1 here)",
        ],
        "rounds": rounds,
        "in_process": in_process,
        "serve_first_job": serve_block["first"],
        "serve_warm": serve_block["warm"],
        "serve_stop_s": serve_block["stop_s"],
        "summary": summarize(in_process, serve_block),
        "quick": options.quick,
        "run_s": round(time.perf_counter() - started, 1),
    }


def _say(label: str, result: dict[str, Any]) -> dict[str, Any]:
    print(f"{label}: {result['seconds']:.1f} s (CPU {result['cpu_seconds']:.1f} s)", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round per side (make bench)")
    parser.add_argument("--rounds", type=int, default=3, help="timed jobs per side (default 3)")
    parser.add_argument(
        "--upscaler", default=AppArgs().upscaler_model,
        help="upscaler_model on both sides: the app's default (Compact) or 'lanczos'",
    )  # fmt: skip
    parser.add_argument(
        "--chunks-in-flight", type=int, default=AppArgs().max_chunks_in_flight,
        help="max_chunks_in_flight on both sides",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, help="JSON path (default: results dir)")
    options = parser.parse_args(argv)
    options.output = options.output or results_dir() / "overhead.json"
    if options.quick:
        options.rounds = 1
    result = run(options)
    print(format_table(result))
    write_json(options.output, result)
    plot(result, options.output.with_suffix(".png"))
    print(f"wrote {options.output} and {options.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
