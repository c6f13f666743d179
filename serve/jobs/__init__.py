"""Jobs: the manifest and its state machine, their store, the input rule and the service.

The request and response bodies (JobRequest, JobState, ...) are in serve/schemas.py.
"""

from serve.jobs.inputs import ForbiddenInputError, check_input_uri
from serve.jobs.manifest import (
    TERMINAL_STATES,
    InvalidTransition,
    JobError,
    JobManifest,
    new_job_id,
)
from serve.jobs.service import (
    EstimateCost,
    FetchInput,
    JobCancelled,
    JobMetricsSink,
    JobRunner,
    JobService,
    ManifestEvents,
    NoJobMetrics,
    Overloaded,
    PlanFor,
    ProbeInput,
)
from serve.jobs.store import JobNotFound, JobStore, validate_tenant

__all__ = [
    "TERMINAL_STATES",
    "EstimateCost",
    "FetchInput",
    "ForbiddenInputError",
    "InvalidTransition",
    "JobCancelled",
    "JobError",
    "JobManifest",
    "JobMetricsSink",
    "JobNotFound",
    "JobRunner",
    "JobService",
    "JobStore",
    "ManifestEvents",
    "NoJobMetrics",
    "Overloaded",
    "PlanFor",
    "ProbeInput",
    "check_input_uri",
    "new_job_id",
    "validate_tenant",
]
