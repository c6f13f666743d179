"""Admission on one ingress replica: a slot is reserved before any awaited work, so no burst of
submissions gets more jobs in flight than `max_active_jobs`, and every way out frees it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from deployments.errors import NotAVideoError
from serve.jobs import JobService, JobStore, Overloaded
from serve.leases import JobLeases
from serve.schemas import JobRequest, JobState
from serve.storage import LocalStore

LIMIT = 8


class GatedProbe:
    """A slow probe: each call blocks (in its worker thread) until the gate opens; counts
    the calls in progress and their peak."""

    def __init__(self, fail_for: set[bytes] = frozenset()):
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.running = self.peak = self.calls = 0
        self.fail_for = fail_for

    def __call__(self, path, digest):
        with self.lock:
            self.calls += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            assert self.gate.wait(30), "the test never opened the probe gate"
            if path.read_bytes() in self.fail_for:
                raise NotAVideoError("not a video")
            return {"duration_s": 1.0}
        finally:
            with self.lock:
                self.running -= 1


class CountingOrchestrator:
    """Runs every job until released; keeps the peak of jobs running at once."""

    def __init__(self):
        self.release = asyncio.Event()
        self.running = self.peak = 0

    async def ready(self) -> bool:
        return True

    async def run(self, manifest, events):
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return f"jobs/{manifest.tenant}/{manifest.job_id}/result.mp4", {}


def service_with(tmp_path, probe, orchestrator, limit: int = LIMIT) -> JobService:
    store = LocalStore(tmp_path / "store")
    return JobService(
        JobStore(store),
        orchestrator,
        limits=None,
        allowed_input_buckets=[],
        max_active_jobs=limit,
        retry_after_s=7,
        probe=probe,
        plan_for=lambda request, info, reference=False: {"preset": "draft"},
        estimate=lambda *args: {},
        fetch_s3=lambda uri, dest: None,
        leases=JobLeases(store, "replica", lease_s=30),
    )


async def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def upload(tmp_path, index: int, content: bytes | None = None):
    path = tmp_path / f"input-{index}.mp4"
    path.write_bytes(content if content is not None else f"video {index}".encode())
    return path


@pytest.mark.parametrize("submissions", [12, 50, 100])
def test_concurrent_submissions_never_exceed_the_limit(tmp_path, submissions):
    async def scenario():
        probe, runner = GatedProbe(), CountingOrchestrator()
        service = service_with(tmp_path, probe, runner)
        peak_active = 0

        def watch():
            nonlocal peak_active
            peak_active = max(peak_active, service.active)
            return True

        files = [upload(tmp_path, i) for i in range(submissions)]
        tasks = [
            asyncio.create_task(service.submit_file("acme", JobRequest(prompt="x"), f))
            for f in files
        ]
        # Every submission beyond the limit is refused while the first ones are still probing.
        await wait_for(lambda: watch() and sum(t.done() for t in tasks) >= submissions - LIMIT)
        probe.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        watch()
        await wait_for(lambda: watch() and runner.running == LIMIT)
        runner.release.set()
        await wait_for(lambda: watch() and service.active == 0)
        return service, probe, runner, outcomes, peak_active

    service, probe, runner, outcomes, peak_active = asyncio.run(scenario())
    accepted = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    assert len(accepted) == LIMIT and len(refused) == submissions - LIMIT, outcomes
    assert all(r.retry_after_s == 7 for r in refused)
    assert probe.calls == LIMIT  # refused uploads were never hashed nor probed
    assert peak_active <= LIMIT and runner.peak == LIMIT
    assert service.active == 0
    states = {service.jobs.get("acme", m.job_id).state for m in accepted}
    assert states == {JobState.DONE}


def test_a_failed_probe_and_a_vanished_client_give_their_slots_back(tmp_path):
    async def scenario():
        probe, runner = GatedProbe(fail_for={b"garbage"}), CountingOrchestrator()
        service = service_with(tmp_path, probe, runner, limit=2)
        bad = asyncio.create_task(
            service.submit_file("acme", JobRequest(prompt="x"), upload(tmp_path, 0, b"garbage"))
        )
        gone = asyncio.create_task(
            service.submit_file("acme", JobRequest(prompt="x"), upload(tmp_path, 1))
        )
        await wait_for(lambda: probe.calls == 2)
        with pytest.raises(Overloaded):  # both slots are held while they probe
            service.check_capacity()
        gone.cancel()  # the client disconnected: its handler is cancelled mid-probe
        await asyncio.gather(gone, return_exceptions=True)
        assert service.active == 1
        probe.gate.set()
        with pytest.raises(NotAVideoError):
            await bad
        assert service.active == 0
        # Both slots are free again: two more submissions run.
        jobs = await asyncio.gather(
            *(service.submit_file("acme", JobRequest(prompt="x"), upload(tmp_path, i))
              for i in (2, 3))
        )  # fmt: skip
        await wait_for(lambda: runner.running == 2)
        cancelled = await service.cancel(jobs[0])
        assert cancelled.state == JobState.CANCELLED and service.active == 1
        handed = await service.hand_back()
        return service, handed, jobs

    service, handed, jobs = asyncio.run(scenario())
    assert handed == [jobs[1].job_id]
    assert service.active == 0


def test_a_crashing_job_frees_its_slot(tmp_path):
    class Crashing(CountingOrchestrator):
        async def run(self, manifest, events):
            raise RuntimeError("a bug")

    async def scenario():
        probe = GatedProbe()
        probe.gate.set()
        service = service_with(tmp_path, probe, Crashing(), limit=1)
        job = await service.submit_file("acme", JobRequest(prompt="x"), upload(tmp_path, 0))
        await wait_for(lambda: service.active == 0)
        again = await service.submit_file("acme", JobRequest(prompt="x"), upload(tmp_path, 1))
        await wait_for(lambda: service.active == 0)
        return service.jobs.get("acme", job.job_id), service.jobs.get("acme", again.job_id)

    first, second = asyncio.run(scenario())
    assert first.state == second.state == JobState.FAILED
    assert first.error.code == "internal_error"


def test_resume_adopts_only_as_many_orphans_as_there_are_free_slots(tmp_path):
    async def scenario():
        probe = GatedProbe()
        probe.gate.set()
        dead_runner = CountingOrchestrator()
        dead = service_with(tmp_path, probe, dead_runner, limit=3)
        orphans = [
            await dead.submit_file("acme", JobRequest(prompt="x"), upload(tmp_path, i))
            for i in range(3)
        ]
        await wait_for(lambda: dead_runner.running == 3)
        await dead.hand_back()  # the replica stops: its jobs are left to the others
        assert dead.active == 0

        runner = CountingOrchestrator()
        heir = service_with(tmp_path, probe, runner, limit=2)
        adopted = await heir.resume_unfinished()
        assert heir.active == 2 and await heir.resume_unfinished() == []
        runner.release.set()
        await wait_for(lambda: heir.active == 0)
        adopted += await heir.resume_unfinished()  # the one left behind, now a slot is free
        await wait_for(lambda: heir.active == 0)
        return sorted(adopted), sorted(o.job_id for o in orphans), heir

    adopted, orphans, heir = asyncio.run(scenario())
    assert adopted == orphans
    assert {heir.jobs.get("acme", j).state for j in orphans} == {JobState.DONE}


def test_previews_have_a_pool_of_their_own_and_never_take_a_jobs_slot(tmp_path):
    async def scenario():
        probe, runner = GatedProbe(), CountingOrchestrator()
        probe.gate.set()
        service = service_with(tmp_path, probe, runner, limit=1)
        service.max_active_previews = 2
        previews = [
            await service.submit_file("acme", JobRequest(prompt="x"), upload(tmp_path, i),
                                      kind="preview")
            for i in range(2)
        ]  # fmt: skip
        with pytest.raises(Overloaded):  # the preview pool is full ...
            await service.submit_file(
                "acme", JobRequest(prompt="x"), upload(tmp_path, 2), kind="preview"
            )
        # ... and a job still gets its slot; then the job pool is full, previews or not
        job = await service.submit_file("acme", JobRequest(prompt="x"), upload(tmp_path, 3))
        with pytest.raises(Overloaded):
            service.check_capacity("job")
        await wait_for(lambda: runner.running == 3)
        assert (service.active, service.active_of("preview")) == (1, 2)
        ready, detail = await service.readiness()
        assert detail["active_previews"] == 2 and detail["max_active_previews"] == 2
        await service.hand_back()  # a replica that stops hands previews back like jobs

        heir_runner = CountingOrchestrator()
        heir = service_with(tmp_path, probe, heir_runner, limit=1)
        heir.max_active_previews = 1
        adopted = await heir.resume_unfinished()  # one of each kind fits
        kinds = sorted(heir.jobs.get("acme", j).kind for j in adopted)
        heir_runner.release.set()
        await wait_for(lambda: heir.active == heir.active_of("preview") == 0)
        adopted += await heir.resume_unfinished()
        await wait_for(lambda: heir.active_of("preview") == 0)
        return kinds, sorted(adopted), sorted(m.job_id for m in [*previews, job]), heir

    kinds, adopted, submitted, heir = asyncio.run(scenario())
    assert kinds == ["job", "preview"]
    assert adopted == submitted
    assert {heir.jobs.get("acme", j).state for j in submitted} == {JobState.DONE}
