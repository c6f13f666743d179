"""The job lifecycle on one ingress replica: admission, state, leases, failures and resumes,
and the typed dependencies the service is built from."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from deployments.errors import InputError, InvalidSettingError
from serve.cache import hash_file
from serve.jobs.inputs import check_input_uri
from serve.jobs.manifest import JobError, JobManifest, new_job_id, now
from serve.jobs.store import JobStore
from serve.leases import JobLeases, new_owner_id
from serve.schemas import JobRequest, JobState, StageProgress

if TYPE_CHECKING:  # deployments.video loads PyAV; the service only passes these values along
    from deployments.video import InputLimits, VideoInfo
    from serve.events import JobEvents

logger = logging.getLogger(__name__)

# The service's dependencies, given by the app (serve/app.py) or by tests.
ProbeInput = Callable[[Path, str], "VideoInfo"]
"""(local input file, its sha256) -> the input's video info; raises InputError if unusable."""
PlanFor = Callable[[JobRequest, "VideoInfo", bool], dict[str, Any]]
"""(request, probed input, has a reference image) -> the job's plan as JSON
(serve/planning.plan_for)."""
EstimateCost = Callable[[JobRequest, float, int, int], dict[str, Any]]
"""(request, duration_s, width, height) -> the estimate of POST /v1/estimate."""
FetchInput = Callable[[str, Path], object]
"""(s3:// URI, local destination) -> anything (ignored); copies the input there."""


def check_preview_frames(request, plan: dict[str, Any]) -> None:
    """A preview's `frames: "anchor"` renders the job's anchor keyframe: a plan without anchor
    attention has none, so that is refused (422) before anything runs."""
    if request.frames == "anchor" and plan["generation"].get("anchor", "off") == "off":
        raise InvalidSettingError(
            "frames 'anchor' previews the job's anchor keyframe, and this plan has no anchor "
            'attention: add a reference image, or the override "anchor": "first_keyframe"'
        )


class JobRunner(Protocol):
    """Turns a manifest into a result and a cost report (serve/orchestrator.Orchestrator)."""

    async def ready(self) -> bool: ...

    async def run(self, manifest: JobManifest, events: JobEvents) -> tuple[str, dict[str, Any]]:
        """Returns (storage key of the result MP4, cost report)."""
        ...


class MetricCounter(Protocol):
    def inc(self) -> None: ...


class JobMetricsSink(Protocol):
    """What the service counts: serve/metrics.JobMetrics on Serve, `NoJobMetrics` elsewhere."""

    @property
    def rejected(self) -> MetricCounter: ...

    def state(self, state: str) -> None: ...

    def queue_depth(self, active: int) -> None: ...

    def finished(self, ledger: list[dict[str, Any]], report: dict[str, Any] | None) -> None: ...


class NoJobMetrics:
    """Metrics sink when none is configured (in-process use and unit tests)."""

    class _Counter:
        def inc(self, *args, **kwargs) -> None:
            pass

    rejected = _Counter()

    def state(self, state: str) -> None:
        pass

    def queue_depth(self, active: int) -> None:
        pass

    def finished(self, ledger: list[dict[str, Any]], report: dict[str, Any] | None) -> None:
        pass


class Overloaded(Exception):
    """Too many jobs in flight on this replica; the client should retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"busy; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class JobCancelled(Exception):
    pass


Kind = Literal["job", "preview"]
KINDS: tuple[Kind, ...] = ("job", "preview")


class JobService:
    """Accepts, runs, cancels and resumes jobs on one ingress replica.

    Motion previews (`kind="preview"`: CPU only, see Orchestrator.run_preview) go through the
    same lifecycle with a pool of slots of their own (`max_active_previews`), so previews never
    take a job's slot and a burst of them cannot starve jobs, nor jobs previews.

    The heavy lifting is the orchestrator's (`run(manifest, events) -> (result_key, report)`);
    this class owns the lifecycle: admission (bounded jobs in flight, 503 beyond), the manifest's
    state transitions, turning failures into a code and message for the user, and the job's
    lease (serve/leases.py): each run holds a claim on its attempt, renews it while running,
    and stops if another replica has taken the job over.
    """

    def __init__(
        self,
        jobs: JobStore,
        orchestrator: JobRunner,
        *,
        limits: InputLimits,
        allowed_input_buckets: list[str],
        max_active_jobs: int,
        max_active_previews: int = 2,
        retry_after_s: int = 5,
        probe: ProbeInput,
        plan_for: PlanFor,
        estimate: EstimateCost,
        fetch_s3: FetchInput,
        metrics: JobMetricsSink | None = None,
        leases: JobLeases | None = None,
    ):
        self.jobs = jobs
        self.orchestrator = orchestrator
        self.limits = limits
        self.allowed_input_buckets = allowed_input_buckets
        self.max_active_jobs = max_active_jobs
        self.max_active_previews = max_active_previews
        self.retry_after_s = retry_after_s
        self._probe, self._plan_for, self._estimate, self._fetch_s3 = (
            probe,
            plan_for,
            estimate,
            fetch_s3,
        )
        self._tasks: dict[str, asyncio.Task] = {}
        self._kinds: dict[str, Kind] = {}  # job id -> kind, of the tasks in `_tasks`
        # slots held by submissions still being checked, per kind (see _admission)
        self._reserved: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._claims: dict[str, tuple[str, int]] = {}  # job id -> (folder, attempt) held here
        self._lost: set[str] = set()  # jobs this replica stopped running (lease taken or given)
        self.metrics: JobMetricsSink = metrics or NoJobMetrics()
        self.leases = leases or JobLeases(jobs.store, new_owner_id())

    # ----------------------------------------------------------------------- admission

    @property
    def active(self) -> int:
        """Jobs running here plus admissions under way (reserved, still hashing or probing)."""
        return self.active_of("job")

    def active_of(self, kind: Kind) -> int:
        """Jobs, or previews, running here plus their admissions under way."""
        running = sum(1 for job_id in self._tasks if self._kinds.get(job_id) == kind)
        return running + self._reserved[kind]

    def limit_of(self, kind: Kind) -> int:
        return self.max_active_jobs if kind == "job" else self.max_active_previews

    def check_capacity(self, kind: Kind = "job") -> None:
        """Refuse now (503) when no slot is free; reserves nothing (see `_admission`)."""
        if self.active_of(kind) >= self.limit_of(kind):
            self.metrics.rejected.inc()
            raise Overloaded(self.retry_after_s)

    @contextmanager
    def _admission(self, kind: Kind = "job") -> Iterator[None]:
        """Hold one slot while a submission is checked and stored.

        The check and the reservation happen together, before the first await, so two
        submissions on this event loop can never both see the last free slot. The slot is
        handed to the job's task by `_launch` (inside the block, with no await in between)
        and given back here on every other way out: a refusal, a probe failure, bad input,
        a store error, or the client going away (the handler's task is cancelled)."""
        self.check_capacity(kind)
        self._reserved[kind] += 1
        try:
            yield
        finally:
            self._reserved[kind] -= 1

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        ready = await self.orchestrator.ready()
        return ready, {
            "active_jobs": self.active,
            "max_active_jobs": self.max_active_jobs,
            "active_previews": self.active_of("preview"),
            "max_active_previews": self.max_active_previews,
        }

    async def submit_file(
        self,
        tenant: str,
        request: JobRequest,
        local: Path,
        kind: Kind = "job",
        reference: Path | None = None,
    ) -> JobManifest:
        """Validate an uploaded file (and reference image), store them, record the job (or
        preview) and start it. Nothing is stored before every check has passed."""
        with self._admission(kind):
            reference_sha = await self._check_reference(reference)
            digest = await asyncio.to_thread(hash_file, local)
            info = await asyncio.to_thread(self._probe, local, digest)
            plan = self._plan_for(request, info, reference_sha is not None)
            if kind == "preview":
                check_preview_frames(request, plan)
            job_id = new_job_id()
            input_key = self.jobs.input_key(tenant, job_id)
            reference_key = None
            if reference is not None:
                reference_key = self.jobs.reference_key(tenant, job_id)
                await asyncio.to_thread(self.jobs.store.put_file, reference_key, reference)
            await asyncio.to_thread(self.jobs.store.put_file, input_key, local)
            return self._start(
                tenant, job_id, request, input_key, digest, plan, kind,
                reference=(reference_key, reference_sha) if reference_key else None,
            )  # fmt: skip

    async def submit_s3(
        self,
        tenant: str,
        request: JobRequest,
        uri: str,
        kind: Kind = "job",
        reference_uri: str | None = None,
    ) -> JobManifest:
        check_input_uri(uri, self.allowed_input_buckets)
        if reference_uri is not None:
            check_input_uri(reference_uri, self.allowed_input_buckets)
        with self._admission(kind):
            with tempfile.TemporaryDirectory(prefix="motionserve-s3-") as scratch:
                reference_sha = None
                if reference_uri is not None:
                    reference = Path(scratch) / "reference"
                    await asyncio.to_thread(self._fetch_s3, reference_uri, reference)
                    reference_sha = await self._check_reference(reference)
                local = Path(scratch) / "input"
                await asyncio.to_thread(self._fetch_s3, uri, local)
                digest = await asyncio.to_thread(hash_file, local)
                info = await asyncio.to_thread(self._probe, local, digest)
            plan = self._plan_for(request, info, reference_sha is not None)
            if kind == "preview":
                check_preview_frames(request, plan)
            return self._start(
                tenant, new_job_id(), request, uri, digest, plan, kind,
                reference=(reference_uri, reference_sha) if reference_sha else None,
            )  # fmt: skip

    async def _check_reference(self, reference: Path | None) -> str | None:
        """The reference image's sha256 once it passed `check_reference` (None: no image)."""
        if reference is None:
            return None
        from deployments.reference import check_reference

        await asyncio.to_thread(check_reference, reference, self.limits)
        return await asyncio.to_thread(hash_file, reference)

    def _start(
        self,
        tenant: str,
        job_id: str,
        request: JobRequest,
        input_key: str,
        digest: str,
        plan: dict[str, Any],
        kind: Kind = "job",
        reference: tuple[str, str] | None = None,
    ) -> JobManifest:
        """`reference`: (storage key or s3:// URI, sha256) of the job's reference image."""
        manifest = JobManifest(
            job_id=job_id,
            tenant=tenant,
            kind=kind,
            request=request,
            input_key=input_key,
            input_sha256=digest,
            reference_key=reference[0] if reference else None,
            reference_sha256=reference[1] if reference else None,
            plan=plan,
        )
        if not self.leases.claim(self._folder(manifest), 1):  # a fresh random id: never taken
            raise RuntimeError(f"job {job_id} was claimed before it was created")
        self.jobs.mark_active(manifest)
        self.jobs.save(manifest)
        self.metrics.state(JobState.QUEUED)
        self._launch(manifest, attempt=1)
        return manifest

    async def resume_unfinished(self) -> list[str]:
        """Adopt unfinished jobs whose lease has lapsed (their replica died, or the whole app
        restarted) and run them again from their checkpoints, as many as this replica has free
        slots for: the rest wait for the next scan (or another replica). Called at start-up and
        then periodically by each ingress replica; a job with a live lease is left to its owner."""
        free = {kind: self.limit_of(kind) - self.active_of(kind) for kind in KINDS}
        if all(slots <= 0 for slots in free.values()):
            return []
        adopted = await asyncio.to_thread(self._claim_orphans, free)
        # Submissions may have taken slots during the scan: launch what still fits and hand
        # the rest back at once (released, so the next scan here or elsewhere adopts them).
        launched = []
        for manifest, attempt in adopted:
            if self.active_of(manifest.kind) < self.limit_of(manifest.kind):
                self._launch(manifest, attempt)
                launched.append(manifest.job_id)
            else:
                await asyncio.to_thread(self.leases.release, self._folder(manifest), attempt)
        return launched

    def _claim_orphans(self, free: dict[Kind, int]) -> list[tuple[JobManifest, int]]:
        """Claim up to `free[kind]` orphans of each kind."""
        free = dict(free)
        adopted: list[tuple[JobManifest, int]] = []
        for manifest in self.jobs.unfinished():
            if all(slots <= 0 for slots in free.values()):
                break
            if free[manifest.kind] <= 0 or manifest.job_id in self._tasks:
                continue
            attempt = self.leases.claim_orphan(self._folder(manifest))
            if attempt is None:
                continue
            manifest = self.jobs.get(manifest.tenant, manifest.job_id)  # as of the claim
            if manifest.terminal:  # finished between the scan and the claim
                continue
            if manifest.state == JobState.RUNNING:
                manifest = manifest.transition(JobState.QUEUED)
                self.jobs.save(manifest)
            adopted.append((manifest, attempt))
            free[manifest.kind] -= 1
        return adopted

    def _folder(self, manifest: JobManifest) -> str:
        return self.jobs.folder(manifest.tenant, manifest.job_id)

    # ------------------------------------------------------------------------ queries

    async def get(self, tenant: str, job_id: str) -> JobManifest:
        return await asyncio.to_thread(self.jobs.get, tenant, job_id)

    async def open_result(self, manifest: JobManifest):
        return await asyncio.to_thread(self.jobs.store.open_read, manifest.result_key)

    def estimate(self, request: JobRequest, duration_s: float, width: int, height: int) -> dict:
        return self._estimate(request, duration_s, width, height)

    async def cancel(self, manifest: JobManifest) -> JobManifest:
        if manifest.terminal:
            return manifest
        self.jobs.request_cancel(manifest.tenant, manifest.job_id)
        task = self._tasks.get(manifest.job_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:
            # Running on another replica: its runner sees the mark between chunks.
            manifest = self.jobs.get(manifest.tenant, manifest.job_id)
            if manifest.state == JobState.QUEUED:
                self._finish(manifest, JobState.CANCELLED)
        return self.jobs.get(manifest.tenant, manifest.job_id)

    # ------------------------------------------------------------------------ running

    def _launch(self, manifest: JobManifest, attempt: int) -> None:
        # A fresh context: a task inherits the request's (Serve's request context), and Serve
        # cancels a request's pending child calls when its client disconnects. A job runs
        # without a client; only `cancel` (DELETE) stops it.
        task = asyncio.get_running_loop().create_task(
            self._run(manifest, attempt), context=contextvars.Context()
        )
        self._tasks[manifest.job_id] = task
        self._kinds[manifest.job_id] = manifest.kind
        self._claims[manifest.job_id] = (self._folder(manifest), attempt)
        self.metrics.queue_depth(self.active)
        task.add_done_callback(lambda _: self._forget(manifest.job_id))

    def _forget(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._kinds.pop(job_id, None)
        self._claims.pop(job_id, None)
        self.metrics.queue_depth(self.active)

    async def _run(self, manifest: JobManifest, attempt: int) -> None:
        manifest = manifest.transition(JobState.RUNNING, attempts=attempt)
        self.jobs.save(manifest)
        self.metrics.state(JobState.RUNNING)
        events = ManifestEvents(self.jobs, manifest)
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(manifest, attempt))
        try:
            result_key, report = await self.orchestrator.run(events.manifest, events)
        except (asyncio.CancelledError, JobCancelled):
            if manifest.job_id in self._lost:
                # Another replica owns (or will own) the job: leave its manifest and input.
                logger.warning("job %s: stopped here; another replica resumes it", manifest.job_id)
                self._lost.discard(manifest.job_id)
                return
            self._finish(events.manifest, JobState.CANCELLED)
        except InputError as exc:
            self._finish(events.manifest, JobState.FAILED, error=JobError(**_error_of(exc)))
        except Exception as exc:  # a bug or an infrastructure failure: keep serving other jobs
            logger.exception("job %s failed", manifest.job_id)
            error = JobError(
                code="internal_error", message=f"processing failed ({type(exc).__name__})"
            )
            self._finish(events.manifest, JobState.FAILED, error=error)
        else:
            self._finish(events.manifest, JobState.DONE, result_key=result_key, report=report)
        finally:
            keeper.cancel()

    async def hand_back(self) -> list[str]:
        """Stop every job this replica runs without ending it and release its lease, so
        another replica resumes it from its checkpoints at its next scan (this replica is
        shutting down: a downscale or a new version). Returns the job ids handed back."""
        claims = dict(self._claims)
        tasks = list(self._tasks.values())
        self._lost.update(claims)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for folder, attempt in claims.values():
            await asyncio.to_thread(self.leases.release, folder, attempt)
        return list(claims)

    async def _keep_lease(self, manifest: JobManifest, attempt: int) -> None:
        """Renew the run's claim; if another replica took the job over, stop the run."""
        folder = self._folder(manifest)
        while True:
            await asyncio.sleep(self.leases.renew_every_s)
            try:
                kept = await asyncio.to_thread(self.leases.renew, folder, attempt)
            except Exception:  # a store hiccup: try again next period, the lease has slack
                logger.warning("job %s: lease renewal failed", manifest.job_id, exc_info=True)
                continue
            if not kept:
                self._lost.add(manifest.job_id)
                task = self._tasks.get(manifest.job_id)
                if task is not None:
                    task.cancel()
                return

    def _finish(self, manifest: JobManifest, state: JobState, **updates: Any) -> None:
        latest = self.jobs.get(manifest.tenant, manifest.job_id)
        if latest.terminal:
            return
        merged = manifest.model_copy(update={"state": latest.state})
        final = merged.transition(state, **updates)
        self.jobs.save(final)
        self.jobs.unmark_active(final)
        try:
            self.metrics.state(state)
            self.metrics.finished(final.ledger, final.report)
        except Exception:  # metrics must never fail a job that is already recorded
            logger.exception("metrics for job %s", manifest.job_id)
        if state != JobState.DONE:
            self.jobs.delete_work(manifest.tenant, manifest.job_id)


def _record_dict(record: Any, attempt: int) -> dict[str, Any]:
    data = record.model_dump() if hasattr(record, "model_dump") else dict(record)
    return {**data, "attempt": data.get("attempt") or attempt}


def _error_of(exc: InputError) -> dict[str, str]:
    return {"code": exc.code, "message": exc.message}


class ManifestEvents:
    """The orchestrator's window on the manifest: progress, checkpoints and the cancel mark."""

    def __init__(self, jobs: JobStore, manifest: JobManifest):
        self.jobs = jobs
        self.manifest = manifest

    def progress(self, stage: str, done: int, total: int) -> None:
        progress = dict(self.manifest.progress)
        progress[stage] = StageProgress(done=done, total=total)
        self._update(progress=progress)

    def record(self, records: list, chunk: int | None = None, key: str | None = None) -> None:
        """Add cost records to the ledger; with `chunk`, also checkpoint that chunk's segment."""
        attempt = self.manifest.attempts
        fields: dict[str, Any] = {
            "ledger": self.manifest.ledger + [_record_dict(r, attempt) for r in records]
        }
        if chunk is not None:
            fields["checkpoints"] = {**self.manifest.checkpoints, str(chunk): key}
        self._update(**fields)

    def check_cancelled(self) -> None:
        if self.jobs.cancel_requested(self.manifest.tenant, self.manifest.job_id):
            raise JobCancelled(self.manifest.job_id)

    def _update(self, **fields: Any) -> None:
        self.manifest = self.manifest.model_copy(update={**fields, "updated_at": now()})
        self.jobs.save(self.manifest)
