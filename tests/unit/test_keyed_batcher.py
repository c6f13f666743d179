"""serve/keyed_batcher.py: per-key micro-batches formed when the device is free."""

import asyncio
import time

import pytest

from serve.keyed_batcher import KeyedBatcher


class Device:
    """A run_batch that records its batches and can be held busy until released."""

    def __init__(self):
        self.batches: list[tuple[str, list]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()

    async def __call__(self, key, items):
        self.batches.append((key, list(items)))
        self.started.set()
        await self.release.wait()
        if any(item == "boom" for item in items):
            raise ValueError("bad item")
        return [f"{key}:{item}" for item in items]


async def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def test_requests_that_arrive_while_busy_are_grouped_by_key():
    async def scenario():
        device = Device()
        batcher = KeyedBatcher(device, max_batch_size=4, wait_timeout_s=0.01)
        device.release.clear()
        first = asyncio.create_task(batcher.submit("a", 0))
        await device.started.wait()  # the device is busy with ("a", [0])
        interleaved = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)]
        calls = [asyncio.create_task(batcher.submit(k, i)) for k, i in interleaved]
        await wait_until(lambda: batcher.waiting == 6)
        device.release.set()
        results = await asyncio.gather(first, *calls)
        return device.batches, results

    batches, results = asyncio.run(scenario())
    assert batches == [("a", [0]), ("a", [1, 2, 3]), ("b", [1, 2, 3])]
    assert results == ["a:0", "a:1", "b:1", "a:2", "b:2", "a:3", "b:3"]  # each caller its own


def test_a_full_group_runs_without_waiting_for_the_timeout():
    async def scenario():
        device = Device()
        batcher = KeyedBatcher(device, max_batch_size=2, wait_timeout_s=60.0)
        together = asyncio.gather(batcher.submit("a", 1), batcher.submit("a", 2))
        return await asyncio.wait_for(together, timeout=10.0), device.batches

    results, batches = asyncio.run(scenario())
    assert results == ["a:1", "a:2"] and batches == [("a", [1, 2])]


def test_a_partial_group_runs_once_its_oldest_request_waited_the_timeout():
    async def scenario():
        batcher = KeyedBatcher(Device(), max_batch_size=4, wait_timeout_s=0.2)
        started = time.monotonic()
        result = await batcher.submit("a", 1)
        return result, time.monotonic() - started

    result, waited = asyncio.run(scenario())
    assert result == "a:1" and waited >= 0.2


def test_the_longest_waiting_key_runs_first_so_no_key_starves():
    async def scenario():
        device = Device()
        batcher = KeyedBatcher(device, max_batch_size=3, wait_timeout_s=0.05)
        device.release.clear()
        busy = asyncio.create_task(batcher.submit("x", 0))
        await device.started.wait()
        calls = [asyncio.create_task(batcher.submit("old", 1))]
        await wait_until(lambda: batcher.waiting == 1)
        calls += [asyncio.create_task(batcher.submit("new", i)) for i in (1, 2)]
        await wait_until(lambda: batcher.waiting == 3)
        device.release.set()
        await asyncio.gather(busy, *calls)
        return [key for key, _ in device.batches]

    assert asyncio.run(scenario()) == ["x", "old", "new"]


def test_a_failing_batch_fails_only_its_callers_and_the_next_batch_runs():
    async def scenario():
        device = Device()
        batcher = KeyedBatcher(device, max_batch_size=2, wait_timeout_s=0.01)
        bad = await asyncio.gather(
            batcher.submit("a", "boom"), batcher.submit("a", 1), return_exceptions=True
        )
        good = await batcher.submit("b", 2)
        return bad, good

    bad, good = asyncio.run(scenario())
    assert all(isinstance(outcome, ValueError) for outcome in bad)
    assert good == "b:2"


def test_a_caller_that_went_away_is_not_run():
    async def scenario():
        device = Device()
        batcher = KeyedBatcher(device, max_batch_size=4, wait_timeout_s=0.01)
        device.release.clear()
        busy = asyncio.create_task(batcher.submit("a", 0))
        await device.started.wait()
        gone = asyncio.create_task(batcher.submit("a", "gone"))
        kept = asyncio.create_task(batcher.submit("a", "kept"))
        await wait_until(lambda: batcher.waiting == 2)
        gone.cancel()
        device.release.set()
        await asyncio.gather(busy, kept)
        return device.batches

    assert asyncio.run(scenario()) == [("a", [0]), ("a", ["kept"])]


def test_a_wrong_number_of_results_is_an_error_for_the_callers():
    async def two_results(key, items):
        return ["x", "y"]

    async def scenario():
        batcher = KeyedBatcher(two_results, max_batch_size=1, wait_timeout_s=0.0)
        return await batcher.submit("a", 1)

    with pytest.raises(RuntimeError, match="2 results for 1"):
        asyncio.run(scenario())


def test_batch_size_changes_at_runtime_and_bad_settings_are_refused():
    async def scenario():
        device = Device()
        batcher = KeyedBatcher(device, max_batch_size=1, wait_timeout_s=0.01)
        await asyncio.gather(*(batcher.submit("a", i) for i in range(2)))
        batcher.configure(max_batch_size=2, wait_timeout_s=60.0)
        await asyncio.wait_for(
            asyncio.gather(*(batcher.submit("a", i) for i in range(2, 4))), timeout=10.0
        )
        return [items for _, items in device.batches]

    assert asyncio.run(scenario()) == [[0], [1], [2, 3]]
    with pytest.raises(ValueError):
        KeyedBatcher(Device(), max_batch_size=0)
    with pytest.raises(ValueError):
        KeyedBatcher(Device(), wait_timeout_s=-1)


def test_a_cancelled_queued_request_leaves_the_queue_at_once():
    async def scenario():
        device = Device()
        batcher = KeyedBatcher(device, max_batch_size=4, wait_timeout_s=0.0)
        device.release.clear()
        first = asyncio.create_task(batcher.submit("a", 0))
        await device.started.wait()  # ("a", [0]) runs; the rest queue behind it
        batcher.configure(4, 60.0)  # and would wait for more of their key
        queued = [asyncio.create_task(batcher.submit("b", i)) for i in range(3)]
        await wait_until(lambda: batcher.waiting == 3)
        queued[1].cancel()
        await asyncio.gather(queued[1], return_exceptions=True)
        waiting_after_cancel = batcher.waiting  # no batch has formed in between
        for task in (queued[0], queued[2]):
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        emptied = batcher.waiting
        device.release.set()
        await first
        batcher.configure(4, 0.0)
        late = await asyncio.wait_for(batcher.submit("c", 9), timeout=10.0)
        return waiting_after_cancel, emptied, device.batches, late

    waiting_after_cancel, emptied, batches, late = asyncio.run(scenario())
    assert waiting_after_cancel == 2
    assert emptied == 0
    assert [key for key, _ in batches] == ["a", "c"]  # no batch of cancelled "b" requests ran
    assert late == "c:9"


def test_a_cancelled_request_in_the_running_batch_is_reported_to_run_batch():
    async def scenario():
        device = Device()
        batcher = KeyedBatcher(device, max_batch_size=4, wait_timeout_s=0.0)
        device.release.clear()
        calls = [asyncio.create_task(batcher.submit("a", i)) for i in range(3)]
        await device.started.wait()
        before = (batcher.running, dict(batcher.cancelled_in_batch()))
        calls[1].cancel()
        await asyncio.gather(calls[1], return_exceptions=True)
        reported = batcher.cancelled_in_batch()
        device.release.set()
        results = await asyncio.gather(calls[0], calls[2])
        return before, reported, results, batcher.running

    before, reported, results, running_after = asyncio.run(scenario())
    assert before == (3, {})
    assert list(reported) == [1] and reported[1] > 0
    assert results == ["a:0", "a:2"]  # the others still get their results
    assert running_after == 0
