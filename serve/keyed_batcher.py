"""Micro-batches grouped by batch key, formed only when the device is free.

Why not `@serve.batch` alone: Ray Serve closes a batch `batch_wait_timeout_s` after its first
request, even while the previous batch still runs, and only then splits it by multiplexed model
id. Under spread-out arrivals that closes batches of one while a backlog builds behind a busy
GPU, and with K interleaved keys each batch holds ~max_batch_size/K requests
(benchmarks/batching.py measured a fill of 0.25 at every rate with 2-3 keys). Here requests wait
in one queue per key, and a batch is taken only when the previous one has finished, so whatever
arrived meanwhile is already grouped:

- a full group (max_batch_size requests of one key) runs first, the oldest such group first;
- otherwise the group whose oldest request has waited longest runs once that request has waited
  `batch_wait_timeout_s` (or its group fills up first), so no key starves;
- batches run one at a time (one device);
- a request whose caller goes away (cancelled) leaves its queue at once; one already in the
  running batch is reported by `cancelled_in_batch()`, which `run_batch` may poll to stop its
  work early (the diffusion engine drops such rows at its next step). Its result is discarded.

Ray-free (asyncio only), so it is tested as a plain object; `serve/app.py` uses it in the
diffusion deployment.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

RunBatch = Callable[[Hashable, list[Any]], Awaitable[Sequence[Any]]]


@dataclass
class _Waiting:
    item: Any
    future: asyncio.Future
    since: float = field(default_factory=time.monotonic)
    cancelled_at: float | None = None  # monotonic time the caller went away


class KeyedBatcher:
    """`await submit(key, item)` returns `run_batch(key, items)[i]` for that item.

    `run_batch` gets up to `max_batch_size` items of one key and must return one result per
    item, in order; if it raises, every caller of that batch gets the exception.
    """

    def __init__(self, run_batch: RunBatch, max_batch_size: int = 4, wait_timeout_s: float = 0.05):
        self._run_batch = run_batch
        self.configure(max_batch_size, wait_timeout_s)
        self._groups: dict[Hashable, deque[_Waiting]] = {}
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        # The batch run_batch is running; replaced, never mutated, so another thread (the one
        # computing the batch) may read it through cancelled_in_batch().
        self._running: tuple[_Waiting, ...] = ()

    def configure(self, max_batch_size: int, wait_timeout_s: float) -> None:
        """Runtime settings (the deployment's user_config); the next batch uses them."""
        if max_batch_size < 1 or wait_timeout_s < 0:
            raise ValueError("max_batch_size must be >= 1 and wait_timeout_s >= 0")
        self.max_batch_size = int(max_batch_size)
        self.wait_timeout_s = float(wait_timeout_s)

    @property
    def waiting(self) -> int:
        """Requests queued and not yet in a running batch."""
        return sum(len(group) for group in self._groups.values())

    @property
    def running(self) -> int:
        """Requests in the running batch (0 between batches), cancelled ones included until
        the batch ends."""
        return len(self._running)

    def cancelled_in_batch(self) -> dict[int, float]:
        """Positions in the running batch's items of requests whose caller went away, with the
        monotonic time each went away. Safe to call from another thread."""
        batch = self._running
        return {i: w.cancelled_at for i, w in enumerate(batch) if w.cancelled_at is not None}

    async def submit(self, key: Hashable, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        waiting = _Waiting(item, loop.create_future())
        self._groups.setdefault(key, deque()).append(waiting)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        try:
            return await waiting.future
        except asyncio.CancelledError:
            waiting.cancelled_at = time.monotonic()
            self._leave_queue(key, waiting)
            raise

    def _leave_queue(self, key: Hashable, waiting: _Waiting) -> None:
        """A cancelled request stops counting as queued now, not when the next batch forms."""
        group = self._groups.get(key)
        if group is None or waiting not in group:
            return  # in the running batch (or done): cancelled_in_batch() reports it
        group.remove(waiting)
        if not group:
            del self._groups[key]
        self._arrived.set()  # the worker may be timing out a head that just left

    async def _work(self) -> None:
        while True:
            key = await self._next_key()
            await self._run(key, self._take(key))

    async def _next_key(self) -> Hashable:
        """The key of the next batch, waiting for a group to fill or its head to time out."""
        while True:
            self._drop_cancelled()
            if not self._groups:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            full = [k for k, g in self._groups.items() if len(g) >= self.max_batch_size]
            if full:
                return min(full, key=lambda k: self._groups[k][0].since)
            oldest = min(self._groups, key=lambda k: self._groups[k][0].since)
            left = self._groups[oldest][0].since + self.wait_timeout_s - time.monotonic()
            if left <= 0:
                return oldest
            self._arrived.clear()
            try:  # a new arrival may fill some group before the oldest head times out
                await asyncio.wait_for(self._arrived.wait(), timeout=left)
            except TimeoutError:
                pass

    def _take(self, key: Hashable) -> list[_Waiting]:
        """Up to max_batch_size of the key's requests; called right after _next_key dropped
        the cancelled ones, with no await between."""
        group = self._groups[key]
        batch = [group.popleft() for _ in range(min(self.max_batch_size, len(group)))]
        if not group:
            del self._groups[key]
        return batch

    def _drop_cancelled(self) -> None:
        for key in list(self._groups):
            group = deque(w for w in self._groups[key] if not w.future.done())
            if group:
                self._groups[key] = group
            else:
                del self._groups[key]

    async def _run(self, key: Hashable, batch: list[_Waiting]) -> None:
        self._running = tuple(batch)
        try:
            results = await self._run_batch(key, [w.item for w in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)}")
        except Exception as exc:  # every caller of the batch hears of it; the worker goes on
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            return
        finally:
            self._running = ()
        for waiting, result in zip(batch, results, strict=True):
            if not waiting.future.done():
                waiting.future.set_result(result)
