"""benchmarks/load.py against an in-process fake of the HTTP API (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from benchmarks import load

MP4 = b"\x00\x00\x00\x20ftypisom" + bytes(2000)
LEDGER = [
    {"stage": "pose", "wall_s": 0.5, "frames": 24},
    {"stage": "diffusion", "wall_s": 1.0, "frames": 16, "notes": ["batch of 2 chunk(s)"]},
    {"stage": "diffusion", "wall_s": 0.6, "frames": 8, "notes": ["batch of 1 chunk(s)"]},
    {"stage": "join", "wall_s": 0.1, "frames": 50},
]


class FakeApi:
    """POST /v1/jobs answers 503 while `capacity` jobs are unfinished; a job ends after two
    status polls, done unless its seed is in `fail_silently` (failed without an error)."""

    def __init__(self, capacity: int, fail_silently: frozenset[int] = frozenset()):
        self.capacity, self.fail_silently = capacity, fail_silently
        self.jobs: dict[str, dict] = {}

    def active(self) -> int:
        return sum(job["polls"] < 2 for job in self.jobs.values())

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/v1/jobs":
            if self.active() >= self.capacity:
                return httpx.Response(503, headers={"Retry-After": "0.02"}, json={"error": {}})
            seed = json.loads(_form_field(request, "request"))["seed"]
            job_id = f"{len(self.jobs):032x}"
            self.jobs[job_id] = {"polls": 0, "seed": seed}
            return httpx.Response(202, json={"job_id": job_id})
        job_id = path.split("/")[3]
        if path.endswith("/result"):
            return httpx.Response(200, content=MP4)
        job = self.jobs[job_id]
        job["polls"] += 1
        state = "running" if job["polls"] < 2 else "done"
        if state == "done" and job["seed"] in self.fail_silently:
            state = "failed"
        return httpx.Response(200, json={
            "state": state, "error": None, "ledger": LEDGER,
            "created_at": "2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T00:00:03+00:00",
        })  # fmt: skip


def _form_field(request: httpx.Request, name: str) -> str:
    body = request.read().decode("latin-1")
    marker = f'name="{name}"\r\n\r\n'
    return body.split(marker, 1)[1].split("\r\n--", 1)[0]


def target(tmp_path, api: FakeApi) -> load.Target:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(MP4)
    return load.Target("http://fake", clip, None, None, transport=httpx.MockTransport(api))


def options(*extra: str):
    return load.parse_args(["--jobs", "4", "--clients", "2", "--poll", "0.05",
                            "--phase-seconds", "20", "--drain-seconds", "20", *extra])  # fmt: skip


def test_closed_loop_retries_503s_and_loses_nothing(tmp_path):
    api = FakeApi(capacity=1)
    phase = asyncio.run(load.closed_loop(target(tmp_path, api), options(), load.Seeds(0, 0.0)))
    stats = load.phase_stats(phase)
    assert stats["jobs"] == stats["accepted"] == stats["done"] == 4
    assert stats["rejected_503"] > 0 and 0 < stats["rate_503"] < 1
    assert stats["lost"] == [] and stats["results_not_downloadable"] == []
    assert stats["batch_sizes"]["chunks_by_batch_size"] == {"1": 4, "2": 4}
    assert stats["batch_sizes"]["batches_estimated"] == 6.0  # 4 alone + 4 chunks in pairs
    assert stats["batch_sizes"]["mean_batch_size"] == pytest.approx(8 / 6, abs=0.01)
    assert stats["latency_s"]["server_job"]["p50"] == 3.0
    assert stats["stage_wall_s_per_call"]["diffusion"]["n"] == 8
    assert stats["output_frames_per_job"] == 50
    assert len({job[-1]["seed"] for job in phase["jobs"]}) == 4  # new seeds: no cache hits


def test_open_loop_reports_a_job_that_failed_without_an_error_as_lost(tmp_path):
    seeds = load.Seeds(0, 0.0)
    first = seeds.next_seed + 1
    api = FakeApi(capacity=10, fail_silently=frozenset({first}))
    args = options("--rate", "600")
    phase = asyncio.run(load.open_loop(target(tmp_path, api), args, seeds))
    stats = load.phase_stats(phase)
    assert stats["accepted"] == 4 and stats["done"] == 3
    assert len(stats["lost"]) == 1 and stats["failed_with_error"] == 0


def test_job_outcomes():
    assert not load.lost({"state": "done"})
    assert not load.lost({"state": "failed", "error": {"code": "x", "message": "y"}})
    assert load.lost({"state": "failed", "error": None})
    assert load.lost({"state": "running"})  # still running at the deadline
    assert load.lost({"state": "missing"})


def test_repeats_reuse_seeds_of_finished_jobs_at_their_share():
    seeds = load.Seeds(1, 0.25)
    picks = []
    for _ in range(40):
        seed = seeds.pick()
        picks.append(seed)
        seeds.finished([{"seed": seed, "final": "done"}])
    assert len(picks) - len(set(picks)) == 10  # every 4th pick repeats a finished job
    assert picks[3] in picks[:3] and picks[4] not in picks[:4]


def test_poisson_arrivals_and_percentiles():
    arrivals = load.poisson_arrivals(2000, 60.0, seed=3)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(gap > 0 for gap in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(1.0, rel=0.1)  # 60 per minute
    stats = load.percentiles([float(v) for v in range(1, 101)])
    assert stats["n"] == 100 and stats["p50"] == pytest.approx(50.5)
    assert stats["p99"] == pytest.approx(99.01) and stats["max"] == 100
    assert load.percentiles([])["p50"] is None


def test_prometheus_batch_histogram_delta():
    def text(count: float, total: float, ones: float) -> str:
        return "\n".join([
            "# TYPE ray_motionserve_batch_size histogram",
            f'ray_motionserve_batch_size_bucket{{le="1.0",replica="a"}} {ones}',
            f'ray_motionserve_batch_size_bucket{{le="+Inf",replica="a"}} {count}',
            f'ray_motionserve_batch_size_count{{replica="a"}} {count}',
            f'ray_motionserve_batch_size_sum{{replica="a"}} {total}',
            "ray_motionserve_jobs_total 3",
        ])  # fmt: skip

    before = load.parse_batch_histogram(text(2, 3, 1))
    after = load.parse_batch_histogram(text(6, 13, 2))
    delta = load.metric_delta(before, after)
    assert delta["batches"] == 4 and delta["mean_batch_size_from_sum"] == 2.5
    assert delta["cumulative_buckets"] == {"1.0": 1.0, "+Inf": 4.0}
    assert delta["batches_by_size_bucket"] == {"1.0": 1.0, "+Inf": 3.0}
    assert load.metric_delta(None, after) == {"available": False}
