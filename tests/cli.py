"""The `motionserve` command run in this process: `serve.cli.main` with its output captured.

A process start costs ~2 s (it imports torch, diffusers, MediaPipe), so the command's tests
call `main()` here instead and see what a user sees: the exit status (argparse's own
`SystemExit`, 2 for bad usage, becomes a status like the process's) and everything written to
stdout and stderr, from Python and from native code alike (file-descriptor capture, as a
subprocess's pipes would hold). An exception that escapes `main()` fails the test as the
traceback would have. tests/unit/test_cli.py keeps one test that starts the real console
script, so the entry point itself stays proven.

Use the `motionserve` fixture (tests/conftest.py): `motionserve("probe", path)`, with
`env={...}` for variables set during that one call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest

from serve import cli


@dataclass(frozen=True)
class CliResult:
    """What a finished `motionserve` run left: like `subprocess.CompletedProcess`."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _exit_status(exc: SystemExit) -> int:
    """The status a process exiting with `exc` would have (sys.exit's own rules)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    return 1  # a message: Python prints it and exits 1


def run_in_process(
    capfd: pytest.CaptureFixture[str], *args: str, env: Mapping[str, str | None] | None = None
) -> CliResult:
    """Run `motionserve ARGS` through `serve.cli.main`; `env`: variables set (None: unset)
    for this call only."""
    capfd.readouterr()  # the test's own earlier output is not the command's
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (env or {}).items():
            if value is None:
                patch.delenv(name, raising=False)
            else:
                patch.setenv(name, value)
        try:
            status = cli.main(list(args))
        except SystemExit as exc:
            status = _exit_status(exc)
    out, err = capfd.readouterr()
    return CliResult(args=args, returncode=status, stdout=out, stderr=err)


Motionserve = Callable[..., CliResult]


def motionserve_fixture(capfd: pytest.CaptureFixture[str]) -> Motionserve:
    def run(*args: str, env: Mapping[str, str | None] | None = None) -> CliResult:
        return run_in_process(capfd, *map(str, args), env=env)

    return run


def assert_user_error(result: CliResult, phrase: str) -> None:
    """Exit 2 and exactly one `error:` line on stderr, holding `phrase`; no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and phrase in error_lines[0], result.stderr
