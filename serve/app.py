"""The Ray Serve application: `build_app(args)` wraps the Ray-free stages into deployments.

One deployment per stage; placement (CPUs, GPU fraction, autoscaling, batch size) comes from the
Serve config's `deployments` section per tier (serve/configs), on top of the defaults here. The
ingress composes the stages through handles, passing `DeploymentResponse`s from one call into the
next, so frames move replica to replica through Ray's object store and never through the ingress.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from typing import Any, Literal

import ray
from ray import serve
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    NodeDiedError,
    ObjectLostError,
    OwnerDiedError,
    RayActorError,
    WorkerCrashedError,
)
from ray.experimental.locations import get_local_object_locations
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from ray.serve.schema import ServeStatus

from deployments import diffusion, interpolate
from deployments.stopping import StopFlag
from serve import stages
from serve.api import create_api
from serve.auth import Authenticator
from serve.chunks import CacheLookup, ChunkSpec, generate_or_reuse
from serve.config import AppArgs, Settings
from serve.factory import engine_config, make_upscaler, stage_context
from serve.jobs import JobService, JobStore
from serve.keyed_batcher import KeyedBatcher
from serve.leases import JobLeases, new_owner_id
from serve.loras import check_app_loras
from serve.metrics import JobMetrics, batch_metrics
from serve.orchestrator import Orchestrator
from serve.pipeline import Plan
from serve.planning import estimate, plan_for
from serve.stages import Frames, JobKeys, StageContext, StageRecord

logger = logging.getLogger("ray.serve")

# Failures of the infrastructure, not of a stage's code: the orchestrator runs the chunk again.
# Named one by one although some are subclasses of others, so that none is dropped by a change
# of Ray's hierarchy: a spot node hard-killed mid-call fails the replica's in-flight calls with
# ActorUnavailableError (the node is unreachable, not yet known dead) and later ones with
# ActorDiedError, and Serve does not retry either; a chained call whose upstream replica died
# gets a RayServeException caused by ActorDiedError (`is_transient` follows the causes).
TRANSIENT_RAY_ERRORS = (
    ActorUnavailableError,
    ActorDiedError,
    RayActorError,
    ReplicaUnavailableError,
    WorkerCrashedError,
    NodeDiedError,
    OwnerDiedError,
    ObjectLostError,
    BackPressureError,
)


def assigned_gpu_fraction() -> float:
    """The share of a GPU this replica was given (scales its GPU seconds in the ledger)."""
    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)) or 1.0
    except Exception:  # outside a Ray worker (tests calling the class directly)
        return 1.0


# ------------------------------------------------------------------------------- CPU stages
#
# Stage methods are async and run their work in a worker thread through `stages.stoppable`: a
# cancelled call (`DeploymentResponse.cancel()`, the job was cancelled) raises CancelledError in
# the method, which sets the work's stop flag; the stage stops at its next frame batch without
# writing anything, and the call ends once the thread has (so the replica is free again).


class StageServer:
    """What every stage deployment answers besides its work."""

    def __init__(self) -> None:
        self.running: set[StopFlag] = set()  # the stop flags of the calls at work here

    def ready(self) -> bool:
        """The ingress's readiness probe: an answer means the replica is up and serving."""
        return True

    async def _work(self, function, *args):
        """`function(*args)` in a worker thread that stops at its next frame batch when this
        call is cancelled; the call ends (and leaves `running`) once the thread has."""
        flag = StopFlag()
        self.running.add(flag)
        try:
            return await stages.stoppable(function, *args, flag=flag)
        finally:
            self.running.discard(flag)

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "in_flight": len(self.running),  # calls whose work has not ended
            "batches_begun": sum(flag.asked for flag in self.running),  # by those calls
        }


class PoseServer(StageServer):
    """Decode + pose per job (frames never leave this replica: only poses are stored)."""

    def __init__(self, args: AppArgs):
        super().__init__()
        self.ctx = stage_context(args)

    async def extract(self, input_ref: str, keys, plan: Plan) -> list[StageRecord]:
        return await self._work(stages.extract_pose, self.ctx, input_ref, keys, plan)


class MotionServer(StageServer):
    """Motion editing per job and pose-map rendering per chunk."""

    def __init__(self, args: AppArgs):
        super().__init__()
        self.ctx = stage_context(args)

    async def edit(self, keys, plan: Plan) -> StageRecord:
        return await self._work(stages.edit_motion, self.ctx, keys, plan)

    async def schedule(self, keys, plan: Plan):
        return await self._work(stages.keyframe_schedule, self.ctx, keys, plan)

    async def render(self, keys, plan: Plan, chunk: int, span: tuple[int, int],
                     anchor_key: str | None = None) -> Frames:  # fmt: skip
        return await self._work(stages.render_maps, self.ctx, keys, plan, chunk, span, anchor_key)


class UpscaleServer(StageServer):
    def __init__(self, args: AppArgs):
        super().__init__()
        self.upscaler = make_upscaler(args)

    def identity(self) -> dict[str, Any]:
        self.upscaler.load()
        return self.upscaler.cache_identity()

    async def run(
        self, generated: Frames, next_generated: Frames | None, plan: Plan, chunk: int
    ) -> Frames:
        size = (plan.output_width, plan.output_height)
        return await self._work(
            stages.upscale_chunk,
            self.upscaler,
            generated,
            next_generated,
            size,
            chunk,
            plan.chunk_overlap,
        )


class InterpolateServer(StageServer):
    async def run(
        self, upscaled: Frames, first: int, count: int, total: int, plan: Plan, chunk: int
    ) -> Frames:
        backend = interpolate.make_backend(plan.interpolation)
        return await self._work(
            stages.interpolate_chunk, backend, upscaled, first, count, total, plan, chunk
        )


class VideoServer(StageServer):
    """Encodes chunk segments and joins them into the result (stream copy + audio)."""

    def __init__(self, args: AppArgs):
        super().__init__()
        self.ctx = stage_context(args)

    async def encode(self, frames: Frames, key: str, plan: Plan, chunk: int):
        return await self._work(
            stages.encode_segment, self.ctx, frames, key, plan, chunk, plan.cache
        )

    async def join(self, segment_keys, plan: Plan, result_key: str, audio: tuple[str, str] | None):
        return await self._work(
            stages.join_segments, self.ctx, segment_keys, plan, result_key, audio, plan.cache
        )

    def consistency(self, result_key: str, plan: Plan) -> dict[str, Any]:
        """The report's consistency section, measured on the joined result (CPU, cached)."""
        return stages.result_consistency(self.ctx, result_key, plan)

    def preview(self, input_ref: str, keys, plan: Plan, result_key: str) -> StageRecord:
        """The motion preview MP4 (decode, draw the skeletons, encode): CPU only."""
        return stages.render_preview(self.ctx, input_ref, keys, plan, result_key)

    def keyframe_png(self, key: str, result_key: str) -> StageRecord:
        """The anchor-frame preview PNG of the keyframe cached at `key`."""
        return stages.store_keyframe_png(self.ctx, key, result_key)


# ------------------------------------------------------------------------------- diffusion


# "keyed": the deployed `KeyedBatcher`; "serve.batch": Ray Serve's `@serve.batch` split by
# multiplexed model id, what motionserve used before (benchmarks/batching.py's baseline).
BatchingPolicy = Literal["keyed", "serve.batch"]


class DiffusionServer(StageServer):
    """The GPU stage: keyed micro-batches, one engine per weights, unloaded when idle.

    Callers send the batch key as the multiplexed model id, so the router sends a key to the
    replicas that already serve it. Inside the replica a `KeyedBatcher` queues chunks per key and
    takes the next batch only when the previous one has finished (see serve/keyed_batcher.py for
    why not `@serve.batch`, which `batching="serve.batch"` selects for comparison). Engines are
    cached by weights, not by key, so a new size or step count on the same weights loads nothing.
    """

    def __init__(self, args: AppArgs, batching: BatchingPolicy = "keyed"):
        self.args = args
        self.batching = batching
        self.ctx = stage_context(args)
        self.engines: dict[str, diffusion.DiffusionEngine] = {}
        self.idle_unload_s = 600.0
        self.last_used = time.monotonic()
        self.batches: list[dict[str, Any]] = []  # recent batches, for tests and metrics
        self._reaper: asyncio.Task | None = None
        self.gpu_fraction = assigned_gpu_fraction()
        self.metrics = batch_metrics()
        self.batcher = KeyedBatcher(self._run_batch)
        self.in_flight = 0  # generate calls on this replica that have not returned

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Batch size, wait timeout and idle unload change at runtime (user_config)."""
        self.batcher.configure(
            int(config.get("max_batch_size", 4)), float(config.get("batch_wait_timeout_s", 0.05))
        )
        if self.batching == "serve.batch":
            self._serve_batched.set_max_batch_size(self.batcher.max_batch_size)
            self._serve_batched.set_batch_wait_timeout_s(self.batcher.wait_timeout_s)
        self.idle_unload_s = float(config.get("idle_unload_s", 600))

    @serve.multiplexed(max_num_models_per_replica=32)
    async def _key(self, batch_key: str) -> str:
        # Registering the key gives the router its replica affinity; nothing heavy loads here.
        return batch_key

    async def generate(self, maps: Frames | None, chunk: ChunkSpec, key: str, plan: Plan) -> Frames:
        """One chunk: from the cache when its frames exist, else through a micro-batch.

        `maps` is None when the orchestrator found the frames cached (no pose maps rendered).
        """
        self._start_reaper()
        self.in_flight += 1
        try:  # a cancelled call (the job was cancelled) gets CancelledError here: see _run_batch
            await self._key(serve.get_multiplexed_model_id())
            return await generate_or_reuse(
                self.ctx, maps, chunk, key, plan, self._batched, self.gpu_fraction
            )
        finally:
            self.in_flight -= 1

    async def _batched(self, request: diffusion.ChunkRequest) -> diffusion.ChunkResult:
        """This request's result, from a batch of requests with its key."""
        if self.batching == "serve.batch":
            return await self._serve_batched(request)
        return await self.batcher.submit(request.settings.batch_key(), request)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _serve_batched(self, requests: list[diffusion.ChunkRequest]) -> list:
        # Ray Serve splits its batches by multiplexed model id (the batch key).
        return await self._run_batch(requests[0].settings.batch_key(), requests)

    async def _run_batch(self, key: str, requests: list[diffusion.ChunkRequest]) -> list:
        """One engine call. With the keyed batcher, a request whose caller was cancelled
        leaves the batch at the next denoising step (the batch stops when none is left); what
        it ran is noted in the batch's `dropped` entry, and nobody is billed for it."""
        keys = {r.settings.batch_key() for r in requests}
        batch = {"size": len(requests), "keys": sorted(keys), "at": time.time()}
        self.batches.append(batch)
        self.metrics.batch(len(requests), sum(r.frames for r in requests))
        del self.batches[:-256]
        engine = self._engine(requests[0].settings.model_id)
        steps = _StepWatch(self.batcher.cancelled_in_batch if self.batching == "keyed" else dict)
        self.last_used = time.monotonic()
        try:
            results = await asyncio.to_thread(engine.generate, requests, cancelled=steps)
        finally:
            self.last_used = time.monotonic()
        batch.update(steps.summary(results, self.gpu_fraction))
        return results

    def _engine(self, model_id: str) -> diffusion.DiffusionEngine:
        if model_id not in self.engines:
            self.engines[model_id] = diffusion.DiffusionEngine(engine_config(self.args, model_id))
        return self.engines[model_id]

    def recent_batches(self) -> list[dict[str, Any]]:
        return list(self.batches)

    async def check_health(self) -> None:
        """Serve's periodic health check; an idle replica also collects its garbage. Frames
        left in reference cycles (a finished batch's requests, a failed call's traceback) keep
        their objects pinned in this node's object store, and a node holding objects is not
        idle to the autoscaler: a spot node would never scale down."""
        if self.in_flight == 0:
            gc.collect()

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "waiting": self.batcher.waiting,  # chunks queued for a batch
            "running": self.batcher.running,  # chunks in the batch on the device now
            "in_flight": self.in_flight,  # generate calls not returned (queued, running, I/O)
            "loaded": {k: e.is_loaded for k, e in self.engines.items()},
            "idle_s": time.monotonic() - self.last_used,
            "idle_unload_s": self.idle_unload_s,
            "gpu_fraction": self.gpu_fraction,
        }

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._unload_when_idle())

    async def _unload_when_idle(self) -> None:
        while True:
            await asyncio.sleep(max(0.1, min(self.idle_unload_s / 4, 30.0)))
            idle = time.monotonic() - self.last_used
            if idle >= self.idle_unload_s and any(e.is_loaded for e in self.engines.values()):
                for engine in self.engines.values():
                    engine.unload()
                gc.collect()
                logger.info("diffusion: unloaded weights after %.0f s idle", idle)


class _StepWatch:
    """The engine's `cancelled` hook for one batch: passes on the batcher's cancelled rows and
    notes when each step began and when each cancelled row left, to say what ran after a
    cancel (at most the step that was running: the row leaves at the next step)."""

    def __init__(self, cancelled_rows: Any):
        self.cancelled_rows = cancelled_rows  # () -> {row: monotonic time its caller left}
        self.step_started: list[float] = []
        self.left: dict[int, tuple[float, float]] = {}  # row -> (cancelled at, left at)

    def __call__(self, step: int) -> dict[int, float]:
        now = time.monotonic()
        self.step_started.append(now)
        cancelled = self.cancelled_rows()
        for row, at in cancelled.items():
            self.left.setdefault(row, (at, now))
        return cancelled

    def summary(self, results: list[diffusion.ChunkResult], gpu_fraction: float) -> dict:
        starts = self.step_started
        step_s = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        dropped = []
        for row, (cancelled_at, left_at) in sorted(self.left.items()):
            result = results[row]
            dropped.append({
                "job_id": result.job_id, "chunk_index": result.chunk_index,
                "frames": len(result.frames),  # 0: it left before decoding
                # device time the batch ran between the cancel and the row leaving (0 when
                # cancelled before the batch began): at most one step
                "after_cancel_s": max(0.0, left_at - max(cancelled_at, starts[0])),
                "gpu_s": result.device_seconds * gpu_fraction,  # its share, cancel or not
                "notes": [n for n in result.notes if n.startswith("cancelled")],
            })  # fmt: skip
        return {"dropped": dropped, "longest_step_s": max(step_s, default=None)}


# ---------------------------------------------------------------------------------- ingress


# Readiness: a stage replica that has not answered by then is not ready; a positive answer is
# reused for a few seconds, so frequent probes cost one controller call and a ping per stage
# at most every READY_CACHE_S.
READY_TIMEOUT_S = 2.0
READY_CACHE_S = 5.0
# A deployment with no running replica is ready in these states: scaled to zero on purpose (the
# GPU stage between jobs), or starting one on demand; a request waits in the router meanwhile.
SCALED_TO_ZERO_READY = {"HEALTHY", "UPSCALING", "DOWNSCALING"}


class ServeStages(CacheLookup):
    """`StageCalls` over deployment handles (see serve/orchestrator.py)."""

    def __init__(self, handles: dict[str, DeploymentHandle], ctx: StageContext):
        self.h = handles
        self.ctx = ctx
        self._ready_until = -float("inf")

    async def ready(self) -> bool:
        """Every stage deployment is deployed and each one with running replicas answers."""
        if time.monotonic() < self._ready_until:
            return True
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), READY_TIMEOUT_S)
        except Exception:  # the controller is down or slow: nothing can be deployed now
            logger.warning("readiness: no answer from the Serve controller", exc_info=True)
            return False
        answers = await asyncio.gather(*(_stage_ready(h, status) for h in self.h.values()))
        if all(answers):
            self._ready_until = time.monotonic() + READY_CACHE_S
        return all(answers)

    def is_transient(self, error: BaseException) -> bool:
        """A replica, worker or node that died (or a queue that was full), also when it
        reaches us wrapped by a downstream call that received the failed upstream result."""
        seen = 0
        while error is not None and seen < 8:
            if isinstance(error, TRANSIENT_RAY_ERRORS):
                return True
            error = getattr(error, "cause", None) or error.__cause__
            seen += 1
        return False

    async def settled(self, call: DeploymentResponse) -> None:
        """Once the call has finished, its error if it failed; a result in a node's object
        store is not fetched (`ObjectRef._ready` waits for presence only, as Serve's own
        chaining does). Results and errors not in plasma are small (inline in the owner).
        Shielded: the watch is cancelled when the chunk ends, and cancelling a wait for the
        call's replica assignment would cancel the call itself (a neighbour's, still needed)."""
        ref = await asyncio.shield(call._to_object_ref())
        await ref._ready()
        located = get_local_object_locations([ref]).get(ref) or {}
        if not located.get("node_ids"):
            await ref  # small: an inline result, or the error (raised here)

    async def upscaler_identity(self) -> dict[str, Any]:
        return await _awaited(self.h["upscale"].identity.remote())

    async def pose(self, input_ref: str, keys: JobKeys, plan: Plan) -> list[StageRecord]:
        return await _awaited(self.h["pose"].extract.remote(input_ref, keys, plan))

    async def preview(
        self, input_ref: str, keys: JobKeys, plan: Plan, result_key: str
    ) -> StageRecord:
        return await _awaited(self.h["video"].preview.remote(input_ref, keys, plan, result_key))

    async def motion(self, keys: JobKeys, plan: Plan) -> StageRecord:
        return await _awaited(self.h["motion"].edit.remote(keys, plan))

    async def keyframe_png(self, key: str, result_key: str) -> StageRecord:
        return await _awaited(self.h["video"].keyframe_png.remote(key, result_key))

    async def schedule(self, keys: JobKeys, plan: Plan):
        return await _awaited(self.h["motion"].schedule.remote(keys, plan))

    def render(self, keys: JobKeys, plan: Plan, chunk: int, span: tuple[int, int],
               anchor_key: str | None = None):  # fmt: skip
        return self.h["motion"].render.remote(keys, plan, chunk, span, anchor_key)

    def generate(self, maps, chunk: ChunkSpec, key: str, plan: Plan):
        handle = self.h["diffusion"].options(multiplexed_model_id=plan.generation.batch_key())
        return handle.generate.remote(maps, chunk, key, plan)

    def upscale(self, generated, next_generated, plan: Plan, chunk: int):
        return self.h["upscale"].run.remote(generated, next_generated, plan, chunk)

    def interpolate(self, upscaled, first: int, count: int, total: int, plan: Plan, chunk: int):
        return self.h["interpolate"].run.remote(upscaled, first, count, total, plan, chunk)

    def encode(self, frames, key: str, plan: Plan, chunk: int):
        return self.h["video"].encode.remote(frames, key, plan, chunk)

    async def join(self, segment_keys: list[str], plan: Plan, result_key: str,
                   audio: tuple[str, str] | None) -> StageRecord:  # fmt: skip
        return await _awaited(self.h["video"].join.remote(segment_keys, plan, result_key, audio))

    async def consistency(self, result_key: str, plan: Plan) -> dict[str, Any]:
        return await _awaited(self.h["video"].consistency.remote(result_key, plan))


async def _awaited(response: Any) -> Any:
    """A call's result; if the awaiting job is cancelled, the call is cancelled too (awaiting a
    `DeploymentResponse` in a cancelled task does not cancel the request by itself)."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


async def _stage_ready(handle: DeploymentHandle, status: ServeStatus) -> bool:
    """Whether one stage deployment can take work now (see READY_* above)."""
    app = status.applications.get(handle.app_name)
    deployment = app.deployments.get(handle.deployment_name) if app else None
    if deployment is None:
        return False  # not deployed (yet, or any more)
    if deployment.replica_states.get("RUNNING", 0) == 0:
        # No probe: it would wake a stage that scaled to zero, and keep it awake.
        return deployment.status in SCALED_TO_ZERO_READY
    response = handle.ready.remote()
    try:
        return bool(await asyncio.wait_for(response, READY_TIMEOUT_S))
    except TimeoutError:
        response.cancel()
        return False
    except Exception:  # the replica died under the probe
        return False


class IngressServer:
    """The HTTP API; runs jobs as asyncio tasks over the stage handles."""

    def __init__(self, args: AppArgs, **handles: DeploymentHandle):
        self.args = args
        ctx = stage_context(args)
        jobs = JobStore(ctx.store)
        self.orchestrator = Orchestrator(
            ServeStages(handles, ctx),
            lambda m: jobs.result_key(m.tenant, m.job_id),
            max_chunks_in_flight=args.max_chunks_in_flight,
            tier=args.tier,
        )
        self.service = JobService(
            jobs,
            self.orchestrator,
            limits=args.input_limits(),
            allowed_input_buckets=args.allowed_input_buckets,
            max_active_jobs=args.max_active_jobs,
            max_active_previews=args.max_active_previews,
            probe=lambda path, digest: stages.probe_input(ctx, path, digest),
            plan_for=lambda request, info, ref=False: plan_for(args, request, info, ref),
            estimate=lambda request, duration, w, h: estimate(args, request, duration, w, h),
            fetch_s3=lambda uri, dest: ctx.fetch_input(uri, dest),
            metrics=JobMetrics(),
            leases=JobLeases(ctx.store, new_owner_id(), lease_s=args.job_lease_s),
        )
        self.auth = Authenticator(args.api_keys + Settings().api_keys)
        self._scan: asyncio.Task | None = None
        self._last_scan = -float("inf")
        self._handed_back = False

    def __serve_build_asgi_app__(self):
        return create_api(self.service, self.auth, on_request=self._adopt_orphans_when_due)

    async def check_health(self) -> None:
        # Runs on the replica's event loop soon after start and then every few seconds: adopt
        # jobs whose replica died (or a previous app left), keep the queue-depth gauge fresh.
        self._adopt_orphans_when_due()
        self.service.metrics.queue_depth(self.service.active)
        if self.service.active == 0:
            # The ingress owns every chunk's frames (it made the calls): refs left in
            # reference cycles of finished jobs would pin them in the GPU nodes' object
            # stores, and a node holding objects never counts as idle, so never scales down.
            gc.collect()

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica gracefully (a downscale, a new version):
        hand the running jobs over now rather than after their leases lapse."""
        if getattr(self, "_handed_back", True):
            return  # already done, or __init__ never finished
        self._handed_back = True  # no new scans; one under way finishes, so what it adopted
        if self._scan is not None:  # is handed back below too
            await asyncio.gather(self._scan, return_exceptions=True)
        handed = await self.service.hand_back()
        if handed:
            # Another replica, or the next start of the app, resumes them from their checkpoints.
            logger.info("handed back %d running job(s): %s", len(handed), handed)

    def _adopt_orphans_when_due(self) -> None:
        """Start a scan for orphaned jobs at most every half lease, in the background (it lists
        the job store), so neither requests nor health checks wait on it."""
        due = time.monotonic() - self._last_scan >= self.args.job_lease_s / 2
        if due and not self._handed_back and (self._scan is None or self._scan.done()):
            self._last_scan = time.monotonic()
            self._scan = asyncio.get_running_loop().create_task(self._adopt_orphans())

    async def _adopt_orphans(self) -> None:
        try:
            adopted = await self.service.resume_unfinished()
        except Exception:  # the next scan tries again; serving goes on
            logger.exception("scan for orphaned jobs failed")
            return
        if adopted:
            logger.info("resuming %d unfinished job(s): %s", len(adopted), adopted)


# ------------------------------------------------------------------------------------ build

STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "Pose": {"ray_actor_options": {"num_cpus": 1}},
    "Motion": {"ray_actor_options": {"num_cpus": 0.5}},
    "Upscale": {"ray_actor_options": {"num_cpus": 1}},
    "Interpolate": {"ray_actor_options": {"num_cpus": 1}},
    "Video": {"ray_actor_options": {"num_cpus": 1}},
    "Diffusion": {
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1},
        "max_ongoing_requests": 16,
        "autoscaling_config": {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 1},
        "user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05, "idle_unload_s": 600},
    },
    "Ingress": {"ray_actor_options": {"num_cpus": 0.25}, "max_queued_requests": 64},
}


def build_app(
    args: dict[str, Any] | AppArgs, deployment_overrides: list[dict[str, Any]] | None = None
) -> serve.Application:
    """The application for `serve run` / `serve deploy` (import path `serve.app:build_app`).

    Ray applies a config file's `deployments` section itself; `motionserve serve` passes the
    same section as `deployment_overrides`, so both paths place the stages identically.
    """
    args = AppArgs.model_validate(args)
    check_app_loras(args)  # a bad LoRA file fails the app's start, not its first job
    overrides = {item["name"]: item for item in deployment_overrides or []}

    def deployment(cls, name: str):
        return serve.deployment(cls, name=name, **_options(name, overrides.get(name, {})))

    ingress_cls = serve.ingress()(IngressServer)
    return deployment(ingress_cls, "Ingress").bind(
        args,
        pose=deployment(PoseServer, "Pose").bind(args),
        motion=deployment(MotionServer, "Motion").bind(args),
        diffusion=deployment(DiffusionServer, "Diffusion").bind(args),
        upscale=deployment(UpscaleServer, "Upscale").bind(args),
        interpolate=deployment(InterpolateServer, "Interpolate").bind(),
        video=deployment(VideoServer, "Video").bind(args),
    )


def _options(name: str, override: dict[str, Any]) -> dict[str, Any]:
    """The code's defaults for a stage with a config's override on top."""
    options = {**STAGE_DEFAULTS[name], **{k: v for k, v in override.items() if k != "name"}}
    if "num_replicas" in override:
        options.pop("autoscaling_config", None)  # a fixed count replaces autoscaling
    if "autoscaling_config" in override:
        options.pop("num_replicas", None)
    return options
