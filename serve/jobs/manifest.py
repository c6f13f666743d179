"""A job's manifest and the state machine its state moves through."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from serve.schemas import JobRequest, JobState, StageProgress

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


class JobError(BaseModel):
    code: str = Field(description="Machine-readable error code.")
    message: str = Field(description="What went wrong, for the user.")


def now() -> str:
    """A manifest timestamp: UTC, ISO 8601, milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class JobManifest(BaseModel):
    """Everything known about a job; the single source of truth, kept in the object store."""

    job_id: str = Field(description="32 hex characters.")
    tenant: str = Field(description="Owner of the job.")
    kind: Literal["job", "preview"] = Field(
        default="job",
        description="job: the full edit; preview: the CPU-only motion preview and estimate "
        "(POST /v1/previews), which runs the job's decode, pose and motion stages and no "
        "diffusion. Each kind is found only under its own routes.",
    )
    state: JobState = Field(default=JobState.QUEUED, description="Where the job is.")
    created_at: str = Field(default_factory=now, description="UTC, ISO 8601.")
    updated_at: str = Field(default_factory=now, description="UTC, ISO 8601.")
    request: JobRequest = Field(description="The request as accepted.")
    input_key: str = Field(description="Storage key (or s3:// URI) of the input video.")
    input_sha256: str = Field(default="", description="Content hash of the input video.")
    reference_key: str | None = Field(
        default=None,
        description="Storage key (or s3:// URI) of the reference image, when the job has one.",
    )
    reference_sha256: str | None = Field(
        default=None, description="Content hash of the reference image, when the job has one."
    )
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
        return self.model_copy(update={"state": new_state, "updated_at": now(), **updates})


def new_job_id() -> str:
    return secrets.token_hex(16)
