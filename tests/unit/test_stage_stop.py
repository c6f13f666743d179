"""A cancelled stage stops at its next frame batch and writes nothing (deployments/stopping.py).

Each stage gets a stop flag that is set while its first frame batch runs (as a cancel arriving
mid-call would set it): the batch in progress finishes, no later batch starts, `Stopped` is
raised and neither the cache nor the store holds anything of the call. The same call without a
flag runs every batch and writes its result (so the counts could fail).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from deployments import interpolate, pose, video
from deployments.stopping import Stopped, check_stop, until_stopped
from deployments.tiny_models import build_tiny_compact
from deployments.upscale import Upscaler, UpscaleSettings
from serve import stages
from serve.cache import hash_file
from serve.config import AppArgs
from serve.factory import stage_context
from serve.local_run import LocalStages
from serve.pipeline import make_plan
from serve.stages import Frames
from tests.media import make_clip


@pytest.fixture
def ctx(tmp_path):
    return stage_context(AppArgs(storage_uri=str(tmp_path / "store")))


def stored_keys(ctx) -> list[str]:
    return list(ctx.store.list())


def test_check_stop_and_until_stopped():
    check_stop(None)
    check_stop(lambda: False)
    with pytest.raises(Stopped, match="stopped upscaling"):
        check_stop(lambda: True, "upscaling")
    asked = []
    items = until_stopped(range(10), lambda: asked.append(1) or len(asked) > 2, every=3)
    with pytest.raises(Stopped):
        list(items)
    assert len(asked) == 3  # asked before items 0, 3 and 6: items 0..5 went through
    assert list(until_stopped(range(3), None)) == [0, 1, 2]


# ------------------------------------------------------------------------------- upscale


class CountingUpscaler(Upscaler):
    """A real upscaler that counts its frame batches and sets `stop` during the first."""

    def __init__(self, settings: UpscaleSettings, stop: threading.Event | None):
        super().__init__(settings)
        self.stop, self.batches, self.resampled = stop, 0, 0

    def model_upscale(self, frames):
        self.batches += 1
        if self.stop is not None:
            self.stop.set()  # the cancel arrives while this batch runs
        return super().model_upscale(frames)

    def _resample(self, frame, size):
        self.resampled += 1
        if self.stop is not None:
            self.stop.set()
        return super()._resample(frame, size)


@pytest.fixture(scope="module")
def tiny_compact(tmp_path_factory):
    return build_tiny_compact(tmp_path_factory.mktemp("tiny") / "compact.safetensors", seed=0)


def frames_of(count: int, height: int = 24, width: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (count, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("model", [True, False], ids=["model", "resample"])
def test_upscale_stops_at_its_next_batch(tiny_compact, model):
    weights = str(tiny_compact) if model else None
    settings = UpscaleSettings(weights=weights, device="cpu", batch_frames=2)
    generated, following = Frames(frames_of(7)), Frames(frames_of(2))  # 8 frames: 4 batches

    full = CountingUpscaler(settings, stop=None)
    done = stages.upscale_chunk(full, generated, following, (64, 48), chunk=0)
    assert done.frames.shape == (8, 48, 64, 3)
    assert (full.batches, full.resampled) == ((4, 0) if model else (0, 8))

    stop = threading.Event()
    stopped = CountingUpscaler(settings, stop)
    with pytest.raises(Stopped):
        stages.upscale_chunk(stopped, generated, following, (64, 48), 0, should_stop=stop.is_set)
    # the batch running when the flag was set finished; the next three never started
    assert (stopped.batches, stopped.resampled) == ((1, 0) if model else (0, 2))


# ---------------------------------------------------------------------------------- pose


def test_pose_extraction_stops_at_its_next_frame_and_caches_nothing(ctx, tmp_path, monkeypatch):
    clip = make_clip(tmp_path / "clip.mp4", frames=12, fps=12.0, width=128, height=96)
    plan = make_plan("draft", 128, 96, model_id="tiny")
    keys = stages.job_keys(hash_file(clip), plan)
    processed = []
    stop = threading.Event()
    real = pose.PoseExtractor._process

    def counting(pose_graph, frame, out):
        processed.append(1)
        if stop_after[0] is not None and len(processed) >= stop_after[0]:
            stop.set()
        return real(pose_graph, frame, out)

    monkeypatch.setattr(pose.PoseExtractor, "_process", staticmethod(counting))
    stop_after = [2]
    with pytest.raises(Stopped):
        stages.extract_pose(ctx, str(clip), keys, plan, stop.is_set)
    assert len(processed) == 2  # the frame in MediaPipe when the flag was set was the last
    assert not ctx.cache.contains(keys.pose) and stored_keys(ctx) == []

    processed.clear()
    stop_after = [None]
    decode, poses = stages.extract_pose(ctx, str(clip), keys, plan, threading.Event().is_set)
    assert decode.frames == poses.frames == len(processed) == 12
    assert ctx.cache.contains(keys.pose)


def test_a_stopped_call_waiting_for_another_does_no_work_at_all(ctx):
    """A call queued behind MEASURE_LOCK and cancelled meanwhile stops once it gets the lock,
    before reading any input."""
    plan = make_plan("draft", 128, 96, model_id="tiny")
    keys = stages.job_keys("0" * 64, plan)
    with pytest.raises(Stopped):  # the input does not even exist: it was never fetched
        stages.extract_pose(ctx, "inputs/missing.mp4", keys, plan, lambda: True)
    with pytest.raises(Stopped):
        stages.edit_motion(ctx, keys, plan, lambda: True)
    assert stored_keys(ctx) == []


# ---------------------------------------------------------------------------- interpolate


def test_interpolation_stops_at_its_next_pair():
    plan = make_plan("draft", 128, 96, model_id="tiny", output_fps=24.0)
    assert plan.output_fps > plan.generation.fps  # in-between frames to compute
    small = frames_of(6, 24, 32)
    upscaled = Frames(frames_of(6, 48, 64), guides=small)
    backend = interpolate.make_backend(plan.interpolation)
    pairs = []
    stop = threading.Event()
    real = backend.interpolate_with_flow_from

    def counting(*args):
        pairs.append(1)
        if set_stop:
            stop.set()
        return real(*args)

    backend.interpolate_with_flow_from = counting
    set_stop = False
    full = stages.interpolate_chunk(backend, upscaled, 0, 5, 6, plan, 0)
    assert len(pairs) == 5 and len(full.frames) > 5

    pairs.clear()
    set_stop = True
    with pytest.raises(Stopped):
        stages.interpolate_chunk(backend, upscaled, 0, 5, 6, plan, 0, stop.is_set)
    assert len(pairs) == 1


# --------------------------------------------------------------------------- encode, join


def counting_flag(stop_at: int):
    """A should_stop that answers True from its `stop_at`-th question on; counts them."""
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) >= stop_at

    return should_stop, asked


def test_encode_stops_at_its_next_frame_and_stores_no_segment(ctx, tmp_path):
    plan = make_plan("draft", 128, 96, model_id="tiny")
    frames = Frames(frames_of(10, 48, 64))
    key = "ab" * 32
    should_stop, asked = counting_flag(4)
    with pytest.raises(Stopped):
        stages.encode_segment(ctx, frames, key, plan, 0, True, should_stop)
    assert len(asked) == 4  # once before encoding, then before frames 0, 1 and 2
    assert not ctx.cache.contains(key) and stored_keys(ctx) == []

    path = tmp_path / "out.mp4"
    with pytest.raises(Stopped):
        video.encode_mp4(frames.frames, path, plan.output_encoding(), counting_flag(5)[0])
    assert list(tmp_path.iterdir()) == [tmp_path / "store"]  # no result, no partial file

    stages.encode_segment(ctx, frames, key, plan, 0, True, counting_flag(1000)[0])
    assert ctx.cache.get_meta(key)["frames"] == 10


def test_join_stops_between_segments_and_stores_no_result(ctx):
    plan = make_plan("draft", 128, 96, model_id="tiny")
    segment_keys = []
    for chunk in range(3):
        key = f"{chunk:02d}" * 32
        stages.encode_segment(ctx, Frames(frames_of(4, 48, 64)), key, plan, chunk, True)
        segment_keys.append(key)
    before = set(stored_keys(ctx))
    should_stop, asked = counting_flag(2)
    with pytest.raises(Stopped):
        stages.join_segments(ctx, segment_keys, plan, "results/r.mp4", None, True, should_stop)
    assert len(asked) == 2 and set(stored_keys(ctx)) == before
    record = stages.join_segments(ctx, segment_keys, plan, "results/r.mp4", None, True)
    assert record.frames == 12 and ctx.store.exists("results/r.mp4")


# ------------------------------------------------------------ the async wrapper, in process


def test_stoppable_sets_the_flag_on_cancel_and_waits_for_the_work_to_stop():
    log = []

    def work(batches: int, should_stop) -> int:
        for batch in range(batches):
            check_stop(should_stop)
            log.append(("batch", batch))
            time.sleep(0.02)  # one frame batch of work
        return batches

    async def main():
        assert await stages.stoppable(work, 3) == 3
        log.clear()
        task = asyncio.ensure_future(stages.stoppable(work, 10_000))
        while not log:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        log.append("cancel returned")

    asyncio.run(main())
    # the cancellation returned only after the thread stopped, within a batch of the cancel
    assert log[-1] == "cancel returned" and len(log) < 20


def test_in_process_a_cancelled_upscale_task_stops_its_thread(tiny_compact, ctx):
    """LocalStages (motionserve edit, demo): cancelling a chunk's task stops its upscaler."""
    settings = UpscaleSettings(weights=str(tiny_compact), device="cpu", batch_frames=1)
    started = threading.Event()

    class Slow(CountingUpscaler):
        def model_upscale(self, frames):
            started.set()
            return super().model_upscale(frames)

    upscaler = Slow(settings, stop=None)
    calls = LocalStages(ctx, engine=None, upscaler=upscaler)
    plan = make_plan("draft", 128, 96, model_id="tiny")
    plan = plan.model_copy(update={"output_width": 256, "output_height": 192})

    async def main():
        generated = asyncio.get_running_loop().create_future()
        generated.set_result(Frames(frames_of(400, 48, 64)))
        task = calls.upscale(generated, None, plan, 0)
        await asyncio.to_thread(started.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return upscaler.batches

    batches = asyncio.run(main())
    assert 1 <= batches < 50  # stopped at a batch boundary, long before the 400th
    assert upscaler.batches == batches  # and nothing ran after the cancel returned
