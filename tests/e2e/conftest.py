"""A real `motionserve serve` (local Ray cluster, Serve app, HTTP on loopback) for e2e tests.

The server keeps its artifacts and job manifests in S3, served by the moto server of
tests/conftest.py, so these tests also exercise the S3 backend through the whole app.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from serve.auth import hash_api_key
from serve.local_app import free_port, load_config

REPO = Path(__file__).parents[2]
KEYS = {"acme": "acme-secret-key", "globex": "globex-secret-key"}
START_TIMEOUT_S = 300


def _session_alive(session_id: int) -> bool:
    """Whether any process still runs in the session the server was started in."""
    out = subprocess.run(["ps", "-e", "-o", "sid="], capture_output=True, text=True).stdout
    return str(session_id) in out.split()


@dataclass
class Server:
    """One `motionserve serve` process; `restart` kills it (and its Ray) and starts it again."""

    config: Path
    url: str
    log: Path
    metrics_port: int
    process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serve.cli",
                "serve",
                "--config",
                str(self.config),
                "--metrics-port",
                str(self.metrics_port),
            ],  # fmt: skip
            cwd=REPO,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}); see {self.log}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)  # waiting for a process to come up: poll its readiness endpoint
        raise TimeoutError(f"server not ready after {START_TIMEOUT_S} s; see {self.log}")

    def kill(self) -> None:
        """Kill the app and its Ray cluster abruptly, as a lost node would: every process of
        the server's session (never another Ray cluster on the machine)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        deadline = time.monotonic() + 30
        while _session_alive(self.process.pid):
            assert time.monotonic() < deadline, "server processes survived SIGKILL"
            time.sleep(0.2)  # waiting for the kernel to reap them

    def replica_pids(self, deployment: str) -> list[int]:
        """Processes of this server's session whose title names the deployment's replica
        (Ray titles a Serve replica's worker `ray::ServeReplica:<app>:<deployment>`)."""
        out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,args="], capture_output=True,
                             text=True).stdout  # fmt: skip
        marker = f"ServeReplica:motionserve:{deployment}"
        pids = []
        for line in out.splitlines():
            pid, sid, args = line.split(None, 2) + [""] * (3 - len(line.split(None, 2)))
            if sid == str(self.process.pid) and marker in args:
                pids.append(int(pid))
        return pids

    def client(self, tenant: str = "acme", **kwargs) -> httpx.Client:
        headers = {"X-API-Key": KEYS[tenant]} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)


@pytest.fixture(scope="package")
def server(moto_s3, tmp_path_factory) -> Server:
    """One server for every e2e module that takes it (tests/ordering.py runs them together);
    stopped at the end of the e2e tests. Modules that kill, restart or reconfigure a server
    start their own (make_server)."""
    instance = make_server(moto_s3, tmp_path_factory.mktemp("server"))
    instance.start()
    yield instance
    instance.kill()


def make_server(moto_s3, folder: Path, ingress_replicas: int = 1) -> Server:
    """A server on serve/configs/local.yaml with its store in moto S3 (not started)."""
    port = free_port()
    config = load_config(port=port)
    args = config["applications"][0]["args"]
    args.update(
        storage_uri=f"s3://{moto_s3.bucket}/e2e-{uuid.uuid4().hex[:8]}",
        s3_endpoint_url=moto_s3.endpoint_url,
        api_keys=[{"tenant": t, "key_sha256": hash_api_key(k)} for t, k in KEYS.items()],
        allowed_input_buckets=[moto_s3.bucket],
        max_active_jobs=3,
        job_lease_s=3,  # a restart's resume waits for the dead app's lease to lapse
    )
    (ingress,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress"]
    ingress["num_replicas"] = ingress_replicas
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return Server(path, f"http://127.0.0.1:{port}", folder / "server.log", free_port())


def assert_resumed_without_recomputing(before: dict, after: dict) -> None:
    """A job interrupted with `before["checkpointed_chunks"]` done, then resumed to `after`
    (attempt 2): no checkpointed chunk was computed again, and their first attempt's cost is
    still in the ledger and the report."""
    assert after["state"] == "done" and after["attempts"] == 2, after["error"]
    checkpointed = set(before["checkpointed_chunks"])
    redone = {
        r["chunk"] for r in after["ledger"]
        if r["attempt"] == 2 and r["chunk"] in checkpointed and not r["cache_hit"]
    }  # fmt: skip
    assert not redone, f"checkpointed chunks {sorted(redone)} were computed again"
    first = {r["chunk"] for r in after["ledger"] if r["attempt"] == 1 and r["chunk"] is not None}
    assert checkpointed <= first  # their cost is still in the ledger and the report
    assert after["report"]["attempts"] == 2
