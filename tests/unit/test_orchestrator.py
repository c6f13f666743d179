"""Orchestration over the in-process stages: chained keys, cache hits that read no frames,
chunk spans, and bad input that leaves nothing behind."""

from __future__ import annotations

import asyncio
import gc
import weakref

import av
import numpy as np
import pytest

from deployments import errors
from serve import local_run, orchestrator
from serve.config import AppArgs
from serve.local_run import LocalStages, edit_video
from serve.orchestrator import MAX_CHUNK_RETRIES, chunk_spans
from serve.pipeline import Plan, make_plan
from serve.schemas import JobRequest
from serve.stages import job_keys
from serve.storage import LocalStore
from tests.conftest import FAST_OVERRIDES


def request(styles=("smooth",)) -> JobRequest:
    return JobRequest(prompt="a dancer", styles=list(styles), preset="draft", seed=1,
                      overrides=FAST_OVERRIDES)  # fmt: skip


def test_repeat_with_same_video_and_style_reads_no_frames(short_clip, tmp_path, monkeypatch):
    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    first = asyncio.run(edit_video(short_clip, tmp_path / "a.mp4", request(), args))
    assert first["plan"]["work_units"]["unet_evals"] > 0

    def no_video_reading(*args, **kwargs):
        raise AssertionError("a cache hit must not open the video")

    monkeypatch.setattr(av, "open", no_video_reading)
    second = asyncio.run(edit_video(short_clip, tmp_path / "b.mp4", request(), args))
    hits = {s["stage"]: (s["calls"], s["cache_hits"]) for s in second["plan"]["stages"]}
    assert hits["pose"] == (1, 1) and hits["motion"] == (1, 1)
    assert hits["segment"][0] == hits["segment"][1] > 0
    assert "diffusion" not in hits and "render" not in hits


def test_keys_chain_and_change_with_settings():
    base = make_plan("draft", 640, 360, model_id="tiny", styles=["smooth"])
    mirrored = base.model_copy(update={"styles": ["mirror"]})
    slower = base.model_copy(update={"decode": base.decode.model_copy(update={"fps": 8})})
    a, b, c = (job_keys("f" * 64, plan) for plan in (base, mirrored, slower))
    assert (a.source, a.decode, a.pose) == (b.source, b.decode, b.pose)
    assert a.motion != b.motion
    assert c.decode != a.decode and c.pose != a.pose and c.motion != a.motion


def test_chunk_spans_cover_every_frame_once():
    assert chunk_spans(40, 16) == [(0, 16), (16, 32), (32, 40)]
    assert chunk_spans(16, 16) == [(0, 16)]
    assert chunk_spans(0, 16) == []


def test_bad_input_leaves_nothing_in_storage(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 5000)
    store = tmp_path / "store"
    args = AppArgs(storage_uri=str(store), upscaler_model="lanczos")
    with pytest.raises(errors.CorruptVideoError):
        asyncio.run(edit_video(corrupt, tmp_path / "out.mp4", request(), args))
    assert list(LocalStore(store).list("")) == []
    assert not (tmp_path / "out.mp4").exists()


def test_invalid_style_is_rejected_by_the_plan():
    with pytest.raises(errors.InvalidSettingError, match="exaggerate"):
        Plan(styles=["wobble"])


# --- chunks whose replica died ------------------------------------------------------------------


class ReplicaDied(Exception):
    """Stands in for Ray's ActorDiedError: an infrastructure failure."""


class FlakyStages(LocalStages):
    """Diffusion of chunk 1 fails `failures` times with `error`, then works."""

    failures = 1
    error: type[Exception] = ReplicaDied
    calls: list[int] = []

    def generate(self, maps, request, key, plan):
        FlakyStages.calls.append(request.chunk_index)
        if request.chunk_index == 1 and FlakyStages.failures > 0:
            FlakyStages.failures -= 1

            async def fail():
                raise FlakyStages.error("chunk 1 lost its replica")

            return asyncio.ensure_future(fail())
        return super().generate(maps, request, key, plan)

    def is_transient(self, error):
        return isinstance(error, ReplicaDied)


def run_flaky(tmp_path, monkeypatch, failures: int, error=ReplicaDied):
    monkeypatch.setattr(local_run, "LocalStages", FlakyStages)
    monkeypatch.setattr(orchestrator, "RETRY_BACKOFF_S", 0.0)
    FlakyStages.failures, FlakyStages.error, FlakyStages.calls = failures, error, []
    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    job = JobRequest(prompt="a dancer", preset="draft", seed=1,
                     overrides={**FAST_OVERRIDES, "chunk_frames": 4})  # fmt: skip
    return asyncio.run(edit_video(request_clip(tmp_path), tmp_path / "out.mp4", job, args))


def request_clip(tmp_path):
    from deployments.video import EncodeSettings, encode_mp4

    clip = tmp_path / "moving.mp4"  # 1 s: 12 generated frames at 12 fps -> 3 chunks of 4
    frames = np.zeros((25, 96, 128, 3), np.uint8)
    for i, frame in enumerate(frames):
        frame[30:60, 4 * i : 4 * i + 20] = 255
    encode_mp4(iter(frames), clip, EncodeSettings(fps=25))
    return clip


def test_a_chunk_whose_replica_died_runs_again_and_the_job_completes(tmp_path, monkeypatch):
    report = run_flaky(tmp_path, monkeypatch, failures=MAX_CHUNK_RETRIES)
    # chunk 0's pipeline shares chunk 1's generation (its next frames), so both ran again
    assert FlakyStages.calls.count(1) >= MAX_CHUNK_RETRIES + 1
    # every failed pipeline is counted once in the report: chunk 1's own failures, and those of
    # chunk 0 whose pipeline waited on the same failed generation call
    assert MAX_CHUNK_RETRIES <= report["chunk_retries"] <= 2 * MAX_CHUNK_RETRIES
    with av.open(str(tmp_path / "out.mp4")) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 25  # the 1 s clip at the draft preset's 25 fps: no chunk missing
    # Each chunk's generation is billed once: a retry that finds the frames this job already
    # generated bills the first run's record (a cache hit of another job would be free).
    assert report["plan"]["work_units"] == report["plan"]["predicted_work_units"]


def test_a_chunk_that_keeps_failing_fails_the_job(tmp_path, monkeypatch):
    with pytest.raises(ReplicaDied):
        run_flaky(tmp_path, monkeypatch, failures=100)
    # each of the two pipelines that need chunk 1's generation tries at most 1 + retries times
    assert MAX_CHUNK_RETRIES + 1 <= FlakyStages.calls.count(1) <= 2 * (MAX_CHUNK_RETRIES + 1)
    assert not (tmp_path / "out.mp4").exists()


def test_an_error_of_the_stage_code_is_not_retried(tmp_path, monkeypatch):
    with pytest.raises(ValueError):
        run_flaky(tmp_path, monkeypatch, failures=1, error=ValueError)
    assert FlakyStages.calls.count(1) == 1


class StuckChainStages(FlakyStages):
    """As Serve does with a call whose argument is a lost replica's result: the upscale given
    a failed generation never answers (its router retries it forever)."""

    def upscale(self, generated, next_generated, plan, chunk):
        async def run():
            inputs = [g for g in (generated, next_generated) if g is not None]
            await asyncio.wait(inputs)
            if any(not g.cancelled() and g.exception() is not None for g in inputs):
                await asyncio.Event().wait()  # stuck until cancelled
            return await LocalStages.upscale(self, generated, next_generated, plan, chunk)

        return asyncio.ensure_future(run())


def test_a_chunk_stuck_behind_a_lost_generation_is_cancelled_and_retried(tmp_path, monkeypatch):
    """The orchestrator watches each chunk's generation calls itself: when one fails, the
    chunk's calls chained on it are cancelled and the chunk runs again."""
    monkeypatch.setattr(local_run, "LocalStages", StuckChainStages)
    monkeypatch.setattr(orchestrator, "RETRY_BACKOFF_S", 0.0)
    FlakyStages.failures, FlakyStages.error, FlakyStages.calls = 1, ReplicaDied, []
    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    job = JobRequest(prompt="a dancer", preset="draft", seed=1,
                     overrides={**FAST_OVERRIDES, "chunk_frames": 4})  # fmt: skip
    run = edit_video(request_clip(tmp_path), tmp_path / "out.mp4", job, args)
    report = asyncio.run(asyncio.wait_for(run, 120))
    assert report["chunk_retries"] >= 1
    assert report["plan"]["work_units"] == report["plan"]["predicted_work_units"]
    assert (tmp_path / "out.mp4").stat().st_size > 0


class FlakyKeyframeStages(LocalStages):
    """The anchor keyframe's generation (frame 0 alone, `stages.keyframe_plan`: no anchor of
    its own) fails `failures` times with a lost replica, then works."""

    failures = 1
    keyframe_calls = 0

    def generate(self, maps, request, key, plan):
        if plan.generation.anchor == "off":
            FlakyKeyframeStages.keyframe_calls += 1
            if FlakyKeyframeStages.failures > 0:
                FlakyKeyframeStages.failures -= 1

                async def fail():
                    raise ReplicaDied("the keyframe lost its replica")

                return asyncio.ensure_future(fail())
        return super().generate(maps, request, key, plan)

    def is_transient(self, error):
        return isinstance(error, ReplicaDied)


def test_a_lost_anchor_keyframe_is_generated_again_and_billed_once(tmp_path, monkeypatch):
    monkeypatch.setattr(local_run, "LocalStages", FlakyKeyframeStages)
    monkeypatch.setattr(orchestrator, "RETRY_BACKOFF_S", 0.0)
    FlakyKeyframeStages.failures, FlakyKeyframeStages.keyframe_calls = 2, 0
    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    job = JobRequest(prompt="a dancer", preset="draft", seed=1, coherence={"anchor": True},
                     overrides={**FAST_OVERRIDES, "chunk_frames": 4})  # fmt: skip
    report = asyncio.run(edit_video(request_clip(tmp_path), tmp_path / "out.mp4", job, args))
    assert FlakyKeyframeStages.keyframe_calls == 3  # two lost, the third made it
    assert report["chunk_retries"] == 2
    assert report["plan"]["work_units"] == report["plan"]["predicted_work_units"]


def test_a_job_without_failures_reports_no_retries(tmp_path, monkeypatch):
    report = run_flaky(tmp_path, monkeypatch, failures=0)
    assert report["chunk_retries"] == 0
    assert FlakyStages.calls.count(1) == 1


def test_serve_treats_lost_replicas_and_nodes_as_transient():
    """What a hard-killed spot node does to the calls in flight (ActorUnavailableError, then
    ActorDiedError; chained calls get Serve's wrapper caused by it) is retried; errors of the
    stage's code and a deployment that failed to deploy are not."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
    from ray.serve.exceptions import DeploymentUnavailableError, RayServeException

    from serve.app import ServeStages

    stages = ServeStages({}, ctx=None)
    unavailable = ActorUnavailableError("node unreachable", actor_id=None)
    upstream = RayServeException("upstream actor died")
    upstream.__cause__ = ActorDiedError()
    in_task = RayTaskError("generate", "traceback", unavailable).as_instanceof_cause()
    for error in (unavailable, ActorDiedError(), upstream, in_task):
        assert stages.is_transient(error), error
    for error in (ValueError("bad frames"), DeploymentUnavailableError("diffusion")):
        assert not stages.is_transient(error), error


def test_frames_this_job_generated_are_billed_once_and_another_jobs_are_free(tmp_path):
    from serve.factory import stage_context
    from serve.stages import StageRecord, cached_generation, store_generation

    ctx = stage_context(AppArgs(storage_uri=str(tmp_path / "store")))
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    work = StageRecord(stage="diffusion", chunk=3, cpu_s=1.5, work_units={"total": 7.0})
    store_generation(ctx, "ab" * 32, frames, job_id="job-a", record=work)
    (own,) = cached_generation(ctx, "ab" * 32, 3, job_id="job-a").records
    (other,) = cached_generation(ctx, "ab" * 32, 3, job_id="job-b").records
    assert (own.cache_hit, own.cpu_s, own.work_units) == (False, 1.5, {"total": 7.0})
    assert "billed once" in own.notes[-1]
    assert other.cache_hit and other.cpu_s == 0 and not other.work_units


def test_a_failed_consistency_metric_is_reported_and_the_job_completes(tmp_path, monkeypatch):
    """The metric runs after the result is made: its failure is in the report, not a failed
    job, and the cost figures do not depend on it."""

    def broken(*args, **kwargs):
        raise RuntimeError("decoder gave up")

    monkeypatch.setattr(local_run.stages, "result_consistency", broken)
    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    job = JobRequest(prompt="a dancer", preset="draft", seed=1, overrides=FAST_OVERRIDES)
    report = asyncio.run(edit_video(request_clip(tmp_path), tmp_path / "out.mp4", job, args))
    assert report["consistency"] == {"error": "RuntimeError: decoder gave up"}
    assert report["plan"]["work_units"] == report["plan"]["predicted_work_units"]
    assert (tmp_path / "out.mp4").stat().st_size > 0


class TrackedStages(FlakyStages):
    """FlakyStages that keep a weak reference to every generation call they return."""

    made: list[weakref.ref] = []

    def generate(self, maps, request, key, plan):
        call = super().generate(maps, request, key, plan)
        TrackedStages.made.append(weakref.ref(call))
        return call


def _may_hold_frames(call) -> bool:
    """A live generation call that made frames or may still make them."""
    if call is None:
        return False
    return not call.done() or not (call.cancelled() or call.exception() is not None)


def test_a_retried_job_holds_no_generation_call_once_it_ends(tmp_path, monkeypatch):
    """On Serve a generation call held by the ingress pins its frames in a GPU node's object
    store, and a node holding objects is never idle (it was not scaled down). A retried
    chunk's error traceback is a reference cycle through the orchestrator's frames: with the
    cycle collector off, as between its runs, nothing may outlive the job but garbage."""
    TrackedStages.made = []
    gc.collect()
    gc.disable()
    try:
        monkeypatch.setattr(local_run, "LocalStages", TrackedStages)
        monkeypatch.setattr(orchestrator, "RETRY_BACKOFF_S", 0.0)
        FlakyStages.failures, FlakyStages.error, FlakyStages.calls = 1, ReplicaDied, []
        args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
        job = JobRequest(prompt="a dancer", preset="draft", seed=1,
                         overrides={**FAST_OVERRIDES, "chunk_frames": 4})  # fmt: skip
        report = asyncio.run(edit_video(request_clip(tmp_path), tmp_path / "out.mp4", job, args))
        # Calls with frames are what a GPU node's store would hold; a failed call holds only
        # its error (a task that raised is in a cycle of Python's own, with its traceback).
        alive = [call() for call in TrackedStages.made if _may_hold_frames(call())]
    finally:
        gc.enable()
    assert report["chunk_retries"] >= 1  # the path under test ran
    assert len(TrackedStages.made) > len(chunk_spans(12, 4))  # a generation was made again
    assert not alive, alive
