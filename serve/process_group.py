"""`motionserve serve` as a supervisor: the server and every Ray process it starts share one
session that this module ends, whether the server stops, crashes or its supervisor is killed.

Why: Ray ties the raylet and GCS to the driver (kernel fate-sharing), but not the agents the
raylet starts (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`); after a SIGKILL of the driver
they linger for minutes, holding the metrics port, and the next start fails. The raylet also
gives workers process groups of their own (setpgrp), so a process group does not cover them;
a session does (nothing Ray starts calls setsid). So:

- the supervisor (the `motionserve serve` process, what users and orchestrators signal) starts
  the server in a new session, or in its own when it already leads one (started by `setsid`
  or a test harness: everything in that session is then ours);
- SIGTERM, SIGINT or SIGHUP to the supervisor is passed on to the server as SIGINT (Ray's
  crash handler in the driver prints a stack trace on SIGTERM, not on SIGINT); the
  server hands its jobs back and stops Serve (serve/local_app.py); after `STOP_BOUND_S` the
  supervisor kills whatever of the session is left (a second signal does that at once);
- a watchdog process polls the supervisor; when it dies (kill -9) the watchdog kills the
  session at once, so the next start finds the ports free;
- once the server exits, whatever outlived it in the session (the agents) is killed too.

Only processes of that session are ever signalled: never another Ray on the machine.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

STOP_BOUND_S = 15.0
"""From the first stop signal to a dead session: the server's own stop (hand back, Serve,
Ray) gets this long, then the rest of the session is killed."""

PORT_RELEASE_WAIT_S = 5.0
"""How long a start waits for a port a stopping server still holds before it gives up."""

WATCHDOG_POLL_S = 0.2


def session_members(session_id: int) -> list[int]:
    """Pids of the processes in a session (read from /proc; Linux only)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parens
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if int(fields[3]) == session_id:
            members.append(int(entry))
    return members


def kill_session(session_id: int, spare: Sequence[int] = ()) -> int:
    """SIGKILL every process of the session but `spare` (and the caller), until none is left
    (a raylet may fork a worker while we sweep). Returns how many were killed."""
    spare = {os.getpid(), *spare}
    killed = 0
    for _ in range(50):
        victims = [pid for pid in session_members(session_id) if pid not in spare]
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.02)  # let the kernel reap them before the next look
    return killed


def watch_parent(parent_pid: int, session_id: int) -> None:
    """The watchdog's loop: once `parent_pid` is no longer our parent, kill the session."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the supervisor reacts to Ctrl-C
    while os.getppid() == parent_pid:
        time.sleep(WATCHDOG_POLL_S)
    kill_session(session_id, spare=(parent_pid,))


def port_in_use(port: int, host: str = "0.0.0.0") -> bool:
    """Whether binding `port` fails (as Ray's metrics agent and Serve's proxy would)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as their servers do
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def busy_ports(ports: dict[str, int], wait_s: float = PORT_RELEASE_WAIT_S) -> list[str]:
    """The names of `ports` still in use after waiting up to `wait_s` (a server that was just
    stopped may take a moment to release them)."""
    deadline = time.monotonic() + wait_s
    while True:
        busy = [name for name, port in ports.items() if port and port_in_use(port)]
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.2)  # waiting for another process to close its socket: nothing to await


class Supervisor:
    """Runs the server command in a session it owns and ends that session with it."""

    def __init__(self, command: list[str], stop_bound_s: float = STOP_BOUND_S):
        self.command = command
        self.stop_bound_s = stop_bound_s
        self.stop_deadline: float | None = None
        self.server: subprocess.Popen | None = None
        self.session_id = 0

    def run(self) -> int:
        """Start the server and the watchdog, wait, sweep; the server's exit status (0 after
        a requested stop, also when it had to be forced)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_stop_signal)
        leads_session = os.getsid(0) == os.getpid()
        # A session of our own: ours already when we lead one, else a new one for the server.
        # The server gets its own process group either way, so signals meant for us (Ctrl-C to
        # the terminal's foreground group, a killpg of our group) reach it only through us.
        self.server = subprocess.Popen(
            self.command, **({"process_group": 0} if leads_session else {"start_new_session": True})
        )
        self.session_id = os.getpid() if leads_session else self.server.pid
        watchdog = subprocess.Popen(
            [sys.executable, "-m", "serve.process_group", str(os.getpid()), str(self.session_id)],
            process_group=0,
        )
        if self.stop_deadline is not None:  # a signal came before the server could get it
            self.server.send_signal(signal.SIGINT)
        try:
            code = self._wait()
        finally:
            kill_session(self.session_id, spare=(watchdog.pid,))
            watchdog.kill()
            watchdog.wait()
        return 0 if self.stop_deadline is not None else code

    def _wait(self) -> int:
        while True:
            timeout = None if self.stop_deadline is None else self.stop_deadline - time.monotonic()
            try:
                # In slices: a signal handler sets the deadline while we wait.
                return self.server.wait(
                    timeout=0.5 if timeout is None else max(0.0, min(timeout, 0.5))
                )
            except subprocess.TimeoutExpired:
                if self.stop_deadline is not None and time.monotonic() >= self.stop_deadline:
                    print(
                        f"motionserve: the server did not stop within {self.stop_bound_s:g} s; "
                        "killing it and its Ray processes",
                        file=sys.stderr,
                        flush=True,
                    )
                    kill_session(self.session_id)
                    return self.server.wait()

    def _on_stop_signal(self, signum: int, _frame) -> None:
        if self.stop_deadline is not None:  # asked twice: stop now
            self.stop_deadline = time.monotonic()
            return
        self.stop_deadline = time.monotonic() + self.stop_bound_s
        print(
            f"motionserve: stopping ({signal.Signals(signum).name}); running jobs are handed "
            f"back for the next start (at most {self.stop_bound_s:g} s)",
            file=sys.stderr,
            flush=True,
        )
        if self.server is not None:
            self.server.send_signal(signal.SIGINT)  # no-op once it has exited


if __name__ == "__main__":  # the watchdog: python -m serve.process_group PARENT_PID SESSION_ID
    watch_parent(int(sys.argv[1]), int(sys.argv[2]))
