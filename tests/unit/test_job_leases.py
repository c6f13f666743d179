"""Job leases (serve/leases.py) and how JobService uses them across ingress replicas."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve.api import create_api
from serve.auth import Authenticator
from serve.jobs import JobService, JobStore
from serve.leases import JobLeases
from serve.schemas import JobRequest, JobState
from serve.storage import LocalStore

FOLDER = "jobs/acme/" + "ab" * 16


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_live_claim_keeps_others_out_until_it_lapses(tmp_path):
    store, clock = LocalStore(tmp_path), Clock()
    first = JobLeases(store, "first", lease_s=30, clock=clock)
    second = JobLeases(store, "second", lease_s=30, clock=clock)
    assert first.latest(FOLDER) is None
    assert first.claim_orphan(FOLDER) == 1
    clock.now += 29
    assert second.claim_orphan(FOLDER) is None  # still live
    assert first.renew(FOLDER, 1)
    clock.now += 29
    assert second.claim_orphan(FOLDER) is None  # renewed 29 s ago
    clock.now += 2
    assert second.claim_orphan(FOLDER) == 2  # lapsed: the next attempt is second's
    assert first.renew(FOLDER, 1) is False  # first has lost the job and must stop
    assert second.renew(FOLDER, 2)
    latest = first.latest(FOLDER)
    assert (latest.attempt, latest.owner) == (2, "second")


def test_replicas_racing_for_a_lapsed_job_get_one_winner(tmp_path):
    store, clock = LocalStore(tmp_path), Clock()
    JobLeases(store, "dead", lease_s=10, clock=clock).claim(FOLDER, 1)
    clock.now += 11
    racers = [JobLeases(store, f"r{i}", lease_s=10, clock=clock) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(lambda leases: leases.claim_orphan(FOLDER), racers))
    assert sorted(outcomes, key=str) == [2] + [None] * 5


def test_lease_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        JobLeases(LocalStore(tmp_path), "x", lease_s=0)


# --- JobService on two "replicas" sharing one store ---------------------------------------------


class HeldOrchestrator:
    """Runs a job until released; records which attempts ran and which were stopped."""

    def __init__(self):
        self.release = asyncio.Event()
        self.started: list[int] = []
        self.stopped: list[int] = []

    async def ready(self) -> bool:
        return True

    async def run(self, manifest, events):
        self.started.append(manifest.attempts)
        try:
            while not self.release.is_set():  # a chunk boundary every 10 ms
                await asyncio.to_thread(events.check_cancelled)
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.stopped.append(manifest.attempts)
            raise
        result_key = f"jobs/{manifest.tenant}/{manifest.job_id}/result.mp4"
        return result_key, {"attempt": manifest.attempts}


def replica(store, orchestrator, leases) -> JobService:
    return JobService(
        JobStore(store),
        orchestrator,
        limits=None,
        allowed_input_buckets=[],
        max_active_jobs=4,
        probe=lambda path, digest: {"duration_s": 1.0},
        plan_for=lambda request, info, reference=False: {"preset": "draft"},
        estimate=lambda *args: {},
        fetch_s3=lambda uri, dest: None,
        leases=leases,
    )


async def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def submit(service, tmp_path):
    video = tmp_path / "input.mp4"
    video.write_bytes(b"not decoded by the held orchestrator")
    return await service.submit_file("local", JobRequest(prompt="a robot"), video)


def test_a_running_job_is_not_taken_over_and_a_dead_replicas_job_is(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "store")
        a_run, b_run = HeldOrchestrator(), HeldOrchestrator()
        a = replica(store, a_run, JobLeases(store, "a", lease_s=0.6))
        b = replica(store, b_run, JobLeases(store, "b", lease_s=0.6))
        job = await submit(a, tmp_path)
        await wait_for(lambda: a_run.started == [1])
        for _ in range(3):  # over a whole lease: a renews, so b never adopts the job
            assert await b.resume_unfinished() == []
            await asyncio.sleep(0.3)
        assert b_run.started == []

        # a dies: its run stops without a word to the store (the manifest says running)
        a._lost.add(job.job_id)
        a._tasks[job.job_id].cancel()
        await wait_for(lambda: not a._tasks)
        assert a.jobs.get("local", job.job_id).state == JobState.RUNNING
        adopted = []
        while not adopted:  # polled: adopted once a's lease lapses
            adopted = await b.resume_unfinished()
            await asyncio.sleep(0.05)
        assert adopted == [job.job_id]
        await wait_for(lambda: b_run.started == [2])
        b_run.release.set()
        await wait_for(lambda: not b._tasks)
        return b.jobs.get("local", job.job_id)

    final = asyncio.run(scenario())
    assert final.state == JobState.DONE and final.attempts == 2
    assert final.report == {"attempt": 2}


class ListCounter(LocalStore):
    """A LocalStore that counts the keys its listings return (what a scan costs on S3)."""

    listed = 0

    def list(self, prefix=""):
        for key in super().list(prefix):
            ListCounter.listed += 1
            yield key


def test_the_orphan_scan_lists_only_jobs_in_flight(tmp_path):
    async def scenario():
        store = ListCounter(tmp_path / "store")
        held = HeldOrchestrator()
        service = replica(store, held, JobLeases(store, "a", lease_s=30))
        held.release.set()
        for _ in range(3):  # a history of finished jobs: inputs, manifests, claims
            await submit(service, tmp_path)
            await wait_for(lambda: not service._tasks)
        ListCounter.listed = 0
        assert service.jobs.unfinished() == []
        history_listed = ListCounter.listed
        held.release.clear()
        running = await submit(service, tmp_path)
        await wait_for(lambda: held.started)
        ListCounter.listed = 0
        in_flight = [m.job_id for m in service.jobs.unfinished()]
        held.release.set()
        await wait_for(lambda: not service._tasks)
        return history_listed, in_flight, running.job_id, ListCounter.listed

    history_listed, in_flight, running_id, listed = asyncio.run(scenario())
    assert history_listed == 0  # finished jobs leave no active marker
    assert in_flight == [running_id] and listed == 1


def test_a_marker_left_by_a_finished_job_is_cleaned_up(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "store")
        held = HeldOrchestrator()
        held.release.set()
        service = replica(store, held, JobLeases(store, "a", lease_s=30))
        job = await submit(service, tmp_path)
        await wait_for(lambda: not service._tasks)
        service.jobs.mark_active(job)  # as if the replica died between save and unmark
        return service.jobs.unfinished(), list(store.list("jobs/_active/"))

    unfinished, markers = asyncio.run(scenario())
    assert unfinished == [] and markers == []


def test_a_stalled_owner_that_lost_its_lease_stops_and_writes_nothing(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "store")
        a_run, b_run = HeldOrchestrator(), HeldOrchestrator()
        a = replica(store, a_run, JobLeases(store, "a", lease_s=0.6))
        # b's clock runs a minute ahead: to b, a's fresh claim looks lapsed (as after a stall)
        ahead = JobLeases(store, "b", lease_s=0.6, clock=lambda: time.time() + 60)
        b = replica(store, b_run, ahead)
        job = await submit(a, tmp_path)
        await wait_for(lambda: a_run.started == [1])
        assert await b.resume_unfinished() == [job.job_id]
        await wait_for(lambda: a_run.stopped == [1])  # a's next renewal finds claim 2
        await wait_for(lambda: not a._tasks)
        assert a.jobs.get("local", job.job_id).state == JobState.RUNNING  # a wrote no ending
        b_run.release.set()
        await wait_for(lambda: not b._tasks)
        return b.jobs.get("local", job.job_id), store

    final, store = asyncio.run(scenario())
    assert final.state == JobState.DONE and final.attempts == 2
    assert store.exists(JobStore(store).input_key("local", final.job_id))  # input kept


def test_cancel_through_a_replica_that_does_not_run_the_job(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "store")
        a_run = HeldOrchestrator()
        a = replica(store, a_run, JobLeases(store, "a", lease_s=30))
        b = replica(store, HeldOrchestrator(), JobLeases(store, "b", lease_s=30))
        job = await submit(a, tmp_path)
        await wait_for(lambda: a_run.started == [1])
        api = create_api(b, Authenticator([]))
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
            asked = await client.delete(f"/v1/jobs/{job.job_id}")
            await wait_for(lambda: not a._tasks)  # a stops the job at its next chunk
            after = (await client.get(f"/v1/jobs/{job.job_id}")).json()
        return asked, after

    asked, after = asyncio.run(scenario())
    assert asked.status_code == 202, asked.text
    assert asked.json()["state"] == "running" and asked.json()["cancel_requested"] is True
    assert after["state"] == "cancelled" and after["cancel_requested"] is False


def test_a_replica_shutting_down_hands_its_jobs_over_at_once(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "store")
        a_run, b_run = HeldOrchestrator(), HeldOrchestrator()
        a = replica(store, a_run, JobLeases(store, "a", lease_s=30))
        b = replica(store, b_run, JobLeases(store, "b", lease_s=30))
        job = await submit(a, tmp_path)
        await wait_for(lambda: a_run.started == [1])
        assert await b.resume_unfinished() == []  # a's lease has 30 s to run
        assert await a.hand_back() == [job.job_id]
        assert a_run.stopped == [1] and not a._tasks
        assert a.jobs.get("local", job.job_id).state == JobState.RUNNING  # not ended, handed
        adopted = await b.resume_unfinished()  # at b's next scan, not after 30 s
        b_run.release.set()
        await wait_for(lambda: not b._tasks)
        return adopted, b.jobs.get("local", job.job_id)

    adopted, final = asyncio.run(scenario())
    assert adopted == [final.job_id]
    assert final.state == JobState.DONE and final.attempts == 2
