"""Where jobs live: manifests, inputs, results and marks in an object store, by tenant.

A job's manifest lives in the object store under ``jobs/<tenant>/<job_id>/``, so any ingress
replica, or the same app after a restart, can report on it and resume it. Looking a job up always
goes through its tenant's prefix: another tenant's job id is simply not found.
"""

from __future__ import annotations

import json
import re

from serve.jobs.manifest import JobManifest
from serve.storage import ObjectNotFound, ObjectStore

_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def anchor_image_key(result_key: str) -> str:
    """Where a preview's anchor keyframe PNG is stored: beside its MP4 (`result_key`)."""
    return f"{result_key.removesuffix('.mp4')}-anchor.png"


class JobNotFound(KeyError):
    pass


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

    def reference_key(self, tenant: str, job_id: str) -> str:
        """Where an uploaded reference image is kept, next to the input video."""
        return f"{self.folder(tenant, job_id)}/reference"

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
        """Free a cancelled or failed job's inputs (video and reference image); the manifest
        stays to report the outcome."""
        self.store.delete(self.input_key(tenant, job_id))
        self.store.delete(self.reference_key(tenant, job_id))
