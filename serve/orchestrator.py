"""Runs a job's plan over stage calls, chunk by chunk, with checkpoints.

The orchestrator only holds keys and small results. Frames flow from call to call as awaitable
handles: on Ray Serve those are `DeploymentResponse`s passed straight into the next deployment's
call (the frames stay in Ray's object store and never reach the ingress); in process they are
asyncio tasks (`LocalStages`). Each chunk ends as an encoded segment under a content key and a
checkpoint in the manifest, so a repeat or a resumed job skips finished chunks and a restart
loses at most the chunks in flight. When a replica dies, Serve's router re-sends the requests it
held to a replacement; a chunk whose failure still reaches us (its result object lost with a
node, a worker crash) runs again, up to `MAX_CHUNK_RETRIES` times. An error of the stage's own
code is not retried (it would fail the same way). Work a dead replica had done is not in the
report (its records died with it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Protocol

from deployments import diffusion, interpolate, upscale
from serve import stages
from serve.cache import hash_file
from serve.cost import build_report
from serve.jobs import JobManifest
from serve.pipeline import Plan
from serve.stages import Frames, JobKeys, StageContext, StageRecord

logger = logging.getLogger(__name__)

# A dead replica's calls fail at once; new calls wait in Serve's router until a replacement
# replica is up (as from zero). 1 + 2 + 4 s covers the controller noticing the death.
MAX_CHUNK_RETRIES = 3
RETRY_BACKOFF_S = 1.0  # doubled per retry of the same chunk


class StageCalls(Protocol):
    """The stage calls a plan needs. Chunk calls return awaitables that later calls accept."""

    async def ready(self) -> bool: ...
    async def upscaler_identity(self) -> dict[str, Any]: ...
    async def pose(self, input_ref: str, keys: JobKeys, plan: Plan) -> StageRecord: ...
    async def motion(self, keys: JobKeys, plan: Plan) -> StageRecord: ...
    def render(self, keys, plan, chunk: int, span: tuple[int, int]) -> Awaitable[Frames]: ...
    def generate(self, maps, request: dict[str, Any], key: str, plan) -> Awaitable: ...
    def upscale(self, generated, next_generated, plan, chunk: int) -> Awaitable[Frames]: ...
    def interpolate(self, upscaled, first, count, total, plan, chunk) -> Awaitable[Frames]: ...
    def encode(self, frames, key: str, plan, chunk: int) -> Awaitable[tuple]: ...
    async def join(self, segment_keys, plan, result_key, audio) -> StageRecord: ...
    async def has_segment(self, key: str) -> bool: ...
    async def has_generation(self, key: str) -> bool: ...
    def is_transient(self, error: BaseException) -> bool:
        """True for an infrastructure failure worth retrying (a dead replica or node)."""
        ...


def chunk_spans(frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_frames, frames)) for start in range(0, frames, chunk_frames)]


class Orchestrator:
    """Turns a manifest into a result MP4 and a cost report."""

    def __init__(self, calls: StageCalls, result_key_for, *, max_chunks_in_flight: int = 4,
                 tier: str = "local", gpu_fraction: float = 1.0):  # fmt: skip
        self.calls = calls
        self.result_key_for = result_key_for
        self.max_chunks_in_flight = max_chunks_in_flight
        self.tier = tier
        self.gpu_fraction = gpu_fraction

    async def ready(self) -> bool:
        return await self.calls.ready()

    async def run(self, manifest: JobManifest, events) -> tuple[str, dict[str, Any]]:
        plan = Plan.model_validate(manifest.plan)
        keys = stages.job_keys(manifest.input_sha256, plan)
        events.check_cancelled()
        events.record([await self.calls.pose(manifest.input_key, keys, plan)])
        events.progress("pose", 1, 1)
        events.check_cancelled()
        motion_record = await self.calls.motion(keys, plan)
        events.record([motion_record])
        events.progress("motion", 1, 1)
        spans = chunk_spans(motion_record.frames, plan.chunk_frames)
        segment_keys = await self._run_chunks(manifest, plan, keys, spans, events)
        result_key = self.result_key_for(manifest)
        keeps = _keeps_timing(plan, manifest)
        audio = (manifest.input_key, manifest.input_sha256) if keeps else None
        events.check_cancelled()
        events.record([await self.calls.join(segment_keys, plan, result_key, audio)])
        events.progress("join", 1, 1)
        # The ledger holds every attempt's records, so a resumed job's report counts all work.
        ledger = [StageRecord.model_validate(r) for r in events.manifest.ledger]
        report = build_report(
            plan, ledger, frames=motion_record.frames, tier=self.tier, attempts=manifest.attempts
        )
        return result_key, {**report.model_dump(mode="json"), "plan_explained": plan.explain()}

    async def _run_chunks(self, manifest, plan, keys, spans, events) -> list[str]:
        """Run every chunk (records go to the job's ledger); returns the segment keys."""
        request = {
            "prompt": manifest.request.prompt,
            "negative_prompt": manifest.request.negative_prompt,
            "seed": manifest.request.seed if manifest.request.seed is not None else 0,
        }
        gen_keys = [stages.generation_key(keys, plan, span, request) for span in spans]
        identity = await self.calls.upscaler_identity()
        seg_keys = [
            stages.segment_key(plan, gen_keys[i], gen_keys[i + 1] if i + 1 < len(spans) else None,
                               identity)
            for i in range(len(spans))
        ]  # fmt: skip
        cached = await self._cached_generations(plan, gen_keys)
        run = _ChunkRun(self.calls, manifest, plan, keys, spans, request, gen_keys, seg_keys)
        run.cached_generations = cached
        await run.all(events, self.max_chunks_in_flight)
        return seg_keys

    async def _cached_generations(self, plan: Plan, gen_keys: list[str]) -> set[int]:
        """Chunks whose generated frames are cached: their pose maps need not be rendered."""
        if not plan.cache:
            return set()
        found = await asyncio.gather(*(self.calls.has_generation(key) for key in gen_keys))
        return {chunk for chunk, hit in enumerate(found) if hit}


class _ChunkRun:
    """The chunk pipelines of one job: render -> diffusion -> upscale -> interpolate -> encode."""

    def __init__(self, calls, manifest, plan, keys, spans, request, gen_keys, seg_keys):
        self.calls, self.manifest, self.plan, self.keys = calls, manifest, plan, keys
        self.spans, self.request, self.gen_keys, self.seg_keys = spans, request, gen_keys, seg_keys
        self.generated: dict[int, Any] = {}
        self.cached_generations: set[int] = set()
        self.retries: dict[int, int] = {}

    def _generation(self, chunk: int):
        """One diffusion call per chunk, shared by this chunk and the previous one."""
        if chunk not in self.generated:
            cached = chunk in self.cached_generations
            maps = (
                None
                if cached
                else self.calls.render(self.keys, self.plan, chunk, self.spans[chunk])
            )
            fields = {"job_id": self.manifest.job_id, "chunk_index": chunk, **self.request}
            self.generated[chunk] = self.calls.generate(
                maps, fields, self.gen_keys[chunk], self.plan
            )
        return self.generated[chunk]

    def _pipeline(self, chunk: int):
        first, stop = self.spans[chunk]
        has_next = chunk + 1 < len(self.spans)
        upscaled = self.calls.upscale(
            self._generation(chunk),
            self._generation(chunk + 1) if has_next else None,
            self.plan,
            chunk,
        )
        total = self.spans[-1][1]
        frames = self.calls.interpolate(upscaled, first, stop - first, total, self.plan, chunk)
        self.generated.pop(chunk - 1, None)  # no later chunk needs it: free its object
        return self.calls.encode(frames, self.seg_keys[chunk], self.plan, chunk)

    async def all(self, events, window: int) -> None:
        total = len(self.spans)
        done = 0
        pending: dict[asyncio.Future, int] = {}
        for chunk in range(total):
            events.check_cancelled()
            if await self._finished_before(chunk, events):
                done += 1
                events.progress("chunks", done, total)
                continue
            while len(pending) >= window:
                done += await self._collect(pending, events, total, done)
            pending[self._start(chunk)] = chunk
        while pending:
            done += await self._collect(pending, events, total, done)

    def _start(self, chunk: int, delay_s: float = 0.0) -> asyncio.Future:
        async def run():
            if delay_s:
                await asyncio.sleep(delay_s)
            return await self._pipeline(chunk)

        return asyncio.ensure_future(run())

    async def _finished_before(self, chunk: int, events) -> bool:
        """True for a chunk checkpointed by an earlier attempt (its records are in the ledger
        already) or whose segment is cached (recorded as a free hit)."""
        key = self.seg_keys[chunk]
        if self.manifest.checkpoints.get(str(chunk)) == key:
            return True
        if self.plan.cache and await self.calls.has_segment(key):
            hit = StageRecord(stage="segment", chunk=chunk, cache_hit=True)
            events.record([hit], chunk=chunk, key=key)
            return True
        return False

    async def _collect(self, pending: dict, events, total: int, done: int) -> int:
        """Wait for at least one chunk; record the finished ones, restart the retriable failures.
        Returns how many chunks finished."""
        finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        succeeded = 0
        for future in finished:
            chunk = pending.pop(future)
            try:
                key, records = future.result()
            except BaseException as error:  # a cancellation is never retried
                if isinstance(error, Exception) and self._may_retry(chunk, error):
                    delay = RETRY_BACKOFF_S * 2 ** (self.retries[chunk] - 1)
                    pending[self._start(chunk, delay)] = chunk
                    continue
                for other in pending:
                    other.cancel()
                raise
            events.record(records, chunk=chunk, key=key)
            succeeded += 1
        events.progress("chunks", done + succeeded, total)
        events.check_cancelled()
        return succeeded

    def _may_retry(self, chunk: int, error: Exception) -> bool:
        """Whether to run a failed chunk again; if so, its stage calls are made anew (the
        generation cache spares the diffusion work that had finished)."""
        if not self.calls.is_transient(error):
            return False
        if self.retries.get(chunk, 0) >= MAX_CHUNK_RETRIES:
            return False
        self.retries[chunk] = self.retries.get(chunk, 0) + 1
        logger.warning(
            "job %s: chunk %d failed (%s: %s); retry %d of %d",
            self.manifest.job_id, chunk, type(error).__name__, error,
            self.retries[chunk], MAX_CHUNK_RETRIES,
        )  # fmt: skip
        self.generated.pop(chunk, None)  # a response that failed would fail again
        self.generated.pop(chunk + 1, None)
        return True


def _keeps_timing(plan: Plan, manifest: JobManifest) -> bool:
    """Audio only fits when the motion plays at its original speed."""
    retimed = any(style.split("=")[0].split(":")[0] == "retime" for style in plan.styles)
    return manifest.request.output.keep_audio and not retimed


# ----------------------------------------------------------------------- in-process stages


class LocalStages:
    """`StageCalls` on core objects in this process (`motionserve edit`, the overhead
    benchmark's reference). Calls run in worker threads; awaitable arguments are awaited first.
    """

    def __init__(self, ctx: StageContext, engine: diffusion.DiffusionEngine,
                 upscaler: upscale.Upscaler, gpu_fraction: float = 1.0):  # fmt: skip
        self.ctx, self.engine, self.upscaler = ctx, engine, upscaler
        self.gpu_fraction = gpu_fraction

    async def ready(self) -> bool:
        return True

    def is_transient(self, error: BaseException) -> bool:
        return False  # in one process a failure is the code's own: running again won't help

    async def upscaler_identity(self) -> dict[str, Any]:
        return await asyncio.to_thread(_identity, self.upscaler)

    async def pose(self, input_ref, keys, plan) -> StageRecord:
        return await asyncio.to_thread(stages.extract_pose, self.ctx, input_ref, keys, plan)

    async def motion(self, keys, plan) -> StageRecord:
        return await asyncio.to_thread(stages.edit_motion, self.ctx, keys, plan)

    def render(self, keys, plan, chunk, span):
        return _task(stages.render_maps, self.ctx, keys, plan, chunk, span)

    def generate(self, maps, request, key, plan):
        return _task(self._generate, maps, request, key, plan)

    def _generate(self, maps: Frames | None, fields: dict, key: str, plan) -> Frames:
        chunk, job_id = fields["chunk_index"], fields["job_id"]
        if plan.cache:
            hit = stages.cached_generation(self.ctx, key, chunk, job_id)
            if hit is not None:
                return Frames(hit.frames, (maps.records if maps else []) + hit.records)
        stages.require_maps(maps, key)
        request = stages.chunk_request(fields, maps, plan)
        with stages.MEASURE_LOCK:  # diffusion's CPU time must not land in another stage's bill
            (result,) = self.engine.generate([request])
        record = stages.generation_record(result, self.gpu_fraction)
        if plan.cache:
            stages.store_generation(self.ctx, key, result.frames, job_id, record)
        return Frames(result.frames, maps.records + [record])

    def upscale(self, generated, next_generated, plan, chunk):
        size = (plan.output_width, plan.output_height)
        return _task(stages.upscale_chunk, self.upscaler, generated, next_generated, size, chunk)

    def interpolate(self, upscaled, first, count, total, plan, chunk):
        backend = interpolate.make_backend(plan.interpolation)
        return _task(stages.interpolate_chunk, backend, upscaled, first, count, total, plan, chunk)

    def encode(self, frames, key, plan, chunk):
        return _task(stages.encode_segment, self.ctx, frames, key, plan, chunk, plan.cache)

    async def join(self, segment_keys, plan, result_key, audio) -> StageRecord:
        return await asyncio.to_thread(
            stages.join_segments, self.ctx, segment_keys, plan, result_key, audio, plan.cache
        )

    async def has_segment(self, key: str) -> bool:
        return await asyncio.to_thread(self.ctx.cache.contains, key)

    async def has_generation(self, key: str) -> bool:
        return await asyncio.to_thread(self.ctx.cache.contains, key)


def _identity(upscaler: upscale.Upscaler) -> dict[str, Any]:
    upscaler.load()
    return upscaler.cache_identity()


def _task(function, *args) -> asyncio.Task:
    async def run():
        resolved = [await arg if isinstance(arg, Awaitable) else arg for arg in args]
        return await asyncio.to_thread(function, *resolved)

    return asyncio.ensure_future(run())


# ------------------------------------------------------------------ in-process edit (CLI)


class LocalEvents:
    """Job events for an in-process run: progress to a callback, checkpoints in memory."""

    def __init__(self, manifest: JobManifest, on_progress=None):
        self.manifest = manifest
        self.on_progress = on_progress

    def progress(self, stage: str, done: int, total: int) -> None:
        if self.on_progress:
            self.on_progress(stage, done, total)

    def record(self, records: list, chunk: int | None = None, key: str | None = None) -> None:
        update: dict[str, Any] = {
            "ledger": self.manifest.ledger + [{**r.model_dump(), "attempt": 1} for r in records]
        }
        if chunk is not None:
            update["checkpoints"] = {**self.manifest.checkpoints, str(chunk): key}
        self.manifest = self.manifest.model_copy(update=update)

    def check_cancelled(self) -> None:
        return None


async def edit_video(
    video_path: Path, output: Path, request, args, on_progress=None
) -> dict[str, Any]:
    """The whole pipeline in this process (no Ray, no HTTP): `motionserve edit` and `demo`.

    Same stages, keys, cache and cost report as the service; returns the report.
    """
    from serve.factory import make_engine, make_upscaler, stage_context
    from serve.jobs import new_job_id
    from serve.planning import plan_for

    video_path = Path(video_path).resolve()
    ctx = stage_context(args)
    digest = await asyncio.to_thread(hash_file, video_path)
    info = await asyncio.to_thread(stages.probe_input, ctx, video_path, digest)
    manifest = JobManifest(
        job_id=new_job_id(),
        tenant="local",
        request=request,
        input_key=str(video_path),
        input_sha256=digest,
        plan=plan_for(args, request, info),
        attempts=1,
    )
    calls = LocalStages(ctx, make_engine(args), make_upscaler(args))
    orchestrator = Orchestrator(
        calls, lambda m: f"local-results/{m.job_id}.mp4", tier=args.tier,
        max_chunks_in_flight=args.max_chunks_in_flight,
    )  # fmt: skip
    result_key, report = await orchestrator.run(manifest, LocalEvents(manifest, on_progress))
    ctx.store.get_file(result_key, output)
    ctx.store.delete(result_key)
    return report
