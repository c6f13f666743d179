"""The whole pipeline in this process (no Ray, no HTTP): `motionserve edit`, `demo` and the
benchmarks' in-process reference. Same stages, keys, cache and cost report as the service."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from deployments import diffusion, interpolate, upscale
from serve import stages
from serve.cache import hash_file
from serve.chunks import CacheLookup, ChunkSpec, generate_or_reuse
from serve.jobs import JobManifest
from serve.jobs.store import anchor_image_key
from serve.orchestrator import Orchestrator
from serve.pipeline import Plan
from serve.stages import Frames, JobKeys, StageContext, StageRecord


class LocalStages(CacheLookup):
    """`StageCalls` on core objects in this process. Calls run in worker threads; awaitable
    arguments are awaited first."""

    def __init__(self, ctx: StageContext, engine: diffusion.DiffusionEngine | None,
                 upscaler: upscale.Upscaler | None, gpu_fraction: float = 1.0):  # fmt: skip
        # A preview calls neither the engine nor the upscaler: it is built without them.
        self.ctx, self.engine, self.upscaler = ctx, engine, upscaler
        self.gpu_fraction = gpu_fraction

    async def ready(self) -> bool:
        return True

    def is_transient(self, error: BaseException) -> bool:
        return False  # in one process a failure is the code's own: running again won't help

    async def settled(self, call) -> None:
        await asyncio.wait([call])
        if not call.cancelled() and call.exception() is not None:
            raise call.exception()

    async def upscaler_identity(self) -> dict[str, Any]:
        return await asyncio.to_thread(_identity, self.upscaler)

    async def pose(self, input_ref: str, keys: JobKeys, plan: Plan) -> list[StageRecord]:
        return await stages.stoppable(stages.extract_pose, self.ctx, input_ref, keys, plan)

    async def preview(
        self, input_ref: str, keys: JobKeys, plan: Plan, result_key: str
    ) -> StageRecord:
        return await asyncio.to_thread(
            stages.render_preview, self.ctx, input_ref, keys, plan, result_key
        )

    async def keyframe_png(self, key: str, result_key: str) -> StageRecord:
        return await asyncio.to_thread(stages.store_keyframe_png, self.ctx, key, result_key)

    async def motion(self, keys: JobKeys, plan: Plan) -> StageRecord:
        return await stages.stoppable(stages.edit_motion, self.ctx, keys, plan)

    async def schedule(self, keys: JobKeys, plan: Plan):
        return await stages.stoppable(stages.keyframe_schedule, self.ctx, keys, plan)

    def render(self, keys: JobKeys, plan: Plan, chunk: int, span: tuple[int, int],
               anchor_key: str | None = None):  # fmt: skip
        return _task(stages.render_maps, self.ctx, keys, plan, chunk, span, anchor_key)

    def generate(self, maps: Awaitable[Frames] | None, chunk: ChunkSpec, key: str, plan: Plan):
        return _task(self._generate, maps, chunk, key, plan)

    async def _generate(self, maps: Frames | None, chunk: ChunkSpec, key: str, plan: Plan):
        return await generate_or_reuse(
            self.ctx, maps, chunk, key, plan, self._run_engine, self.gpu_fraction
        )

    async def _run_engine(self, request: diffusion.ChunkRequest) -> diffusion.ChunkResult:
        # A cancelled call cannot stop its thread; the engine sees the flag at its next step.
        gone = threading.Event()
        try:
            return await asyncio.to_thread(self._run_engine_measured, request, gone)
        except asyncio.CancelledError:
            gone.set()
            raise

    def _run_engine_measured(
        self, request: diffusion.ChunkRequest, gone: threading.Event
    ) -> diffusion.ChunkResult:
        with stages.MEASURE_LOCK:  # diffusion's CPU time must not land in another stage's bill
            (result,) = self.engine.generate(
                [request], cancelled=lambda step: (0,) if gone.is_set() else ()
            )
        return result

    def upscale(self, generated, next_generated, plan: Plan, chunk: int):
        size = (plan.output_width, plan.output_height)
        return _task(
            stages.upscale_chunk, self.upscaler, generated, next_generated, size, chunk,
            plan.chunk_overlap,
        )  # fmt: skip

    def interpolate(self, upscaled, first: int, count: int, total: int, plan: Plan, chunk: int):
        backend = interpolate.make_backend(plan.interpolation)
        return _task(stages.interpolate_chunk, backend, upscaled, first, count, total, plan, chunk)

    def encode(self, frames, key: str, plan: Plan, chunk: int):
        return _task(stages.encode_segment, self.ctx, frames, key, plan, chunk, plan.cache)

    async def join(self, segment_keys: list[str], plan: Plan, result_key: str,
                   audio: tuple[str, str] | None) -> StageRecord:  # fmt: skip
        return await stages.stoppable(
            stages.join_segments, self.ctx, segment_keys, plan, result_key, audio, plan.cache
        )

    async def consistency(self, result_key: str, plan: Plan) -> dict[str, Any]:
        return await asyncio.to_thread(stages.result_consistency, self.ctx, result_key, plan)


def _identity(upscaler: upscale.Upscaler) -> dict[str, Any]:
    upscaler.load()
    return upscaler.cache_identity()


def _task(function: Callable[..., Any], *args: Any) -> asyncio.Task:
    """`function` on the arguments once the awaitable ones are done: a coroutine function on
    this loop, a plain one (a stage taking `should_stop`) in a worker thread that stops at its
    next frame batch when the task is cancelled."""

    async def run():
        resolved = [await arg if isinstance(arg, Awaitable) else arg for arg in args]
        if inspect.iscoroutinefunction(function):
            return await function(*resolved)
        return await stages.stoppable(function, *resolved)

    return asyncio.ensure_future(run())


class LocalEvents:
    """`JobEvents` for an in-process run: progress to a callback, checkpoints in memory."""

    def __init__(self, manifest: JobManifest, on_progress=None):
        self.manifest = manifest
        self.on_progress = on_progress

    def progress(self, stage: str, done: int, total: int) -> None:
        if self.on_progress:
            self.on_progress(stage, done, total)

    def record(
        self, records: Sequence[StageRecord], chunk: int | None = None, key: str | None = None
    ) -> None:
        update: dict[str, Any] = {
            "ledger": self.manifest.ledger + [{**r.model_dump(), "attempt": 1} for r in records]
        }
        if chunk is not None:
            update["checkpoints"] = {**self.manifest.checkpoints, str(chunk): key}
        self.manifest = self.manifest.model_copy(update=update)

    def check_cancelled(self) -> None:
        return None


async def edit_video(
    video_path: Path, output: Path, request, args, on_progress=None, reference: Path | None = None
) -> dict[str, Any]:
    """The whole pipeline in this process (no Ray, no HTTP): `motionserve edit` and `demo`.

    Same stages, keys, cache and cost report as the service; returns the report. `reference`:
    a reference image, checked as the service checks one (see plan_for for the anchor).
    """
    from serve.factory import make_engine, make_upscaler

    return await _run_local(
        video_path, output, request, args, on_progress, "job",
        lambda: LocalStages(_context(args), make_engine(args), make_upscaler(args)), reference,
    )  # fmt: skip


async def preview_video(
    video_path: Path, output: Path, request, args, on_progress=None, reference: Path | None = None,
    anchor_output: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The motion preview in this process (`motionserve preview`): the job's decode, pose and
    motion stages in the same cache, the side-by-side MP4 at `output`, and the estimate of the
    full job; no upscaler is built, and no diffusion engine unless the request asks for the
    anchor frame (`frames: "anchor"`, written as a PNG to `anchor_output`). Returns the
    preview report."""
    from serve.factory import make_engine

    engine = make_engine(args) if request.frames == "anchor" else None
    return await _run_local(
        video_path, output, request, args, on_progress, "preview",
        lambda: LocalStages(_context(args), engine, None), reference, anchor_output,
    )  # fmt: skip


def _context(args) -> StageContext:
    from serve.factory import stage_context

    return stage_context(args)


async def _run_local(video_path, output, request, args, on_progress, kind: str, make_calls,
                     reference: Path | None = None, anchor_output: Path | None = None):  # fmt: skip
    from deployments.reference import check_reference
    from serve.jobs import new_job_id
    from serve.jobs.service import check_preview_frames
    from serve.planning import plan_for

    video_path = Path(video_path).resolve()
    reference_sha = None
    if reference is not None:  # checked before anything is built or written
        reference = Path(reference).resolve()
        await asyncio.to_thread(check_reference, reference, args.input_limits())
        reference_sha = await asyncio.to_thread(hash_file, reference)
    calls = make_calls()
    ctx = calls.ctx
    digest = await asyncio.to_thread(hash_file, video_path)
    info = await asyncio.to_thread(stages.probe_input, ctx, video_path, digest)
    manifest = JobManifest(
        job_id=new_job_id(),
        tenant="local",
        kind=kind,
        request=request,
        input_key=str(video_path),
        input_sha256=digest,
        reference_key=str(reference) if reference is not None else None,
        reference_sha256=reference_sha,
        plan=plan_for(args, request, info, reference is not None),
        attempts=1,
    )
    if kind == "preview":
        check_preview_frames(request, manifest.plan)
    orchestrator = Orchestrator(
        calls, lambda m: f"local-results/{m.job_id}.mp4", tier=args.tier,
        max_chunks_in_flight=args.max_chunks_in_flight,
    )  # fmt: skip
    result_key, report = await orchestrator.run(manifest, LocalEvents(manifest, on_progress))
    ctx.store.get_file(result_key, output)
    ctx.store.delete(result_key)
    if kind == "preview" and request.frames == "anchor":
        png = anchor_image_key(result_key)
        ctx.store.get_file(png, anchor_output or Path(output).with_suffix(".anchor.png"))
        ctx.store.delete(png)
    return report
