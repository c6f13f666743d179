"""The workers' preStop hook, run for real: it drains the Ray node, then waits (bounded) only while
Serve replicas are still on the pod."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import worker_groups

GRACE_S, MAX_WAIT_S = 30, 20


def _other_replicas_running(own_pid: int) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"ServeReplica" in cmdline.read_bytes() and cmdline.parent.name != str(own_pid):
                return True
        except OSError:
            continue
    return False


def _fake_ray(bin_dir: Path, calls: Path) -> None:
    """A `ray` that records its arguments and refuses, as GCS does for an already idle node."""
    ray = bin_dir / "ray"
    ray.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    ray.chmod(ray.stat().st_mode | stat.S_IXUSR)


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture()
def hook(render) -> str:
    docs = render(
        "values-dev.yaml",
        sets=(
            f"drain.terminationGracePeriodSeconds={GRACE_S}",
            f"drain.maxWaitSeconds={MAX_WAIT_S}",
        ),
    )
    command = worker_groups(docs)["gpu-spot"]["template"]["spec"]["containers"][0]["lifecycle"][
        "preStop"
    ]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    return command[2]


def test_prestop_drains_then_waits_for_serve_replicas_to_leave(hook, tmp_path):
    calls = tmp_path / "ray-calls"
    _fake_ray(tmp_path, calls)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "HOSTNAME": "gpu-spot-x"}
    replica = subprocess.Popen(
        ["bash", "-c", 'exec -a "ray::ServeReplica:motionserve:Diffusion" sleep 120']
    )
    try:
        assert _wait_for(
            lambda: b"ServeReplica" in Path(f"/proc/{replica.pid}/cmdline").read_bytes(), 5
        )
        prestop = subprocess.Popen(["/bin/sh", "-c", hook], env=env)
        assert _wait_for(calls.exists, 5), "the hook never called ray drain-node"
        args = calls.read_text().split()
        assert args[0] == "drain-node"
        assert "--reason=DRAIN_NODE_REASON_PREEMPTION" in args
        assert f"--deadline-remaining-seconds={GRACE_S}" in args
        # A refused drain (exit 1) does not end the hook: it still waits for the replica.
        with pytest.raises(subprocess.TimeoutExpired):
            prestop.wait(timeout=1.5)
        replica.kill()
        replica.wait()
        gone_at = time.monotonic()
        assert prestop.wait(timeout=MAX_WAIT_S + 5) == 0
        waited = time.monotonic() - gone_at
        if not _other_replicas_running(prestop.pid):
            assert waited < 5, f"hook lingered {waited:.1f}s after the last replica left"
    finally:
        replica.kill()


def test_prestop_returns_at_once_without_replicas(hook, tmp_path):
    if _other_replicas_running(os.getpid()):
        pytest.skip("another Serve replica runs on this machine; the hook would wait for it")
    _fake_ray(tmp_path, tmp_path / "calls")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    started = time.monotonic()
    subprocess.run(["/bin/sh", "-c", hook], env=env, check=True, timeout=MAX_WAIT_S + 5)
    assert time.monotonic() - started < 5
