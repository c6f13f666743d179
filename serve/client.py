"""HTTP client for a running motionserve (`motionserve submit`, `motionserve status`)."""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from serve.schemas import JobRequest

TERMINAL = {"done", "failed", "cancelled"}


class ClientError(Exception):
    """The server refused a request; `message` is its error message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 120.0):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def submit(
        self,
        video: Path,
        request: JobRequest,
        reference: Path | None = None,
        kind: str = "jobs",
    ) -> dict[str, Any]:
        """POST the video (and reference image) and request to /v1/jobs (or /v1/previews with
        kind="previews")."""
        with ExitStack() as stack:
            files = {"video": (video.name, stack.enter_context(video.open("rb")), "video/mp4")}
            if reference is not None:
                handle = stack.enter_context(reference.open("rb"))
                files["reference"] = (reference.name, handle, "application/octet-stream")
            data = {"request": request.model_dump_json(exclude_none=True)}
            return self._json(self.http.post(f"/v1/{kind}", files=files, data=data))

    def status(self, job_id: str, kind: str = "jobs") -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/{kind}/{job_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.delete(f"/v1/jobs/{job_id}"))

    def download(self, job_id: str, dest: Path, kind: str = "jobs") -> Path:
        """The job's result MP4 (or, with kind="previews", the preview's video) into `dest`."""
        partial = dest.with_name(f".{dest.name}.partial")
        what = "result" if kind == "jobs" else "video"
        with self.http.stream("GET", f"/v1/{kind}/{job_id}/{what}") as response:
            if response.status_code != 200:
                response.read()
                self._json(response)
            with partial.open("wb") as out:
                for block in response.iter_bytes(1 << 20):
                    out.write(block)
        partial.replace(dest)
        return dest

    def wait(self, job_id: str, poll_s: float = 1.0, timeout_s: float = 3600, show=None,
             kind: str = "jobs") -> dict:  # fmt: skip
        """Poll until the job (or preview) ends; `show(status)` is called on every poll."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(job_id, kind)
            if show:
                show(status)
            if status["state"] in TERMINAL:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status['state']} after {timeout_s} s")
            time.sleep(poll_s)  # polling an HTTP API: there is no condition to wait on here

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except json.JSONDecodeError:
            body = {}
        if response.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise ClientError(
                response.status_code,
                error.get("code", "http_error"),
                error.get("message", response.text[:200]),
            )
        return body


def progress_bars(status: dict[str, Any], stream=sys.stderr) -> None:
    """One line per stage: a bar of done/total."""
    parts = []
    for stage, progress in status.get("progress", {}).items():
        total, done = progress["total"] or 1, progress["done"]
        filled = int(10 * done / total)
        parts.append(f"{stage} [{'#' * filled}{'.' * (10 - filled)}] {done}/{progress['total']}")
    print(f"\r{status['state']:9} " + "  ".join(parts), end="", file=stream, flush=True)
    if status["state"] in TERMINAL:
        print(file=stream)
