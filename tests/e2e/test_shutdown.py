"""Stopping `motionserve serve`: SIGTERM hands running jobs back and leaves no Ray process
within the bound; a kill -9 leaves none either, and an immediate restart resumes the job
without recomputing what was checkpointed (a server killed whole, its Ray too, resumes the same
way: tests/e2e/test_ingress_replicas.py). These tests stop and start their own server (the
shared one of tests/e2e/conftest.py must stay up for the other modules)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from serve.jobs import JobStore
from serve.leases import JobLeases
from serve.process_group import STOP_BOUND_S
from serve.storage import open_store
from tests.e2e.conftest import REPO, assert_resumed_without_recomputing, make_server
from tests.e2e.test_http_jobs import TERMINAL, submit, wait


def live_members(session_id: int) -> list[str]:
    """The processes of a session that still run (zombies waiting to be reaped are dead)."""
    out = subprocess.run(["ps", "-e", "-o", "sid=,stat=,args="], capture_output=True,
                         text=True).stdout  # fmt: skip
    rows = [line.split(None, 2) + [""] for line in out.splitlines()]
    return [row[2] for row in rows if row[0] == str(session_id) and not row[1].startswith("Z")]


def wait_session_gone(session_id: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while live_members(session_id):
        assert time.monotonic() < deadline, f"left behind: {live_members(session_id)}"
        time.sleep(0.1)  # waiting for the kernel to deliver SIGKILLs: nothing to await


def set_lease(server, lease_s: float) -> None:
    config = yaml.safe_load(server.config.read_text())
    config["applications"][0]["args"]["job_lease_s"] = lease_s
    server.config.write_text(yaml.safe_dump(config))


def job_store(server) -> JobStore:
    args = yaml.safe_load(server.config.read_text())["applications"][0]["args"]
    return JobStore(open_store(args["storage_uri"], s3_endpoint_url=args["s3_endpoint_url"]))


@pytest.fixture(scope="module")
def server(moto_s3, tmp_path_factory):
    instance = make_server(moto_s3, tmp_path_factory.mktemp("shutdown"))
    # A lease far longer than the test's waits: a job that resumes at once was released.
    set_lease(instance, 120)
    instance.start()
    yield instance
    instance.kill()


def start_job_and_wait_mid_way(server, short_clip, seed: int, checkpoints: int = 1
                               ) -> tuple[str, dict]:  # fmt: skip
    with server.client() as client:
        # Many small chunks (12): long enough to be caught mid-way.
        job_id = submit(client, short_clip, seed=seed, chunk_frames=2, steps=6).json()["job_id"]
        status = wait(client, job_id, until=lambda s: len(s["checkpointed_chunks"]) >= checkpoints
                      or s["state"] in TERMINAL)  # fmt: skip
    assert status["state"] == "running", "the job finished before it could be interrupted"
    return job_id, status


def test_sigterm_hands_jobs_back_and_leaves_no_ray_process(server, short_clip):
    job_id, _ = start_job_and_wait_mid_way(server, short_clip, seed=41)
    session = server.process.pid  # the test starts the server as a session leader
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=STOP_BOUND_S + 10)
    stopped_in = time.monotonic() - started
    assert stopped_in <= STOP_BOUND_S + 1, f"stopped in {stopped_in:.1f} s"
    assert server.process.returncode == 0
    wait_session_gone(session, timeout=2)

    jobs = job_store(server)
    manifest = jobs.get("acme", job_id)
    assert manifest.state == "running"  # not cancelled, not failed: resumable
    claim = JobLeases(jobs.store, "test").latest(jobs.folder("acme", job_id))
    assert claim is not None and claim.renewed_at == 0.0, claim  # released, not left to lapse

    server.start()
    with server.client() as client:
        # Well within the 120 s lease: only a released lease is adopted this soon.
        wait(client, job_id, until=lambda s: s["attempts"] == 2, timeout=30)
        status = wait(client, job_id)
    assert status["state"] == "done" and status["attempts"] == 2, status["error"]


def test_kill_9_then_immediate_restart_resumes_without_recomputing(server, short_clip):
    job_id, before = start_job_and_wait_mid_way(server, short_clip, seed=42, checkpoints=2)
    set_lease(server, 3)  # the next start adopts the killed server's (unreleased) job soon
    session = server.process.pid
    os.kill(server.process.pid, signal.SIGKILL)  # the supervisor only, as a user would
    server.process.wait()
    # The watchdog ends the session: Ray's agents too, which used to hold the metrics port.
    wait_session_gone(session, timeout=5)
    server.start()  # same HTTP and metrics ports
    with server.client() as client:
        status = wait(client, job_id)
    assert_resumed_without_recomputing(before, status)


def test_a_port_in_use_fails_with_one_line(server):
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "serve.cli", "serve", "--config", str(server.config),
             "--metrics-port", str(port)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"metrics port {port} in use" in lines[0], result.stderr
    assert "HTTP port" in lines[0]  # the module's server is still up on its HTTP port
