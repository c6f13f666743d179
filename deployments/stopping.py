"""Cooperative stop for a stage's frame loop.

A stage call that runs in a worker thread cannot be interrupted from outside: when its caller
is cancelled (a job cancelled, a Serve `DeploymentResponse.cancel()`), the caller sets a flag
and the loop looks at it between frame batches, through a `ShouldStop` callable
(`threading.Event().is_set` fits). The loop then raises `Stopped` before it writes anything, so
a stopped stage leaves no partial artifact: stages write their result only after their loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

# True once the caller no longer wants the result; None: nobody will ask the work to stop.
ShouldStop = Callable[[], bool]

T = TypeVar("T")


class Stopped(Exception):
    """The work stopped because its caller asked it to (the call was cancelled). Not a failure
    of the input nor of the code: nobody is waiting for this call's result any more."""


def check_stop(should_stop: ShouldStop | None, where: str = "") -> None:
    """Raise `Stopped` if the caller asked to stop."""
    if should_stop is not None and should_stop():
        raise Stopped(f"stopped{' ' + where if where else ''}: the call was cancelled")


def until_stopped(
    items: Iterable[T], should_stop: ShouldStop | None, where: str = "", every: int = 1
) -> Iterator[T]:
    """`items`, checking `should_stop` before each `every`-th one (a frame batch)."""
    if should_stop is None:
        yield from items
        return
    for index, item in enumerate(items):
        if index % every == 0:
            check_stop(should_stop, where)
        yield item


class StopFlag:
    """A `ShouldStop` its caller sets from another thread; counts how often the work asked
    (one question per frame batch begun), so a server can show how far a call got."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.asked = 0

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __call__(self) -> bool:
        self.asked += 1
        return self._event.is_set()
