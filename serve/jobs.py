"""Jobs: the request, the state machine and the durable manifest.

A job's manifest lives in the object store under ``jobs/<tenant>/<job_id>/``, so any ingress
replica, or the same app after a restart, can report on it and resume it. Looking a job up always
goes through its tenant's prefix: another tenant's job id is simply not found.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

from deployments.errors import InputError, InvalidSettingError
from deployments.motion import parse_styles
from serve.cache import hash_file
from serve.leases import JobLeases, new_owner_id
from serve.storage import ObjectNotFound, ObjectStore, parse_s3_uri

logger = logging.getLogger(__name__)

_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    # running -> queued: its replica died mid-job; another (or the restarted app) resumes it.
    JobState.RUNNING: frozenset(
        {JobState.QUEUED, JobState.DONE, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


class JobNotFound(KeyError):
    pass


class OutputSpec(BaseModel):
    """What the user gets back; None fields come from the preset."""

    model_config = {"extra": "forbid"}

    fps: float | None = Field(default=None, gt=0, le=60, description="Output frame rate.")
    width: int | None = Field(default=None, ge=64, le=3840, description="Output width.")
    height: int | None = Field(default=None, ge=64, le=2160, description="Output height.")
    keep_audio: bool = Field(
        default=True, description="Carry the source's audio over (when timing is unchanged)."
    )


class JobRequest(BaseModel):
    """A user's edit request (the JSON part of POST /v1/jobs)."""

    model_config = {"extra": "forbid"}

    prompt: str = Field(min_length=1, max_length=1000, description="What the person looks like.")
    negative_prompt: str = Field(default="", max_length=1000, description="What to avoid.")
    styles: list[str] = Field(
        default_factory=lambda: ["smooth"],
        max_length=16,
        description="Motion styles applied in order, e.g. ['smooth', 'exaggerate=1.3'].",
    )
    preset: str | None = Field(
        default=None, description="draft, standard or high; None uses the app's default."
    )
    seed: int | None = Field(
        default=None, ge=0, lt=2**32, description="Noise seed; None picks one (recorded)."
    )
    output: OutputSpec = Field(default_factory=OutputSpec, description="Output size and rate.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Plan fields to override (see POST /v1/estimate)."
    )

    @field_validator("styles")
    @classmethod
    def _styles_parse(cls, styles: list[str]) -> list[str]:
        parse_styles(styles)  # raises InvalidSettingError listing the valid styles
        return styles


class StageProgress(BaseModel):
    done: int = Field(default=0, ge=0, description="Units (chunks or frames) finished.")
    total: int = Field(default=0, ge=0, description="Units planned; 0 while unknown.")


class JobError(BaseModel):
    code: str = Field(description="Machine-readable error code.")
    message: str = Field(description="What went wrong, for the user.")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class JobManifest(BaseModel):
    """Everything known about a job; the single source of truth, kept in the object store."""

    job_id: str = Field(description="32 hex characters.")
    tenant: str = Field(description="Owner of the job.")
    state: JobState = Field(default=JobState.QUEUED, description="Where the job is.")
    created_at: str = Field(default_factory=_now, description="UTC, ISO 8601.")
    updated_at: str = Field(default_factory=_now, description="UTC, ISO 8601.")
    request: JobRequest = Field(description="The request as accepted.")
    input_key: str = Field(description="Storage key (or s3:// URI) of the input video.")
    input_sha256: str = Field(default="", description="Content hash of the input video.")
    plan: dict[str, Any] | None = Field(default=None, description="The resolved plan.")
    progress: dict[str, StageProgress] = Field(
        default_factory=dict, description="Per stage: units done of total."
    )
    checkpoints: dict[str, str] = Field(
        default_factory=dict,
        description="Chunk index -> content key of its finished output; a resumed job skips "
        "these chunks.",
    )
    attempts: int = Field(
        default=0,
        ge=0,
        description="Number of the latest attempt (1 = first run; each resume claims the next, "
        "so a number skips when a replica died between its claim and its start).",
    )
    ledger: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Cost records of finished work (stage records of checkpointed chunks), kept "
        "across restarts so the report also counts what earlier attempts spent.",
    )
    result_key: str | None = Field(default=None, description="Storage key of the result MP4.")
    report: dict[str, Any] | None = Field(default=None, description="Cost report when done.")
    error: JobError | None = Field(default=None, description="Why the job failed.")

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def transition(self, new_state: JobState, **updates: Any) -> JobManifest:
        """A copy in `new_state`; raises InvalidTransition for a move the state machine forbids."""
        if new_state not in _TRANSITIONS[self.state]:
            raise InvalidTransition(f"job {self.job_id}: {self.state} -> {new_state} not allowed")
        return self.model_copy(update={"state": new_state, "updated_at": _now(), **updates})


def new_job_id() -> str:
    return secrets.token_hex(16)


def validate_tenant(tenant: str) -> str:
    if not _TENANT.match(tenant):
        raise ValueError(f"invalid tenant name {tenant!r}")
    return tenant


class JobStore:
    """Manifests, inputs and results of jobs in an object store, partitioned by tenant.

    Unfinished jobs also have an empty marker under `<prefix>/_active/` (no tenant name starts
    with `_`), so the ingress replicas' periodic scan for orphaned jobs lists only the jobs in
    flight, not every object of every job ever run (a LIST per 1000 keys, every few seconds,
    per replica, would grow without bound with the history)."""

    def __init__(self, store: ObjectStore, prefix: str = "jobs"):
        self.store = store
        self.prefix = prefix

    def folder(self, tenant: str, job_id: str) -> str:
        validate_tenant(tenant)
        if not _JOB_ID.match(job_id):
            raise JobNotFound(job_id)  # malformed ids cannot exist; same answer as unknown ones
        return f"{self.prefix}/{tenant}/{job_id}"

    def manifest_key(self, tenant: str, job_id: str) -> str:
        return f"{self.folder(tenant, job_id)}/manifest.json"

    def input_key(self, tenant: str, job_id: str) -> str:
        return f"{self.folder(tenant, job_id)}/input"

    def result_key(self, tenant: str, job_id: str) -> str:
        return f"{self.folder(tenant, job_id)}/result.mp4"

    def cancel_key(self, tenant: str, job_id: str) -> str:
        return f"{self.folder(tenant, job_id)}/cancel"

    def active_key(self, tenant: str, job_id: str) -> str:
        self.folder(tenant, job_id)  # validates both
        return f"{self.prefix}/_active/{tenant}/{job_id}"

    def mark_active(self, manifest: JobManifest) -> None:
        self.store.put_bytes(self.active_key(manifest.tenant, manifest.job_id), b"")

    def unmark_active(self, manifest: JobManifest) -> None:
        self.store.delete(self.active_key(manifest.tenant, manifest.job_id))

    def save(self, manifest: JobManifest) -> None:
        body = manifest.model_dump_json(indent=1).encode()
        key = self.manifest_key(manifest.tenant, manifest.job_id)
        self.store.put_bytes(key, body, content_type="application/json")

    def get(self, tenant: str, job_id: str) -> JobManifest:
        try:
            data = self.store.get_bytes(self.manifest_key(tenant, job_id))
        except ObjectNotFound:
            raise JobNotFound(job_id) from None
        return JobManifest.model_validate(json.loads(data))

    def list(self, tenant: str) -> list[JobManifest]:
        prefix = f"{self.prefix}/{validate_tenant(tenant)}/"
        return [
            self._load(key) for key in self.store.list(prefix) if key.endswith("/manifest.json")
        ]

    def unfinished(self) -> list[JobManifest]:
        """Jobs of every tenant that are queued or running (on this replica, another, or one
        that died: their leases tell which), found through their active markers."""
        jobs = []
        for key in self.store.list(f"{self.prefix}/_active/"):
            tenant, job_id = key.rsplit("/", 2)[-2:]
            try:
                manifest = self.get(tenant, job_id)
            except JobNotFound:  # marked, then its manifest write failed: nothing to resume
                self.store.delete(key)
                continue
            if manifest.terminal:  # finished, but the replica died before unmarking it
                self.store.delete(key)
                continue
            jobs.append(manifest)
        return jobs

    def request_cancel(self, tenant: str, job_id: str) -> None:
        """Mark a job for cancellation; its runner (on any replica) sees the mark between chunks."""
        self.store.put_bytes(self.cancel_key(tenant, job_id), b"1")

    def cancel_requested(self, tenant: str, job_id: str) -> bool:
        return self.store.exists(self.cancel_key(tenant, job_id))

    def delete_work(self, tenant: str, job_id: str) -> None:
        """Free a cancelled or failed job's input; the manifest stays to report the outcome."""
        self.store.delete(self.input_key(tenant, job_id))

    def _load(self, key: str) -> JobManifest:
        return JobManifest.model_validate(json.loads(self.store.get_bytes(key)))


class Overloaded(Exception):
    """Too many jobs in flight on this replica; the client should retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"busy; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class JobCancelled(Exception):
    pass


class ForbiddenInputError(InputError):
    """An s3:// input outside the configured buckets: we never fetch arbitrary locations."""

    code = "forbidden_input"
    http_status = 403


def check_input_uri(uri: str, allowed_buckets: list[str]) -> str:
    """Accept only s3:// URIs in the allowed buckets (no http(s), no file paths)."""
    if not uri.startswith("s3://"):
        raise ForbiddenInputError("inputs by reference must be s3:// URIs in an allowed bucket")
    try:
        bucket, key = parse_s3_uri(uri)
    except ValueError as exc:
        raise InvalidSettingError(f"malformed s3 URI: {exc}") from None
    if bucket not in allowed_buckets or not key:
        raise ForbiddenInputError(f"bucket {bucket!r} is not an allowed input bucket")
    return uri


class JobService:
    """Accepts, runs, cancels and resumes jobs on one ingress replica.

    The heavy lifting is the orchestrator's (`run(manifest, events) -> (result_key, report)`);
    this class owns the lifecycle: admission (bounded jobs in flight, 503 beyond), the manifest's
    state transitions, turning failures into a code and message for the user, and the job's
    lease (serve/leases.py): each run holds a claim on its attempt, renews it while running,
    and stops if another replica has taken the job over.
    """

    def __init__(
        self,
        jobs: JobStore,
        orchestrator: Any,
        *,
        limits: Any,
        allowed_input_buckets: list[str],
        max_active_jobs: int,
        retry_after_s: int = 5,
        probe: Callable[[Path, str], Any],
        plan_for: Callable[[JobRequest, Any], dict[str, Any]],
        estimate: Callable[[JobRequest, float, int, int], dict[str, Any]],
        fetch_s3: Callable[[str, Path], None],
        metrics: Any = None,
        leases: JobLeases | None = None,
    ):
        self.jobs = jobs
        self.orchestrator = orchestrator
        self.limits = limits
        self.allowed_input_buckets = allowed_input_buckets
        self.max_active_jobs = max_active_jobs
        self.retry_after_s = retry_after_s
        self._probe, self._plan_for, self._estimate, self._fetch_s3 = (
            probe,
            plan_for,
            estimate,
            fetch_s3,
        )
        self._tasks: dict[str, asyncio.Task] = {}
        self._claims: dict[str, tuple[str, int]] = {}  # job id -> (folder, attempt) held here
        self._lost: set[str] = set()  # jobs this replica stopped running (lease taken or given)
        self.metrics = metrics or _NoMetrics()
        self.leases = leases or JobLeases(jobs.store, new_owner_id())

    # ----------------------------------------------------------------------- admission

    @property
    def active(self) -> int:
        return len(self._tasks)

    def check_capacity(self) -> None:
        if self.active >= self.max_active_jobs:
            self.metrics.rejected.inc()
            raise Overloaded(self.retry_after_s)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        ready = await self.orchestrator.ready()
        return ready, {"active_jobs": self.active, "max_active_jobs": self.max_active_jobs}

    async def submit_file(self, tenant: str, request: JobRequest, local: Path) -> JobManifest:
        """Validate an uploaded file, store it, record the job and start it."""
        self.check_capacity()
        digest = await asyncio.to_thread(hash_file, local)
        info = await asyncio.to_thread(self._probe, local, digest)
        plan = self._plan_for(request, info)
        job_id = new_job_id()
        input_key = self.jobs.input_key(tenant, job_id)
        await asyncio.to_thread(self.jobs.store.put_file, input_key, local)
        return self._start(tenant, job_id, request, input_key, digest, plan)

    async def submit_s3(self, tenant: str, request: JobRequest, uri: str) -> JobManifest:
        check_input_uri(uri, self.allowed_input_buckets)
        self.check_capacity()
        with tempfile.TemporaryDirectory(prefix="motionserve-s3-") as scratch:
            local = Path(scratch) / "input"
            await asyncio.to_thread(self._fetch_s3, uri, local)
            digest = await asyncio.to_thread(hash_file, local)
            info = await asyncio.to_thread(self._probe, local, digest)
        plan = self._plan_for(request, info)
        return self._start(tenant, new_job_id(), request, uri, digest, plan)

    def _start(self, tenant, job_id, request, input_key, digest, plan) -> JobManifest:
        manifest = JobManifest(
            job_id=job_id,
            tenant=tenant,
            request=request,
            input_key=input_key,
            input_sha256=digest,
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
        """Adopt every unfinished job whose lease has lapsed (its replica died, or the whole
        app restarted) and run it again from its checkpoints. Called at start-up and then
        periodically by each ingress replica; a job with a live lease is left to its owner."""
        adopted = await asyncio.to_thread(self._claim_orphans)
        for manifest, attempt in adopted:
            self._launch(manifest, attempt)
        return [manifest.job_id for manifest, _ in adopted]

    def _claim_orphans(self) -> list[tuple[JobManifest, int]]:
        adopted = []
        for manifest in self.jobs.unfinished():
            if manifest.job_id in self._tasks:
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
        task = asyncio.get_running_loop().create_task(self._run(manifest, attempt))
        self._tasks[manifest.job_id] = task
        self._claims[manifest.job_id] = (self._folder(manifest), attempt)
        self.metrics.queue_depth(self.active)
        task.add_done_callback(lambda _: self._forget(manifest.job_id))

    def _forget(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._claims.pop(job_id, None)
        self.metrics.queue_depth(self.active)

    async def _run(self, manifest: JobManifest, attempt: int) -> None:
        manifest = manifest.transition(JobState.RUNNING, attempts=attempt)
        self.jobs.save(manifest)
        self.metrics.state(JobState.RUNNING)
        events = _JobEvents(self.jobs, manifest)
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


class _NoMetrics:
    """Metrics sink when none is configured (in-process use and unit tests)."""

    class _Counter:
        def inc(self, *args, **kwargs) -> None:
            pass

    rejected = _Counter()

    def state(self, state) -> None:
        pass

    def queue_depth(self, active: int) -> None:
        pass

    def finished(self, ledger, report) -> None:
        pass


def _record_dict(record: Any, attempt: int) -> dict[str, Any]:
    data = record.model_dump() if hasattr(record, "model_dump") else dict(record)
    return {**data, "attempt": data.get("attempt") or attempt}


def _error_of(exc: InputError) -> dict[str, str]:
    return {"code": exc.code, "message": exc.message}


class _JobEvents:
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
        self.manifest = self.manifest.model_copy(update={**fields, "updated_at": _now()})
        self.jobs.save(self.manifest)
