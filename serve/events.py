"""What a job run tells its owner: the interface the orchestrator reports through.

Two implementations: `ManifestEvents` (serve/jobs/service.py, which saves the manifest) and
`LocalEvents` (serve/local_run.py, in memory for `motionserve edit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from serve.jobs import JobManifest
    from serve.stages import StageRecord


class JobEvents(Protocol):
    """The orchestrator's window on a job: progress, cost records, checkpoints, cancellation."""

    manifest: JobManifest  # the latest state: its ledger holds every attempt's records

    def progress(self, stage: str, done: int, total: int) -> None:
        """`done` of `total` units of `stage` are finished."""
        ...

    def record(
        self, records: Sequence[StageRecord], chunk: int | None = None, key: str | None = None
    ) -> None:
        """Add cost records to the ledger; with `chunk`, also checkpoint its segment `key`."""
        ...

    def check_cancelled(self) -> None:
        """Raise if the job was cancelled (called between stages and chunks)."""
        ...
