"""Job leases: exactly one ingress replica runs a job, and a dead replica's jobs are adopted.

Several ingress replicas share one job store (the scale tier runs 2), and each looks for
unfinished jobs to resume. Without a lease every replica that starts (a restart, a new version,
one added by hand or by an autoscaler) would resume every running job again: the same chunks on
the GPU twice and two writers on one manifest. So each attempt at running a job is claimed:

- `claims/<attempt>` under the job's folder is created with a conditional write (create only if
  absent: `If-None-Match: *` on S3, a hard link locally), so of two replicas claiming the same
  attempt exactly one wins;
- the owner rewrites its claim every `lease_s / 3` with the time; a claim not renewed for
  `lease_s` belongs to a dead (or stalled) replica, and any replica may claim the next attempt;
- an owner that finds a later claim than its own has lost the job and stops running it;
- a replica that Serve stops gracefully releases its claims (`release`), so the others adopt
  its jobs at their next scan.

Liveness compares wall clocks of different machines (the time written in the claim with the
reader's clock), so it assumes clocks synced well within `lease_s` (NTP on every node).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve.storage import ObjectNotFound, ObjectStore


def new_owner_id() -> str:
    """Who holds a lease: host, process and a random part (a restarted process is new)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Claim:
    attempt: int
    owner: str
    renewed_at: float


class JobLeases:
    """Claims and renewals of job attempts under `<job folder>/claims/` in an object store."""

    def __init__(
        self,
        store: ObjectStore,
        owner: str,
        lease_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ):
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.store = store
        self.owner = owner
        self.lease_s = lease_s
        self.clock = clock

    @property
    def renew_every_s(self) -> float:
        return self.lease_s / 3

    def latest(self, job_folder: str) -> Claim | None:
        """The newest attempt's claim, or None for a job never claimed."""
        keys = list(self.store.list(f"{job_folder}/claims/"))
        if not keys:
            return None
        attempt = max(int(key.rsplit("/", 1)[1]) for key in keys)
        try:
            data = json.loads(self.store.get_bytes(self._key(job_folder, attempt)))
        except (ObjectNotFound, ValueError):  # a claim being written: treat it as fresh
            return Claim(attempt, "?", self.clock())
        return Claim(attempt, data["owner"], float(data["renewed_at"]))

    def is_live(self, claim: Claim | None) -> bool:
        return claim is not None and self.clock() - claim.renewed_at < self.lease_s

    def claim(self, job_folder: str, attempt: int) -> bool:
        """Try to become the owner of `attempt`; False if another replica has it."""
        return self.store.create_bytes(self._key(job_folder, attempt), self._body())

    def claim_orphan(self, job_folder: str) -> int | None:
        """The attempt this replica now owns, if the job's latest claim has lapsed (or there
        is none); None while another owner keeps it alive or won the race to the next one."""
        latest = self.latest(job_folder)
        if self.is_live(latest):
            return None
        attempt = (latest.attempt if latest else 0) + 1
        return attempt if self.claim(job_folder, attempt) else None

    def renew(self, job_folder: str, attempt: int) -> bool:
        """Refresh this owner's claim; False (and nothing written) once a later attempt exists."""
        latest = self.latest(job_folder)
        if latest is not None and latest.attempt > attempt:
            return False
        self.store.put_bytes(self._key(job_folder, attempt), self._body())
        return True

    def release(self, job_folder: str, attempt: int) -> None:
        """Give the job up now (this replica is shutting down): the claim reads as lapsed, so
        another replica adopts the job at its next scan instead of after `lease_s`."""
        latest = self.latest(job_folder)
        if latest is not None and latest.attempt == attempt and latest.owner == self.owner:
            body = json.dumps({"owner": self.owner, "renewed_at": 0.0, "released": True})
            self.store.put_bytes(self._key(job_folder, attempt), body.encode())

    def _key(self, job_folder: str, attempt: int) -> str:
        return f"{job_folder}/claims/{attempt:06d}"

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "renewed_at": self.clock()}).encode()
