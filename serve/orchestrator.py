"""Runs a job's plan over stage calls, chunk by chunk, with checkpoints.

The orchestrator only holds keys and small results. Frames flow from call to call as awaitable
handles: on Ray Serve those are `DeploymentResponse`s passed straight into the next deployment's
call (the frames stay in Ray's object store and never reach the ingress); in process they are
asyncio tasks (`LocalStages`, serve/local_run.py). Each chunk ends as an encoded segment under a
content key and a checkpoint in the manifest, so a repeat or a resumed job skips finished chunks
and a restart loses at most the chunks in flight. When a replica dies, Serve's router re-sends
the requests it held to a replacement; a chunk whose failure still reaches us (its result object
lost with a node, a worker crash) runs again, up to `MAX_CHUNK_RETRIES` times, counted in the
report's `chunk_retries`. An error of the
stage's own code is not retried (it would fail the same way). Work a dead replica had done is
not in the report (its records died with it).

When the run stops early (the job is cancelled, or a chunk fails for good), every stage call
still in flight is cancelled, not only the awaited last one of each chunk: Serve's
`DeploymentResponse.cancel()` drops a call still queued in the router and raises
CancelledError in an async replica method that runs (the diffusion replica then drops the
chunk from its queue or its running batch); in process the call's task is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from deployments.density import DensitySchedule
from serve import stages
from serve.chunks import ChunkSpec
from serve.cost import build_preview_report, build_report
from serve.events import JobEvents
from serve.jobs import JobManifest
from serve.jobs.store import anchor_image_key
from serve.pipeline import Plan
from serve.stages import Frames, JobKeys, StageRecord

logger = logging.getLogger(__name__)

# A dead replica's calls fail at once; new calls wait in Serve's router until a replacement
# replica is up (as from zero). 1 + 2 + 4 s covers the controller noticing the death.
MAX_CHUNK_RETRIES = 3
RETRY_BACKOFF_S = 1.0  # doubled per retry of the same chunk


def retry_delay_s(calls: StageCalls, error: BaseException, tried: int) -> float | None:
    """Seconds to wait before calling again after `error`, a call already retried `tried`
    times; None when it must not be retried (not an infrastructure failure, or tried enough)."""
    if not calls.is_transient(error) or tried >= MAX_CHUNK_RETRIES:
        return None
    return RETRY_BACKOFF_S * 2**tried


@dataclass
class RetryLog:
    """The stage calls of one job run made again after an infrastructure failure (this
    attempt); the report's `chunk_retries` is their total."""

    keyframe: int = 0  # anchor keyframe calls made again
    chunks: dict[int, int] = field(default_factory=dict)  # chunk -> pipelines made again

    @property
    def total(self) -> int:
        return self.keyframe + sum(self.chunks.values())


class StageCalls(Protocol):
    """The stage calls a plan needs. Chunk calls return awaitables that later calls accept
    (Serve's `DeploymentResponse`s, or asyncio tasks in process)."""

    async def ready(self) -> bool: ...
    async def upscaler_identity(self) -> dict[str, Any]: ...
    async def pose(self, input_ref: str, keys: JobKeys, plan: Plan) -> list[StageRecord]:
        """Decode + pose: the `decode` and `pose` records."""
        ...

    async def motion(self, keys: JobKeys, plan: Plan) -> StageRecord: ...
    async def schedule(self, keys: JobKeys, plan: Plan) -> DensitySchedule | None:
        """The chunks' strides under motion keyframe density (stages.keyframe_schedule), from
        the edited poses the motion stage cached; None for fixed density. CPU, milliseconds."""
        ...

    async def preview(
        self, input_ref: str, keys: JobKeys, plan: Plan, result_key: str
    ) -> StageRecord:
        """The motion preview MP4 at `result_key` (stages.render_preview); CPU only."""
        ...

    async def keyframe_png(self, key: str, result_key: str) -> StageRecord:
        """The anchor keyframe cached at `key` as a PNG at `result_key` (CPU)."""
        ...

    def render(
        self, keys: JobKeys, plan: Plan, chunk: int, span: tuple[int, int],
        anchor_key: str | None = None,
    ) -> Awaitable[Frames]:  # fmt: skip
        """The chunk's pose maps; with anchor attention also its anchor image: the keyframe
        cached at `anchor_key`, or (the keyframe's own call, `anchor_key` None) the reference."""
        ...

    def generate(
        self, maps: Awaitable[Frames] | None, chunk: ChunkSpec, key: str, plan: Plan
    ) -> Awaitable[Frames]: ...
    def upscale(
        self, generated: Awaitable[Frames], next_generated: Awaitable[Frames] | None, plan: Plan,
        chunk: int,
    ) -> Awaitable[Frames]: ...  # fmt: skip
    def interpolate(
        self, upscaled: Awaitable[Frames], first: int, count: int, total: int, plan: Plan,
        chunk: int,
    ) -> Awaitable[Frames]: ...  # fmt: skip
    def encode(
        self, frames: Awaitable[Frames], key: str, plan: Plan, chunk: int
    ) -> Awaitable[tuple[str, list[StageRecord]]]: ...
    async def join(
        self, segment_keys: list[str], plan: Plan, result_key: str, audio: tuple[str, str] | None
    ) -> StageRecord: ...
    async def consistency(self, result_key: str, plan: Plan) -> dict[str, Any]:
        """The report's consistency section, measured on the joined result (CPU, cached)."""
        ...

    async def in_cache(self, key: str) -> bool:
        """Whether generated frames or a segment are cached under `key` (no bytes read)."""
        ...

    def is_transient(self, error: BaseException) -> bool:
        """True for an infrastructure failure worth retrying (a dead replica or node)."""
        ...

    async def settled(self, call: Awaitable[Frames]) -> None:
        """Return once a chunk call has finished; raise its error if it failed. A result is
        not fetched (its frames stay where they are)."""
        ...


def chunk_spans(frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_frames, frames)) for start in range(0, frames, chunk_frames)]


def generation_spans(spans: list[tuple[int, int]], plan: Plan) -> list[tuple[int, int]]:
    """The frames each chunk generates: its span, and before it the plan's overlap (the
    previous chunk's last frames) for every chunk but the first. Under motion keyframe density
    a chunk generates some of these grid frames only (`Plan.generated_indices`)."""
    return [(start - plan.overlap_before(i), stop) for i, (start, stop) in enumerate(spans)]


def first_frames(spans: list[tuple[int, int]], plan: Plan) -> list[int]:
    """Each chunk's first generated frame as an index in the job's generated frames (its
    overlap included): the grid index without a density schedule."""
    return [plan.first_generated(i, span) - plan.overlap_before(i) for i, span in enumerate(spans)]


def own_generated(spans: list[tuple[int, int]], plan: Plan, chunk: int) -> tuple[int, int]:
    """(first, count) of the chunk's own generated frames (no overlap) among the job's
    generated frames: what the interpolation of its time span starts from."""
    first, stop = spans[chunk]
    if plan.schedule is None:
        return first, stop - first
    return plan.schedule.generated_before(chunk), len(plan.schedule.indices(chunk))


def keyed_indices(plan: Plan, chunk: int, span: tuple[int, int]) -> list[int] | None:
    """The grid frames a chunk generates when they are not its whole generated span (a
    generation key's `indices`); None when they are (every chunk of a fixed-density plan)."""
    indices = plan.generated_indices(chunk, plan.schedule.span(chunk)) if plan.schedule else None
    if indices is None or indices == list(range(*span)):
        return None
    return indices


def job_keys_of(manifest: JobManifest, plan: Plan) -> JobKeys:
    """The manifest's job keys (its reference image counted where it acts)."""
    return stages.job_keys(
        manifest.input_sha256, plan, manifest.reference_sha256, manifest.reference_key
    )


class Orchestrator:
    """Turns a manifest into a result MP4 and a cost report."""

    def __init__(self, calls: StageCalls, result_key_for: Callable[[JobManifest], str], *,
                 max_chunks_in_flight: int = 4, tier: str = "local"):  # fmt: skip
        self.calls = calls
        self.result_key_for = result_key_for
        self.max_chunks_in_flight = max_chunks_in_flight
        self.tier = tier

    async def ready(self) -> bool:
        return await self.calls.ready()

    async def run(self, manifest: JobManifest, events: JobEvents) -> tuple[str, dict[str, Any]]:
        if manifest.kind == "preview":
            return await self.run_preview(manifest, events)
        plan = Plan.model_validate(manifest.plan)
        keys = job_keys_of(manifest, plan)
        motion_record = await self._poses(manifest, plan, keys, events)
        plan = await self._scheduled(keys, plan)
        spans = chunk_spans(motion_record.frames, plan.chunk_frames)
        retries = RetryLog()
        segment_keys = await self._run_chunks(manifest, plan, keys, spans, events, retries)
        result_key = self.result_key_for(manifest)
        keeps = _keeps_timing(plan, manifest)
        audio = (manifest.input_key, manifest.input_sha256) if keeps else None
        events.check_cancelled()
        events.record([await self.calls.join(segment_keys, plan, result_key, audio)])
        events.progress("join", 1, 1)
        # The ledger holds every attempt's records, so a resumed job's report counts all work.
        ledger = [StageRecord.model_validate(r) for r in events.manifest.ledger]
        report = build_report(
            plan, ledger, frames=motion_record.frames, tier=self.tier,
            attempts=manifest.attempts, chunk_retries=retries.total,
        )  # fmt: skip
        if retries.total:
            logger.info("job %s: %d chunk call(s) retried after infrastructure failures",
                        manifest.job_id, retries.total)  # fmt: skip
        consistency = await self._consistency(manifest, result_key, plan)
        density = {"keyframe_density": _density_section(plan)} if plan.schedule else {}
        return result_key, {
            **report.model_dump(mode="json"),
            "plan_explained": plan.explain(),
            "consistency": consistency,
            **density,
        }

    async def _scheduled(self, keys: JobKeys, plan: Plan) -> Plan:
        """The plan with its motion density schedule (strides per chunk, from the edited
        skeleton; before any GPU work, so the report's prediction is made with it)."""
        if plan.keyframe_density.mode == "fixed":  # no call: fixed plans run as before
            return plan
        schedule = await self.calls.schedule(keys, plan)
        return plan if schedule is None else plan.model_copy(update={"schedule": schedule})

    async def _consistency(self, manifest: JobManifest, result_key: str, plan: Plan) -> dict:
        """Measured after the cost report is built, and never billed: a quality figure. The
        result is made by then, so a failure here is reported, not a failed job."""
        try:
            return await self.calls.consistency(result_key, plan)
        except Exception as error:
            logger.exception("job %s: consistency metric failed", manifest.job_id)
            return {"error": f"{type(error).__name__}: {error}"}

    async def _poses(
        self, manifest: JobManifest, plan: Plan, keys: JobKeys, events: JobEvents
    ) -> StageRecord:
        """The whole-video CPU stages a job and its preview share (same keys, same cache):
        decode + pose, then the motion edit. Returns the motion's record."""
        events.check_cancelled()
        events.record(await self.calls.pose(manifest.input_key, keys, plan))
        events.progress("pose", 1, 1)
        events.check_cancelled()
        motion_record = await self.calls.motion(keys, plan)
        events.record([motion_record])
        events.progress("motion", 1, 1)
        return motion_record

    async def run_preview(
        self, manifest: JobManifest, events: JobEvents
    ) -> tuple[str, dict[str, Any]]:
        """A motion preview: the job's decode, pose and motion stages (filling the cache the
        job then hits), the side-by-side MP4, and the estimate of the full job; CPU only, its
        report shows zero work units and zero GPU seconds. With `frames: "anchor"` it also
        generates the job's anchor keyframe (one GPU frame, billed here) into the cache the
        job then takes it from, and stores it as a PNG beside the MP4."""
        plan = Plan.model_validate(manifest.plan)
        keys = job_keys_of(manifest, plan)
        motion_record = await self._poses(manifest, plan, keys, events)
        plan = await self._scheduled(keys, plan)  # the estimate counts the slow chunks
        events.check_cancelled()
        result_key = self.result_key_for(manifest)
        events.record([await self.calls.preview(manifest.input_key, keys, plan, result_key)])
        events.progress("preview", 1, 1)
        if manifest.request.frames == "anchor":  # the one GPU frame, which the job reuses
            chunk = _chunk_specs(manifest, plan, [0])[0]  # chunk 0's fields
            key = stages.keyframe_key(keys, plan, chunk.key_fields())
            await self.keyframe(keys, plan, chunk, key, events)
            png = await self.calls.keyframe_png(key, anchor_image_key(result_key))
            events.record([png])
            events.progress("anchor", 1, 1)
        ledger = [StageRecord.model_validate(r) for r in events.manifest.ledger]
        report = build_preview_report(plan, ledger, frames=motion_record.frames, tier=self.tier)
        return result_key, {**report.model_dump(mode="json"), "plan_explained": plan.explain()}

    async def _run_chunks(
        self, manifest: JobManifest, plan: Plan, keys: JobKeys, spans: list[tuple[int, int]],
        events: JobEvents, retries: RetryLog,
    ) -> list[str]:  # fmt: skip
        """Run every chunk (records go to the job's ledger); returns the segment keys."""
        generated = generation_spans(spans, plan)
        chunks = _chunk_specs(manifest, plan, first_frames(spans, plan))
        anchor_key = None
        if plan.generation.anchor != "off":
            anchor_key = stages.keyframe_key(keys, plan, chunks[0].key_fields())
        gen_keys = [
            stages.generation_key(keys, plan, span, _key_fields(chunk, span, plan), anchor_key,
                                  keyed_indices(plan, i, span))
            for i, (span, chunk) in enumerate(zip(generated, chunks, strict=True))
        ]  # fmt: skip
        identity = await self.calls.upscaler_identity()
        seg_keys = [
            stages.segment_key(plan, gen_keys[i], gen_keys[i + 1] if i + 1 < len(spans) else None,
                               identity)
            for i in range(len(spans))
        ]  # fmt: skip
        cached = await self._cached_generations(plan, gen_keys)
        if anchor_key and len(cached) < len(spans):  # some chunk will anchor on it
            await self.keyframe(keys, plan, chunks[0], anchor_key, events, retries)
        run = _ChunkRun(self.calls, manifest, plan, keys, spans, chunks, gen_keys, seg_keys)
        run.retries = retries
        run.anchor_key = anchor_key
        run.cached_generations = cached
        await run.all(events, self.max_chunks_in_flight)
        return seg_keys

    async def keyframe(
        self, keys: JobKeys, plan: Plan, first_chunk: ChunkSpec, key: str, events: JobEvents,
        retries: RetryLog | None = None,
    ) -> Frames:  # fmt: skip
        """The job's anchor keyframe (its frame 0 generated alone; `stages.keyframe_plan`),
        cached at `key` before any chunk anchors on it: from the cache when a preview or an
        earlier job made it (a hit, free), else generated here and billed to this job, once.
        Its records go to the ledger with no chunk (it belongs to the job), noted as such."""
        plan_k = stages.keyframe_plan(plan)
        spec = first_chunk.model_copy(update={"chunk_index": 0, "first_frame": 0})
        attempt = 0
        while True:
            events.check_cancelled()
            maps = None
            if not await self.calls.in_cache(key):
                maps = self.calls.render(keys, plan_k, 0, (0, 1))
            call = self.calls.generate(maps, spec, key, plan_k)
            try:
                frames = await call
                break
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as error:
                delay = retry_delay_s(self.calls, error, attempt)
                if delay is None:
                    raise
                attempt += 1
                if retries is not None:
                    retries.keyframe += 1
                logger.warning("anchor keyframe failed (%s); retry %d", error, attempt)
                await asyncio.sleep(delay)
        note = "anchor keyframe (frame 0 alone; every chunk anchors on it)"
        events.record(
            [
                r.model_copy(update={"chunk": None, "notes": [*r.notes, note]})
                for r in frames.records
            ]
        )
        return frames

    async def _cached_generations(self, plan: Plan, gen_keys: list[str]) -> set[int]:
        """Chunks whose generated frames are cached: their pose maps need not be rendered."""
        if not plan.cache:
            return set()
        found = await asyncio.gather(*(self.calls.in_cache(key) for key in gen_keys))
        return {chunk for chunk, hit in enumerate(found) if hit}


class _ChunkRun:
    """The chunk pipelines of one job: render -> diffusion -> upscale -> interpolate -> encode."""

    def __init__(self, calls: StageCalls, manifest: JobManifest, plan: Plan, keys: JobKeys,
                 spans: list[tuple[int, int]], chunks: list[ChunkSpec], gen_keys: list[str],
                 seg_keys: list[str]):  # fmt: skip
        self.calls, self.manifest, self.plan, self.keys = calls, manifest, plan, keys
        self.spans, self.chunks, self.gen_keys, self.seg_keys = spans, chunks, gen_keys, seg_keys
        self.generated: dict[int, Awaitable[Frames]] = {}
        self.cached_generations: set[int] = set()
        self.retries = RetryLog()
        # Every stage call made for a chunk that has not finished, so a stop can cancel them
        # all (the calls are chained: only encode's is awaited here).
        self.calls_of: dict[int, list[Any]] = {}
        self.maps: dict[int, Any] = {}  # the render call each generation call consumes
        self.anchor_key: str | None = None  # the job's anchor keyframe (anchor attention)

    def _made(self, chunk: int, call: Any) -> Any:
        self.calls_of.setdefault(chunk, []).append(call)
        return call

    def cancel_calls(self) -> int:
        """Cancel every stage call of the unfinished chunks; returns how many."""
        calls = {id(c): c for chunk_calls in self.calls_of.values() for c in chunk_calls}
        self.calls_of.clear()
        for call in calls.values():
            call.cancel()  # a DeploymentResponse or an asyncio task: both have cancel()
        return len(calls)

    def _generation(self, chunk: int, for_chunk: int):
        """One diffusion call per chunk, shared by this chunk and the previous one; listed
        among the calls of `for_chunk`, so it is cancelled (and held) until both finish."""
        if chunk not in self.generated:
            cached = chunk in self.cached_generations
            maps = (
                None
                if cached
                else self.calls.render(
                    self.keys, self.plan, chunk, self._generated_span(chunk), self.anchor_key
                )
            )
            self.generated[chunk] = self.calls.generate(
                maps, self.chunks[chunk], self.gen_keys[chunk], self.plan
            )
            self.maps[chunk] = maps
        if self.maps.get(chunk) is not None:
            self._made(for_chunk, self.maps[chunk])
        return self._made(for_chunk, self.generated[chunk])

    def _generated_span(self, chunk: int) -> tuple[int, int]:
        start, stop = self.spans[chunk]
        return start - self.plan.overlap_before(chunk), stop

    def _pipeline(self, chunk: int):
        """The chunk's chained calls; returns its own calls after the generations (upscale,
        interpolate, encode: the last one's result is the chunk's) and the generation calls
        it uses (its own and its successor's, shared with the neighbouring chunks)."""
        has_next = chunk + 1 < len(self.spans)
        generations = [self._generation(chunk, chunk)]
        if has_next:
            generations.append(self._generation(chunk + 1, chunk))
        upscaled = self._made(chunk, self.calls.upscale(
            generations[0], generations[1] if has_next else None, self.plan, chunk,
        ))  # fmt: skip
        total = self.spans[-1][1]
        first, count = own_generated(self.spans, self.plan, chunk)
        frames = self._made(
            chunk, self.calls.interpolate(upscaled, first, count, total, self.plan, chunk)
        )
        self.generated.pop(chunk - 1, None)  # no later chunk needs it: free its object
        self.maps.pop(chunk - 1, None)
        encoded = self._made(
            chunk, self.calls.encode(frames, self.seg_keys[chunk], self.plan, chunk)
        )
        return [upscaled, frames, encoded], generations

    async def all(self, events: JobEvents, window: int) -> None:
        pending: dict[asyncio.Future, int] = {}
        try:
            await self._all(events, window, pending)
        except BaseException:  # cancelled, or a chunk failed for good: stop the work in flight
            for future in pending:
                future.cancel()
            cancelled = self.cancel_calls()
            logger.info("job %s: stopped; cancelled %d stage call(s) in flight",
                        self.manifest.job_id, cancelled)  # fmt: skip
            raise
        finally:
            # The last chunks' generation calls: a result held here pins its frames in a GPU
            # node's object store (the node is never idle) for as long as this run is alive.
            self.generated.clear()
            self.maps.clear()

    async def _all(self, events: JobEvents, window: int, pending: dict) -> None:
        total = len(self.spans)
        done = 0
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
            own, generations = self._pipeline(chunk)
            return await self._unless_generation_failed(own, generations)

        return asyncio.ensure_future(run())

    async def _unless_generation_failed(self, own: list, generations: list):
        """The chunk's encode result, or the error of a generation call it uses, whichever
        comes first. A generation whose replica was lost with its node fails with
        ActorUnavailableError, and a call given that result as an argument (the upscale)
        does not fail: Serve's router takes the error for its own replica being unavailable
        and routes it again, forever. So the generation calls are watched themselves."""
        done_task = asyncio.ensure_future(_awaited(own[-1]))
        watchers = [asyncio.ensure_future(self.calls.settled(g)) for g in generations]
        try:
            pending = {done_task, *watchers}
            while True:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if done_task in finished:
                    return done_task.result()
                for watcher in finished:
                    if watcher.exception() is not None:
                        # Cancel this chunk's calls stuck behind the failed generation, not
                        # the generations: a neighbour may share them (it watches them too).
                        for call in own:
                            call.cancel()
                        raise watcher.exception()
        finally:
            for task in (done_task, *watchers):
                task.cancel()

    async def _finished_before(self, chunk: int, events: JobEvents) -> bool:
        """True for a chunk checkpointed by an earlier attempt (its records are in the ledger
        already) or whose segment is cached (recorded as a free hit)."""
        key = self.seg_keys[chunk]
        if self.manifest.checkpoints.get(str(chunk)) == key:
            return True
        if self.plan.cache and await self.calls.in_cache(key):
            hit = StageRecord(stage="segment", chunk=chunk, cache_hit=True)
            events.record([hit], chunk=chunk, key=key)
            return True
        return False

    async def _collect(self, pending: dict, events: JobEvents, total: int, done: int) -> int:
        """Wait for at least one chunk; record the finished ones, restart the retriable failures.
        Returns how many chunks finished."""
        finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        succeeded = 0
        for future in finished:
            chunk = pending.pop(future)
            try:
                key, records = future.result()
            except BaseException as error:  # a cancellation is never retried
                delay = self._retry_delay_s(chunk, error) if isinstance(error, Exception) else None
                if delay is not None:
                    _drop_tracebacks(error)
                    pending[self._start(chunk, delay)] = chunk
                    continue
                raise  # all() cancels the other chunks' calls
            self.calls_of.pop(chunk, None)  # finished: its calls are done
            events.record(records, chunk=chunk, key=key)
            succeeded += 1
        events.progress("chunks", done + succeeded, total)
        events.check_cancelled()
        return succeeded

    def _retry_delay_s(self, chunk: int, error: Exception) -> float | None:
        """When to run a failed chunk again (None: never); its stage calls are then made anew
        (the generation cache spares the diffusion work that had finished)."""
        tried = self.retries.chunks
        delay = retry_delay_s(self.calls, error, tried.get(chunk, 0))
        if delay is None:
            return None
        tried[chunk] = tried.get(chunk, 0) + 1
        logger.warning(
            "job %s: chunk %d failed (%s: %s); retry %d of %d",
            self.manifest.job_id, chunk, type(error).__name__, error,
            tried[chunk], MAX_CHUNK_RETRIES,
        )  # fmt: skip
        for generation in (chunk, chunk + 1):  # a response that failed would fail again
            self.generated.pop(generation, None)
            self.maps.pop(generation, None)
        return delay


async def _awaited(call: Awaitable[Any]) -> Any:
    return await call


def _drop_tracebacks(error: BaseException) -> None:
    """Forget the frames a retried chunk's error passed through. Its traceback is a reference
    cycle (a frame on it holds the watcher task that holds the error), so without this those
    frames, and the stage calls in their locals, live until Python's cycle collector runs: a
    neighbour's generation that succeeded stays referenced by this process, its result pinned
    in a GPU node's object store, and the idle node is never scaled down. The error itself is
    logged by message."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__


def _chunk_specs(manifest: JobManifest, plan: Plan, firsts: list[int]) -> list[ChunkSpec]:
    """The job's chunks as the diffusion stage sees them (`firsts`: each one's first frame in
    the job's generated frames, `first_frames`)."""
    job = manifest.request
    return [
        ChunkSpec(job_id=manifest.job_id, chunk_index=index, prompt=job.prompt,
                  negative_prompt=job.negative_prompt,
                  seed=job.seed if job.seed is not None else 0,
                  noise_sharing=plan.noise_sharing, noise=plan.noise,
                  noise_window=plan.noise_window, first_frame=first)
        for index, first in enumerate(firsts)
    ]  # fmt: skip


def _density_section(plan: Plan) -> dict[str, Any]:
    """The report's `keyframe_density`: each chunk's stride, generated fps and joint speed."""
    schedule = plan.schedule
    return {
        "settings": plan.keyframe_density.model_dump(mode="json"),
        "chunk_fps": [plan.generation.fps / stride for stride in schedule.strides],
        **schedule.model_dump(mode="json"),
        "slow_fraction": schedule.slow_fraction(),
    }


def _key_fields(chunk: ChunkSpec, span: tuple[int, int], plan: Plan) -> dict[str, Any]:
    """The chunk's generation-key fields; under a density schedule also its first frame in
    the job's generated frames where that is not its grid index (its own noise reads it)."""
    fields = chunk.key_fields()
    if plan.schedule is not None and chunk.first_frame != span[0]:
        fields["first_frame"] = chunk.first_frame
    return fields


def _keeps_timing(plan: Plan, manifest: JobManifest) -> bool:
    """Audio only fits when the motion plays at its original speed."""
    retimed = any(style.split("=")[0].split(":")[0] == "retime" for style in plan.styles)
    return manifest.request.output.keep_audio and not retimed
