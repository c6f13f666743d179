"""Job model, state machine, tenant-partitioned manifests, input URI policy, API keys."""

from __future__ import annotations

import pytest

from deployments import errors
from serve.auth import LOCAL_TENANT, Authenticator, hash_api_key
from serve.config import TenantKey
from serve.jobs import (
    ForbiddenInputError,
    InvalidTransition,
    JobManifest,
    JobNotFound,
    JobStore,
    check_input_uri,
    new_job_id,
)
from serve.schemas import JobRequest, JobState
from serve.storage import LocalStore


def manifest(tenant: str = "acme", **updates) -> JobManifest:
    base = JobManifest(
        job_id=new_job_id(), tenant=tenant, request=JobRequest(prompt="a dancer"), input_key="x"
    )
    return base.model_copy(update=updates)


def listed(jobs: JobStore, tenant: str) -> list[JobManifest]:
    """The manifests stored under a tenant's prefix (what a listing of its jobs would see)."""
    keys = jobs.store.list(f"{jobs.prefix}/{tenant}/")
    return [
        JobManifest.model_validate_json(jobs.store.get_bytes(key))
        for key in keys
        if key.endswith("/manifest.json")
    ]


@pytest.fixture
def jobs(tmp_path) -> JobStore:
    return JobStore(LocalStore(tmp_path))


def test_state_machine_allows_the_lifecycle_and_resume():
    job = manifest()
    running = job.transition(JobState.RUNNING)
    requeued = running.transition(JobState.QUEUED)  # app restarted mid-job
    done = requeued.transition(JobState.RUNNING).transition(JobState.DONE, result_key="r")
    assert done.state == JobState.DONE and done.terminal and done.result_key == "r"


@pytest.mark.parametrize(
    "start,target",
    [
        (JobState.DONE, JobState.RUNNING),
        (JobState.CANCELLED, JobState.QUEUED),
        (JobState.FAILED, JobState.DONE),
        (JobState.QUEUED, JobState.DONE),
    ],
)
def test_state_machine_rejects_illegal_moves(start, target):
    with pytest.raises(InvalidTransition):
        manifest(state=start).transition(target)


def test_manifest_round_trip_and_tenant_isolation(jobs):
    mine = manifest("acme")
    jobs.save(mine)
    assert jobs.get("acme", mine.job_id) == mine
    with pytest.raises(JobNotFound):
        jobs.get("globex", mine.job_id)  # another tenant's id is simply unknown
    with pytest.raises(JobNotFound):
        jobs.get("acme", "../../etc/passwd")
    assert [j.job_id for j in listed(jobs, "acme")] == [mine.job_id]
    assert listed(jobs, "globex") == []


def test_unfinished_lists_the_marked_queued_and_running_jobs_of_every_tenant(jobs):
    queued, running = manifest("a"), manifest("b", state=JobState.RUNNING)
    done, unmarked = manifest("a", state=JobState.DONE), manifest("b")
    for job in (queued, running, done, unmarked):
        jobs.save(job)
    for job in (queued, running, done):
        jobs.mark_active(job)
    assert {j.job_id for j in jobs.unfinished()} == {queued.job_id, running.job_id}
    assert jobs.store.exists(jobs.active_key("b", running.job_id))
    assert not jobs.store.exists(jobs.active_key("a", done.job_id))  # cleaned up by the scan


def test_cancel_mark_is_visible_through_the_store(jobs):
    job = manifest()
    jobs.save(job)
    assert not jobs.cancel_requested(job.tenant, job.job_id)
    jobs.request_cancel(job.tenant, job.job_id)
    assert jobs.cancel_requested(job.tenant, job.job_id)


@pytest.mark.parametrize(
    "uri,error",
    [
        ("https://example.com/v.mp4", ForbiddenInputError),
        ("file:///etc/passwd", ForbiddenInputError),
        ("/etc/passwd", ForbiddenInputError),
        ("s3://other-bucket/v.mp4", ForbiddenInputError),
        ("s3://uploads", ForbiddenInputError),
        ("s3://Bad_Bucket!/v.mp4", errors.InvalidSettingError),
    ],
)
def test_only_allowed_s3_buckets_are_fetched(uri, error):
    with pytest.raises(error):
        check_input_uri(uri, ["uploads"])


def test_allowed_s3_uri_passes():
    assert check_input_uri("s3://uploads/a/b.mp4", ["uploads"]) == "s3://uploads/a/b.mp4"
    assert ForbiddenInputError.http_status == 403


def test_request_rejects_unknown_fields_and_styles():
    with pytest.raises(ValueError):
        JobRequest.model_validate({"prompt": "x", "promt": "typo"})
    with pytest.raises(errors.InvalidSettingError):
        JobRequest(prompt="x", styles=["moonwalk"])


def test_api_keys_map_to_tenants_and_are_stored_hashed():
    auth = Authenticator([TenantKey(tenant="acme", key_sha256=hash_api_key("s3cret"))])
    assert auth.tenant_for("s3cret") == "acme"
    assert auth.tenant_for("wrong") is None and auth.tenant_for(None) is None
    assert Authenticator([]).tenant_for(None) == LOCAL_TENANT
    with pytest.raises(ValueError):
        TenantKey(tenant="acme", key_sha256="s3cret")  # a plain key is refused
