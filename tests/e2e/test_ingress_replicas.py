"""Two ingress replicas on one job store: a job runs once, and after a crash (the app and its
Ray killed at once, as a lost node) exactly one replica adopts it (job leases, serve/leases.py)
and resumes it without recomputing its checkpointed chunks."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.e2e.conftest import assert_resumed_without_recomputing, make_server
from tests.e2e.test_http_jobs import TERMINAL, submit, wait


@pytest.fixture(scope="module")
def two_ingress(moto_s3, tmp_path_factory):
    instance = make_server(moto_s3, tmp_path_factory.mktemp("two-ingress"), ingress_replicas=2)
    instance.start()
    yield instance
    instance.kill()


def diffusion_runs(status: dict) -> Counter:
    """(attempt, chunk) -> how many times that chunk's diffusion ran (cache hits excluded)."""
    return Counter(
        (r["attempt"], r["chunk"])
        for r in status["ledger"]
        if r["stage"] == "diffusion" and not r["cache_hit"]
    )


def test_jobs_run_once_while_both_replicas_scan_for_orphans(two_ingress, short_clip):
    with two_ingress.client() as client:
        # Long enough for several orphan scans by both replicas (every job_lease_s / 2 = 1.5 s).
        ids = [submit(client, short_clip, seed=300 + i, chunk_frames=2).json()["job_id"]
               for i in range(2)]  # fmt: skip
        finished = [wait(client, job_id) for job_id in ids]
    for status in finished:
        assert status["state"] == "done" and status["attempts"] == 1, status["error"]
        runs = diffusion_runs(status)
        assert runs and set(runs.values()) == {1}, runs
        assert {attempt for attempt, _ in runs} == {1}


def test_after_a_crash_one_replica_resumes_the_job_once(two_ingress, short_clip):
    with two_ingress.client() as client:
        job_id = submit(client, short_clip, seed=377, chunk_frames=2, steps=6).json()["job_id"]
        before = wait(client, job_id, until=lambda s: len(s["checkpointed_chunks"]) >= 2
                      or s["state"] in TERMINAL)  # fmt: skip
    assert before["state"] == "running", "the job finished before it could be interrupted"
    two_ingress.kill()
    two_ingress.start()  # both new replicas find the job with a lapsed lease and race for it
    # attempts == 2: one replica won attempt 2 and kept it (a takeover would make it 3)
    with two_ingress.client() as client:
        status = wait(client, job_id)
    assert_resumed_without_recomputing(before, status)
    runs = diffusion_runs(status)
    assert set(runs.values()) == {1}, f"a chunk ran twice: {runs}"
    assert {attempt for attempt, _ in runs} <= {1, 2}
