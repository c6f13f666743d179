"""HTTP load test: closed-loop clients and Poisson arrivals against a running `motionserve serve`.

By default it starts its own app (`motionserve serve` on loopback, a local Ray of its own, a
fresh storage directory, `max_active_jobs` lowered to 2 so that 3 clients meet backpressure;
stopped at the end),
or it targets `--url`. The jobs are tiny and fast: a 2 s clip of the real sample video (640 px,
25 fps), the draft preset with generation at 128 px, output at 256 px and 4 steps (the tests'
FAST_OVERRIDES), a new seed per job so diffusion always runs (the pose of the one clip is
computed once and then reused from the cache, as it would be for any repeat of a video), and
optionally a share of exact repeats (cache hits).

Two phases, each bounded in jobs and in seconds, after one untimed warm-up job:
- closed loop: N clients, each submitting its next job when the previous one has ended (a 503
  is retried after its Retry-After, at most 2 s later);
- open loop: Poisson arrivals at a rate; a 503 is counted and the arrival dropped.

Reported per phase: throughput (jobs/min, output and generated frames/s), end-to-end latency
(submit -> done seen by polling), the server's own job time (created -> updated) and the upload,
p50/p95/p99 of each, per-stage wall seconds per call p50/p95/p99 (from each job's ledger),
diffusion batch sizes (ledger notes "batch of N chunk(s)", and the `ray_motionserve_batch_size`
histogram of the server's metrics port), the 503 rate and errors. Every accepted job must end
done (with a downloadable MP4) or with a reported error; the exit status is 1 if any is lost.

    python -m benchmarks.load [--quick] [--clients 3] [--rate 30] [--jobs 8] [--url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from benchmarks.common import machine_label, results_dir, write_json

TERMINAL = {"done", "failed", "cancelled"}
# The tests' fast plan (tests/conftest.py FAST_OVERRIDES): every stage runs, in seconds.
FAST_OVERRIDES = {"generation_long_side": 128, "output_long_side": 256, "steps": 4}
BATCH_NOTE = re.compile(r"^batch of (\d+) chunk")
MAX_RETRY_AFTER_S = 2.0
REQUEST_TIMEOUT_S = 60.0
METRIC = "ray_motionserve_batch_size"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n    python")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="make bench: fewer jobs (< ~3 min)")
    parser.add_argument("--url", help="a running motionserve (default: start one on loopback)")
    parser.add_argument("--api-key", help="API key for --url")
    parser.add_argument("--metrics-url", help="Prometheus endpoint of --url's Ray node")
    parser.add_argument("--clients", type=int, help="closed-loop clients (default 3)")
    parser.add_argument("--rate", type=float, help="open-loop arrivals per minute (default 30)")
    parser.add_argument("--jobs", type=int, help="jobs per phase (default 8; quick 5)")
    parser.add_argument(
        "--phase-seconds",
        type=float,
        help="stop submitting after this long per phase (default 240; quick 90)",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=300.0,
        help="how long accepted jobs may take to end after the phase (default 300)",
    )
    parser.add_argument(
        "--repeat-share",
        type=float,
        default=0.25,
        help="share of jobs that repeat an earlier job exactly (cache hits; default 0.25)",
    )
    parser.add_argument(
        "--max-active-jobs",
        type=int,
        default=2,
        help="max_active_jobs of the started app (503 beyond; default 2)",
    )
    parser.add_argument("--upscaler", help="upscaler_model of the started app (default the app's)")
    parser.add_argument("--poll", type=float, default=0.5, help="status poll interval, s")
    parser.add_argument("--seed", type=int, default=0, help="seed of arrivals and job seeds")
    parser.add_argument("--output", type=Path, help="JSON path (default: results dir)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: results dir)")
    args = parser.parse_args(argv)
    args.output = args.output or results_dir() / "load.json"
    args.plot = args.plot or results_dir() / "load.png"
    args.clients = args.clients or 3
    args.rate = args.rate or 30.0
    args.jobs = args.jobs or (5 if args.quick else 8)
    args.phase_seconds = args.phase_seconds or (90.0 if args.quick else 240.0)
    if not 1 <= args.clients <= 32 or not 1 <= args.jobs <= 200 or not 0 < args.rate <= 600:
        parser.error("--clients must be 1..32, --jobs 1..200, --rate in (0, 600]")
    if not 0 <= args.repeat_share < 1 or not 0.05 <= args.poll <= 5:
        parser.error("--repeat-share must be in [0, 1), --poll in [0.05, 5]")
    if not 10 <= args.phase_seconds <= 3600 or not 10 <= args.drain_seconds <= 3600:
        parser.error("--phase-seconds and --drain-seconds must be 10..3600")
    return args


# --- one job ------------------------------------------------------------------------------------


class Target:
    """The app under load: its URL, optional API key, metrics endpoint and the clip bytes."""

    def __init__(self, url: str, clip: Path, api_key: str | None, metrics_url: str | None,
                 transport: httpx.AsyncBaseTransport | None = None):  # fmt: skip
        self.url = url.rstrip("/")
        self.clip_name = clip.name
        self.clip_bytes = clip.read_bytes()
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.metrics_url = metrics_url
        self.transport = transport  # tests: an in-process fake of the API


def job_request(seed: int) -> dict[str, Any]:
    return {
        "prompt": "a robot dancing in a park",
        "negative_prompt": "blurry",
        "styles": ["smooth"],
        "preset": "draft",
        "seed": seed,
        "overrides": FAST_OVERRIDES,
    }


async def submit(http: httpx.AsyncClient, target: Target, seed: int) -> dict[str, Any]:
    """POST /v1/jobs once: {'outcome': accepted|rejected|error, ...} with its latency."""
    files = {"video": (target.clip_name, target.clip_bytes, "video/mp4")}
    data = {"request": json.dumps(job_request(seed))}
    started = time.perf_counter()
    try:
        response = await http.post("/v1/jobs", files=files, data=data)
    except httpx.HTTPError as exc:
        return {"outcome": "error", "error": f"{type(exc).__name__}: {exc}", "upload_s": None}
    upload_s = time.perf_counter() - started
    if response.status_code == 202:
        return {"outcome": "accepted", "job_id": response.json()["job_id"], "upload_s": upload_s}
    if response.status_code == 503:
        retry = float(response.headers.get("Retry-After", "1") or 1)
        return {"outcome": "rejected", "retry_after_s": retry, "upload_s": upload_s}
    return {
        "outcome": "error",
        "upload_s": upload_s,
        "error": f"HTTP {response.status_code}: {response.text[:200]}",
    }


async def follow(http: httpx.AsyncClient, job_id: str, poll_s: float, deadline: float) -> dict:
    """Poll the job until it ends or the deadline passes; the last status seen (or None)."""
    status = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            response = await http.get(f"/v1/jobs/{job_id}")
            if response.status_code == 404:
                return {"state": "missing"}
            if response.status_code == 200:
                status = response.json()
                if status["state"] in TERMINAL:
                    return status
        await asyncio.sleep(poll_s)  # polling an HTTP API: there is nothing to wait on
    return status or {"state": "unknown"}


async def download_ok(http: httpx.AsyncClient, job_id: str) -> bool:
    """The result is an MP4 (an ftyp box first) of some size."""
    try:
        response = await http.get(f"/v1/jobs/{job_id}/result")
    except httpx.HTTPError:
        return False
    body = response.content
    return response.status_code == 200 and len(body) > 1000 and body[4:8] == b"ftyp"


async def run_job(
    http, target: Target, seed: int, poll_s: float, deadline: float, retry: bool
) -> list[dict[str, Any]]:
    """Submit (retrying 503s if `retry`), follow to the end, check the result. Returns one
    entry per submission attempt; the last one holds the job's outcome."""
    attempts = []
    started = time.perf_counter()
    while True:
        sent = await submit(http, target, seed)
        sent.update(seed=seed, submitted_at=time.perf_counter() - started)
        attempts.append(sent)
        if sent["outcome"] != "rejected" or not retry or time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(sent["retry_after_s"], MAX_RETRY_AFTER_S))  # the server's ask
    last = attempts[-1]
    if last["outcome"] == "accepted":
        accepted_at = time.perf_counter()
        status = await follow(http, last["job_id"], poll_s, deadline)
        last.update(job_outcome(status))
        last["e2e_s"] = time.perf_counter() - started
        last["after_accept_s"] = time.perf_counter() - accepted_at
        if last["final"] == "done":
            last["result_ok"] = await download_ok(http, last["job_id"])
    return attempts


def job_outcome(status: dict[str, Any]) -> dict[str, Any]:
    """What became of an accepted job: done, failed with a reported error, or lost."""
    state = status.get("state")
    outcome: dict[str, Any] = {"final": state}
    if state == "done":
        outcome.update(ledger_summary(status.get("ledger") or []))
        outcome["server_s"] = server_seconds(status)
    elif state in ("failed", "cancelled"):
        outcome["error"] = status.get("error")
    outcome["lost"] = lost(status)
    return outcome


def lost(status: dict[str, Any]) -> bool:
    state = status.get("state")
    return not (state == "done" or (state in ("failed", "cancelled") and status.get("error")))


def server_seconds(status: dict[str, Any]) -> float:
    created = datetime.fromisoformat(status["created_at"])
    return (datetime.fromisoformat(status["updated_at"]) - created).total_seconds()


def ledger_summary(ledger: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-stage call seconds, batch sizes per diffusion chunk, frames and cache hits."""
    stage_walls: dict[str, list[float]] = {}
    batch_sizes, hits = [], 0
    for record in ledger:
        if record.get("cache_hit"):
            hits += 1
            continue
        stage_walls.setdefault(record["stage"], []).append(record["wall_s"])
        for note in record.get("notes", []):
            match = BATCH_NOTE.match(note)
            if match and record["stage"] == "diffusion":
                batch_sizes.append(int(match.group(1)))

    def frames(stage: str) -> int:  # frames made by this job (a cache hit records none)
        return sum(r.get("frames", 0) for r in ledger if r["stage"] == stage)

    return {
        "stage_walls": stage_walls,
        "batch_sizes": batch_sizes,
        "cache_hits": hits,
        "generated_frames": frames("diffusion"),
        "joined_frames": frames("join"),
    }


# --- the phases ---------------------------------------------------------------------------------


class Seeds:
    """New seeds, and for a `repeat_share` of the picks (evenly spread, so a short run gets its
    share too) the seed of a job already done: the same clip and request again, every stage a
    cache hit."""

    def __init__(self, seed: int, repeat_share: float):
        self.random = random.Random(seed)
        self.repeat_share = repeat_share
        self.next_seed = 1000 + seed * 100_000
        self.picks = 0
        self.done: list[int] = []

    def pick(self) -> int:
        self.picks += 1
        due = math.floor(self.picks * self.repeat_share) > math.floor(
            (self.picks - 1) * self.repeat_share
        )
        if due and self.done:
            return self.random.choice(self.done)
        self.next_seed += 1
        return self.next_seed

    def finished(self, attempts: list[dict]) -> None:
        if attempts[-1].get("final") == "done":
            self.done.append(attempts[-1]["seed"])


async def closed_loop(target: Target, args, seeds: Seeds) -> dict[str, Any]:
    remaining = args.jobs
    stop_at = time.monotonic() + args.phase_seconds
    deadline = stop_at + args.drain_seconds
    results: list[list[dict]] = []

    async def client(http) -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < stop_at:
            remaining -= 1
            attempts = await run_job(http, target, seeds.pick(), args.poll, deadline, retry=True)
            seeds.finished(attempts)
            results.append(attempts)

    started = time.perf_counter()
    async with http_client(target, args.clients) as http:
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
    return {
        "kind": "closed",
        "clients": args.clients,
        "jobs_asked": args.jobs,
        "wall_s": time.perf_counter() - started,
        "jobs": results,
    }


def poisson_arrivals(count: int, per_minute: float, seed: int) -> list[float]:
    """Arrival times (s from the start) of a Poisson process with this rate."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(60.0 / per_minute, count)).tolist()


async def open_loop(target: Target, args, seeds: Seeds) -> dict[str, Any]:
    arrivals = [
        t for t in poisson_arrivals(args.jobs, args.rate, args.seed) if t < args.phase_seconds
    ]
    deadline = time.monotonic() + args.phase_seconds + args.drain_seconds
    started = time.perf_counter()

    async def arrival(http, at: float) -> list[dict]:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - started)))  # the schedule
        attempts = await run_job(http, target, seeds.pick(), args.poll, deadline, retry=False)
        seeds.finished(attempts)
        return attempts

    async with http_client(target, len(arrivals)) as http:
        results = await asyncio.gather(*(arrival(http, at) for at in arrivals))
    return {
        "kind": "open",
        "rate_per_min": args.rate,
        "jobs_asked": args.jobs,
        "arrivals": len(arrivals),
        "wall_s": time.perf_counter() - started,
        "jobs": list(results),
    }


def http_client(target: Target, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max(4, 2 * connections))
    return httpx.AsyncClient(
        base_url=target.url,
        headers=target.headers,
        limits=limits,
        timeout=REQUEST_TIMEOUT_S,
        transport=target.transport,
    )


# --- statistics ---------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99]).tolist()
    return {
        "n": len(values),
        "p50": round(p50, 3),
        "p95": round(p95, 3),
        "p99": round(p99, 3),
        "max": round(max(values), 3),
    }


def phase_stats(phase: dict[str, Any]) -> dict[str, Any]:
    """Throughput, latencies, stages, batches, 503s, errors and lost jobs of a phase."""
    attempts = [a for job in phase["jobs"] for a in job]
    finals = [job[-1] for job in phase["jobs"]]
    accepted = [f for f in finals if f["outcome"] == "accepted"]
    done = [f for f in accepted if f.get("final") == "done"]
    stages: dict[str, list[float]] = {}
    for job in done:
        for stage, walls in job["stage_walls"].items():
            stages.setdefault(stage, []).extend(walls)
    wall = phase["wall_s"]
    rejected = sum(a["outcome"] == "rejected" for a in attempts)
    # Every job delivers the same clip; a repeat's join is a cache hit that records no frames.
    frames_per_job = max((j["joined_frames"] for j in done), default=0)
    return {
        "submissions": len(attempts),
        "jobs": len(finals),
        "accepted": len(accepted),
        "done": len(done),
        "failed_with_error": sum(
            f.get("final") in ("failed", "cancelled") and not f["lost"] for f in accepted
        ),
        "lost": [f["job_id"] for f in accepted if f["lost"]],
        "results_not_downloadable": [f["job_id"] for f in done if not f.get("result_ok")],
        "rejected_503": rejected,
        "rate_503": round(rejected / len(attempts), 3) if attempts else 0.0,
        "submit_errors": [a["error"] for a in attempts if a["outcome"] == "error"],
        "wall_s": round(wall, 2),
        "jobs_per_min": round(60.0 * len(done) / wall, 2) if wall else 0.0,
        "output_frames_per_job": frames_per_job,
        "output_frames_per_s": round(len(done) * frames_per_job / wall, 2) if wall else 0.0,
        "generated_frames_per_s": (
            round(sum(j["generated_frames"] for j in done) / wall, 2) if wall else 0.0
        ),
        "cache_hit_jobs": sum(j["generated_frames"] == 0 for j in done),
        "latency_s": {
            "end_to_end": percentiles([j["e2e_s"] for j in done]),
            "end_to_end_fresh": percentiles([j["e2e_s"] for j in done if j["generated_frames"]]),
            "end_to_end_repeats": percentiles(
                [j["e2e_s"] for j in done if not j["generated_frames"]]
            ),
            "server_job": percentiles([j["server_s"] for j in done]),
            "upload": percentiles([a["upload_s"] for a in attempts if a["upload_s"] is not None]),
        },
        "stage_wall_s_per_call": {stage: percentiles(v) for stage, v in sorted(stages.items())},
        "batch_sizes": batch_counts(done),
    }


def batch_counts(done: list[dict[str, Any]]) -> dict[str, Any]:
    """Diffusion chunks by the size of the batch they ran in (from the jobs' ledgers), and
    the batches that makes (a batch of N counts once for its N chunks)."""
    sizes = [size for job in done for size in job["batch_sizes"]]
    chunks = Counter(sizes)
    batches = sum(n / size for size, n in chunks.items())
    return {
        "chunks_by_batch_size": {str(k): chunks[k] for k in sorted(chunks)},
        "batches_estimated": round(batches, 1),
        "mean_batch_size": round(len(sizes) / batches, 2) if batches else None,
    }


# --- Prometheus ---------------------------------------------------------------------------------


def scrape_batch_histogram(url: str | None) -> dict[str, Any] | None:
    """count, sum and cumulative buckets of ray_motionserve_batch_size (all replicas summed)."""
    if not url:
        return None
    try:
        text = httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return None
    return parse_batch_histogram(text)


def parse_batch_histogram(text: str) -> dict[str, Any]:
    """count, sum and cumulative buckets of ray_motionserve_batch_size in Prometheus text."""
    count = total = 0.0
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(METRIC):
            continue
        head, _, value = line.rpartition(" ")
        if head.startswith(f"{METRIC}_count"):
            count += float(value)
        elif head.startswith(f"{METRIC}_sum"):
            total += float(value)
        elif head.startswith(f"{METRIC}_bucket"):
            le = re.search(r'le="([^"]+)"', head)
            if le:
                buckets[le.group(1)] = buckets.get(le.group(1), 0.0) + float(value)
    return {"count": count, "sum": total, "buckets": buckets}


def metric_delta(before: dict | None, after: dict | None) -> dict[str, Any]:
    if before is None or after is None:
        return {"available": False}
    count = after["count"] - before["count"]
    buckets = {le: after["buckets"][le] - before["buckets"].get(le, 0.0) for le in after["buckets"]}
    return {
        "available": True,
        "batches": count,
        "batches_by_size_bucket": bucket_counts(buckets),
        # In our runs the _sum series lagged the buckets; the buckets agree with the ledgers.
        "mean_batch_size_from_sum": (
            round((after["sum"] - before["sum"]) / count, 2) if count else None
        ),
        "cumulative_buckets": buckets,
    }


def bucket_counts(cumulative: dict[str, float]) -> dict[str, float]:
    """Non-cumulative batches per bucket, by upper bound (le), the empty ones left out."""
    order = sorted(cumulative, key=lambda le: math.inf if le == "+Inf" else float(le))
    counts, below = {}, 0.0
    for le in order:
        if cumulative[le] - below > 0:
            counts[le] = cumulative[le] - below
        below = cumulative[le]
    return counts


def settled_histogram(
    url: str | None, expected_batches: float, before: dict | None, wait_s: float = 20.0
) -> dict | None:
    """Ray's agent exports metrics on an interval: poll until the batches show (bounded)."""
    deadline = time.monotonic() + wait_s
    after = scrape_batch_histogram(url)
    while after is not None and before is not None and time.monotonic() < deadline:
        if after["count"] - before["count"] >= expected_batches - 0.5:
            break
        time.sleep(1.0)  # waiting on another process's export interval
        after = scrape_batch_histogram(url)
    return after


# --- the app ------------------------------------------------------------------------------------


@contextlib.contextmanager
def started_app(args, folder: Path):
    """`motionserve serve` on loopback (benchmarks.fixtures.ServeApp) with this benchmark's
    max_active_jobs; yields (url, metrics url)."""
    from benchmarks.fixtures import ServeApp
    from serve.config import AppArgs

    defaults = AppArgs()
    app = ServeApp(folder, args.upscaler or defaults.upscaler_model, defaults.max_chunks_in_flight)
    config = yaml.safe_load(app.config.read_text())
    config["applications"][0]["args"]["max_active_jobs"] = args.max_active_jobs
    app.config.write_text(yaml.safe_dump(config))
    try:
        cold = app.start()
        command = list(app.process.args)
        metrics_port = command[command.index("--metrics-port") + 1]
        print(f"app up in {cold:.1f} s at {app.url}", flush=True)
        yield app.url, f"http://127.0.0.1:{metrics_port}/metrics", cold
    except BaseException:
        print(f"server log (tail):\n{app.log_tail()}", file=sys.stderr)
        raise
    finally:
        app.stop()


def load_clip() -> Path:
    """2 s of the sample at 640 px, 25 fps (benchmarks.overhead's warm-up clip, cached)."""
    from benchmarks.fixtures import bench_clips
    from serve.config import Settings

    return bench_clips(Settings().cache_dir)[1]


async def run_phases(target: Target, args) -> dict[str, Any]:
    seeds = Seeds(args.seed, args.repeat_share)
    phases = {}
    # Ray exports metrics on an interval, so per-phase deltas would straddle phases: the
    # histogram is compared over the whole run, after it settles.
    baseline = await asyncio.to_thread(scrape_batch_histogram, target.metrics_url)
    async with http_client(target, 1) as http:  # untimed: replicas load their models
        warmup = await run_job(
            http, target, seeds.pick(), args.poll, time.monotonic() + args.drain_seconds, retry=True
        )
    seeds.finished(warmup)
    print(
        f"warm-up job: {warmup[-1].get('final')} in {warmup[-1].get('e2e_s', 0):.1f} s", flush=True
    )
    for name, phase in (("closed", closed_loop), ("open", open_loop)):
        result = await phase(target, args, seeds)
        stats = phase_stats(result)
        phases[name] = {
            **{k: v for k, v in result.items() if k != "jobs"},
            "stats": stats,
            "jobs": result["jobs"],
        }
        print(
            f"{name} loop: {stats['done']}/{stats['accepted']} done, {stats['rejected_503']} "
            f"x 503, {len(stats['lost'])} lost, {stats['wall_s']:.0f} s",
            flush=True,
        )
    jobs = [warmup] + [job for phase in phases.values() for job in phase["jobs"]]
    ledger = batch_counts([a for job in jobs for a in job if a.get("final") == "done"])
    after = await asyncio.to_thread(
        settled_histogram, target.metrics_url, ledger["batches_estimated"], baseline
    )
    prometheus = {**metric_delta(baseline, after), "ledger_all_jobs": ledger}
    return {"warmup": warmup, "phases": phases, "prometheus_batch_size": prometheus}


def run(args) -> dict[str, Any]:
    from benchmarks.common import machine_summary

    started = time.perf_counter()
    clip = load_clip()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bl-", ignore_cleanup_errors=True) as folder:
        if args.url:
            app = contextlib.nullcontext((args.url, args.metrics_url, None))
        else:
            app = started_app(args, Path(folder))
        with app as (url, metrics_url, cold_start_s):
            target = Target(url, clip, args.api_key, metrics_url)
            outcome = asyncio.run(run_phases(target, args))
    return {
        "benchmark": "load",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "default",
        "machine": {
            **machine_summary(),
            "load_average_1m_before": round(load_before, 2),
            "load_average_1m_after": round(os.getloadavg()[0], 2),
            "shared": "the app, its Ray and this client share the machine's cores; other jobs "
            "may run too (see the load average)",
        },
        "target": args.url
        or "motionserve serve started by the benchmark (loopback, "
        f"serve/configs/local.yaml, max_active_jobs {args.max_active_jobs})",
        "cold_start_s": round(cold_start_s, 1) if cold_start_s is not None else None,
        "clip": f"{clip.name}: 2 s of the sample video, 640 px, 25 fps",
        "request": {**job_request(0), "seed": "varied per job"},
        "repeat_share": args.repeat_share,
        "poll_s": args.poll,
        "latency_note": f"end-to-end = submit -> done seen by polling every {args.poll} s "
        "(resolution); server_job = the job's created_at -> updated_at",
        **outcome,
        "lost_jobs": [j for p in outcome["phases"].values() for j in p["stats"]["lost"]]
        + ([outcome["warmup"][-1]["job_id"]] if outcome["warmup"][-1].get("lost") else []),
        "total_s": round(time.perf_counter() - started, 1),
    }


# --- output -------------------------------------------------------------------------------------


def format_report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"load test ({result['mode']}), {result['when']}, {m['cpu']} x{m['cpu_count']}; "
        f"{m['shared']}",
        f"target: {result['target']}; cold start {result['cold_start_s']} s; clip {result['clip']}",
        f"{'phase':7} {'jobs':>4} {'acc':>4} {'done':>4} {'503':>4} {'err':>4} {'lost':>4} "
        f"{'jobs/min':>8} {'out fr/s':>8} {'e2e p50':>8} {'p95':>7} {'p99':>7} "
        f"{'server p50':>10} {'hits':>4} {'hit p50':>8}",
    ]
    for name, phase in result["phases"].items():
        s = phase["stats"]
        e2e, server = s["latency_s"]["end_to_end_fresh"], s["latency_s"]["server_job"]
        repeats = s["latency_s"]["end_to_end_repeats"]
        lines.append(
            f"{name:7} {s['jobs']:>4} {s['accepted']:>4} {s['done']:>4} {s['rejected_503']:>4} "
            f"{len(s['submit_errors']) + s['failed_with_error']:>4} {len(s['lost']):>4} "
            f"{s['jobs_per_min']:>8.2f} {s['output_frames_per_s']:>8.2f} {_f(e2e['p50']):>8} "
            f"{_f(e2e['p95']):>7} {_f(e2e['p99']):>7} {_f(server['p50']):>10} "
            f"{s['cache_hit_jobs']:>4} {_f(repeats['p50']):>8}"
        )
    lines.append(
        "e2e: fresh jobs (diffusion ran), first submit -> done seen, 503 retries included; "
        "server: created -> updated; hits: exact repeats served from the cache"
    )
    for name, phase in result["phases"].items():
        s = phase["stats"]
        lines.append(f"\n{name} loop: stage wall s per call  p50 / p95 / p99 (n)")
        for stage, p in s["stage_wall_s_per_call"].items():
            lines.append(
                f"  {stage:12} {_f(p['p50']):>7} / {_f(p['p95']):>7} / {_f(p['p99']):>7} ({p['n']})"
            )
        b = s["batch_sizes"]
        lines.append(
            f"  diffusion chunks by batch size {b['chunks_by_batch_size']} "
            f"(~{b['batches_estimated']} batches, mean size {b['mean_batch_size']})"
        )
        lines.append(
            f"  503 rate {s['rate_503']:.1%}; submit errors {s['submit_errors'] or 0}; "
            f"results not downloadable {s['results_not_downloadable'] or 0}"
        )
    prom = result["prometheus_batch_size"]
    ledger = prom["ledger_all_jobs"]
    prom_text = (
        f"{prom['batches']:.0f} batches, by size bucket (le) {prom['batches_by_size_bucket']}"
        if prom.get("available")
        else "not available"
    )
    lines.append(
        f"\nwhole run incl. warm-up: {METRIC} (Prometheus) {prom_text}; job ledgers: chunks by "
        f"batch size {ledger['chunks_by_batch_size']}, ~{ledger['batches_estimated']} batches, "
        f"mean size {ledger['mean_batch_size']}"
    )
    lines.append(f"lost jobs: {result['lost_jobs'] or 'none'}")
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, batches) = plt.subplots(1, 2, figsize=(11, 4))
    phases = result["phases"]
    for name, phase in phases.items():
        done = sorted(j[-1]["e2e_s"] for j in phase["jobs"] if j[-1].get("final") == "done")
        if done:
            share = np.arange(len(done) + 1) / len(done)
            lat.step([0.0, *done], share, where="post", label=f"{name} loop (n={len(done)})")
    lat.set_xlabel("end-to-end latency, s")
    lat.set_ylabel("share of jobs done")
    lat.set_title("latency CDF")
    lat.legend(fontsize=8)
    width = 0.8 / max(1, len(phases))
    seen: set[int] = set()
    for i, (name, phase) in enumerate(phases.items()):
        counts = phase["stats"]["batch_sizes"]["chunks_by_batch_size"]
        sizes = [int(k) for k in counts]
        seen.update(sizes)
        offset = (i - (len(phases) - 1) / 2) * width
        batches.bar([s + offset for s in sizes], list(counts.values()), width, label=name)
    batches.set_xticks(sorted(seen))
    batches.set_xlabel("diffusion batch size (chunks)")
    batches.set_ylabel("chunks")
    batches.set_title("batch sizes seen (job ledgers)")
    batches.legend(fontsize=8)
    fig.suptitle(
        f"motionserve load test ({result['when'][:10]}, {machine_label(result['machine'])})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(format_report(result))
    write_json(args.output, result, default=str)
    plot(result, args.plot)
    print(f"wrote {args.output} and {args.plot} ({result['total_s']} s)")
    unreadable = [
        j for p in result["phases"].values() for j in p["stats"]["results_not_downloadable"]
    ]
    if result["lost_jobs"] or unreadable:
        raise SystemExit(
            f"lost {len(result['lost_jobs'])} accepted job(s): {result['lost_jobs']}; done "
            f"without a downloadable MP4: {unreadable}"
        )
    return result


if __name__ == "__main__":
    main()
