"""The supervisor of `motionserve serve` without Ray: a server whose children outlive it (as
Ray's agents do) is swept with it, after a stop, a timeout or a kill -9 of the supervisor."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from serve.process_group import busy_ports, port_in_use, session_members

REPO = Path(__file__).parents[2]

# A "server": starts a grandchild in its own process group (as the raylet does for workers),
# writes both pids, then waits; asked to stop, it exits at once, or never when told to hang.
SERVER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    child = subprocess.Popen(["sleep", "600"], process_group=0)
    open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
    for signum in (signal.SIGINT, signal.SIGTERM):
        if sys.argv[2] == "hang":
            signal.signal(signum, signal.SIG_IGN)
        else:
            signal.signal(signum, lambda *_: sys.exit(0))
    time.sleep(600)
    """
)

SUPERVISE = textwrap.dedent(
    """
    import sys
    from serve.process_group import Supervisor
    command = [sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]]
    sys.exit(Supervisor(command, stop_bound_s=float(sys.argv[4])).run())
    """
)


def start(tmp_path: Path, mode: str = "stop", bound_s: float = 5.0):
    pids = tmp_path / "pids"
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISE, SERVER, str(pids), mode, str(bound_s)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not pids.exists() or not pids.read_text():
        assert time.monotonic() < deadline and supervisor.poll() is None
        time.sleep(0.05)  # waiting for another process to write its pids
    return supervisor, [int(p) for p in pids.read_text().split()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pids: list[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, [pid for pid in pids if alive(pid)]
        time.sleep(0.05)  # waiting for the kernel to deliver SIGKILLs


def test_sigterm_stops_the_server_and_sweeps_what_outlived_it(tmp_path):
    supervisor, (server, grandchild) = start(tmp_path)
    assert set(session_members(supervisor.pid)) >= {supervisor.pid, server, grandchild}
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=10) == 0
    wait_dead([server, grandchild])


def test_a_server_that_ignores_sigterm_is_killed_after_the_bound(tmp_path):
    supervisor, pids = start(tmp_path, mode="hang", bound_s=1.0)
    started = time.monotonic()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=10) == 0
    assert 1.0 <= time.monotonic() - started < 4.0
    wait_dead(pids)


def test_kill_9_of_the_supervisor_ends_its_session(tmp_path):
    supervisor, pids = start(tmp_path)
    os.kill(supervisor.pid, signal.SIGKILL)
    supervisor.wait()
    wait_dead(pids)  # the watchdog saw its parent die
    wait_dead(session_members(supervisor.pid))  # and then left too


def test_port_in_use_is_seen_and_a_free_one_is_not():
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert port_in_use(port)
        assert busy_ports({"metrics": port, "HTTP": 0}, wait_s=0.2) == ["metrics"]
    assert not port_in_use(port)
