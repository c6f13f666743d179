"""What each stage does for one call, with content-addressed caching and cost records.

These functions are Ray-free: the Serve deployments (serve/app.py) call them on their replicas
and the in-process runner calls them directly, so both paths compute the same keys and report the
same costs. Every result carries the `StageRecord`s of the work behind it, so a chunk's records
travel with its frames from stage to stage and reach the job's ledger without extra calls.

Each stage takes an optional `should_stop` (deployments/stopping.py): its caller sets it when the
call is cancelled, and the stage raises `Stopped` at its next frame batch (and at once if it was
waiting for MEASURE_LOCK). Stages write to the cache and the store only after their frame loop,
and every write is atomic, so a stopped stage leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, Field

from deployments import (
    consistency,
    density,
    diffusion,
    interpolate,
    motion,
    motion_preview,
    pose,
    pose_maps,
    reference,
    upscale,
    video,
)
from deployments.errors import InvalidSettingError
from deployments.stopping import ShouldStop, StopFlag, check_stop, until_stopped
from serve.cache import ArtifactCache, content_key, hash_file
from serve.storage import ObjectStore, open_store, parse_s3_uri

SEGMENT_CODE_VERSION = "segment-1"
RENDER_CODE_VERSION = "render-1"
PREVIEW_CRF = 23  # a look at the motion, not a deliverable: smaller files, faster encode

T = TypeVar("T")


class StageRecord(BaseModel):
    """What one stage call cost. A cache hit costs (almost) nothing and says so."""

    stage: str = Field(description="pose, motion, render, diffusion, upscale, interpolate, ...")
    chunk: int | None = Field(default=None, description="Chunk index; None for whole-job stages.")
    cache_hit: bool = Field(default=False, description="Served from the artifact cache.")
    wall_s: float = Field(default=0.0, description="Wall-clock seconds of the call.")
    cpu_s: float = Field(default=0.0, description="CPU seconds of the replica process.")
    device: str = Field(default="cpu", description="Where the work ran: cpu or cuda:N.")
    gpu_s: float = Field(default=0.0, description="Accelerator compute seconds (0 on CPU).")
    load_s: float = Field(
        default=0.0,
        description="Model load seconds paid by this call (a diffusion chunk: its share of its "
        "batch's load, so the records of a batch sum to one load).",
    )
    frames: int = Field(default=0, description="Frames produced.")
    work_units: dict[str, float] | None = Field(
        default=None, description="Diffusion work units (diffusion only)."
    )
    model_weights: diffusion.ModelWeights | None = Field(
        default=None,
        description="The FLOP formulas the engine weighed `work_units` with (diffusion only): "
        "the report predicts with the same, so predicted equals counted to the last digit.",
    )
    notes: list[str] = Field(default_factory=list, description="E.g. precision overrides.")
    attempt: int = Field(default=0, description="Job attempt that did the work (0: not set).")


@dataclass
class Frames:
    """Frames on their way through a chunk's stages, with the records of the work behind them."""

    frames: np.ndarray
    records: list[StageRecord] = field(default_factory=list)
    guides: np.ndarray | None = None  # the same frames at generation size (interpolation)
    # pose maps with anchor attention: the job's first pose map, or its reference image
    anchor_map: np.ndarray | None = None


# CPU seconds are read process-wide (stages use native worker threads), so two measured calls
# in one process must not overlap, or each would be billed for the other's work. Stage work
# is CPU-bound, so serialising it per process costs little throughput and keeps bills true.
MEASURE_LOCK = threading.RLock()


@contextmanager
def measured(record: StageRecord) -> Iterator[StageRecord]:
    """Fill `record.wall_s` and `record.cpu_s` with what the block took (one at a time)."""
    with MEASURE_LOCK:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            yield record
        finally:
            record.wall_s += time.perf_counter() - wall0
            record.cpu_s += time.process_time() - cpu0


async def stoppable(
    function: Callable[..., T], *args: Any, flag: StopFlag | None = None, **kwargs: Any
) -> T:
    """`function(*args, **kwargs, should_stop=flag)` in a worker thread. When the awaiting task
    is cancelled (a cancelled Serve call, a cancelled job in process), the stop flag is set and
    the cancellation waits for the thread to end (at its next frame batch), so the caller's
    slot is free only once the work really stopped; then CancelledError goes on."""
    stop = flag if flag is not None else StopFlag()
    work = asyncio.ensure_future(asyncio.to_thread(function, *args, **kwargs, should_stop=stop))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        with suppress(BaseException):  # Stopped, or its result: nobody wants either
            await work
        raise


@dataclass
class StageContext:
    """What stages share on a replica: the artifact cache, the store and input limits."""

    cache: ArtifactCache
    limits: video.InputLimits
    s3_endpoint_url: str | None = None

    @property
    def store(self) -> ObjectStore:
        return self.cache.store

    def fetch_input(self, ref: str, dest: Path) -> Path:
        """A local file holding a job's input: a store key or an s3:// URI (already checked
        against the allowed buckets) is copied to `dest`; an absolute local path, which only
        the in-process CLI passes (store keys never start with '/'), is used as it is."""
        if Path(ref).is_absolute():
            return Path(ref)
        if ref.startswith("s3://"):
            # Through the store, so a missing input is ObjectNotFound like any missing key.
            bucket, key = parse_s3_uri(ref)
            open_store(f"s3://{bucket}", s3_endpoint_url=self.s3_endpoint_url).get_file(key, dest)
        else:
            self.store.get_file(ref, dest)
        return dest


# ------------------------------------------------------------------------------- keys


class JobKeys(BaseModel):
    """The content keys of a job's whole-video stages, computed before any work."""

    source: str = Field(description="sha256 of the input bytes.")
    decode: str
    pose: str
    motion: str
    reference: str | None = Field(
        default=None,
        description="sha256 of the reference image's bytes, when the job's anchor is one.",
    )
    reference_input: str | None = Field(
        default=None,
        description="Where the reference image is read from (store key, s3:// URI or, in "
        "process, a local path); not part of any key (its bytes' hash is).",
    )


def job_keys(
    source_sha256: str,
    plan,
    reference_sha256: str | None = None,
    reference_input: str | None = None,
) -> JobKeys:
    """The job's keys. The reference image counts only where it acts: with anchor attention
    on the reference (`plan.generation.anchor == "reference"`); otherwise it is left out, so a
    job without one (or with its anchor elsewhere) keeps the keys it always had."""
    decode = content_key("decode", video.VIDEO_CODE_VERSION, plan.decode, [source_sha256])
    poses = content_key("pose", pose.POSE_CODE_VERSION, plan.pose, [decode])
    editor = motion.MotionEditor(plan.styles)
    edited = content_key("motion", motion.MOTION_CODE_VERSION, editor.settings_key(), [poses])
    keys = JobKeys(source=source_sha256, decode=decode, pose=poses, motion=edited)
    if plan.generation.anchor == "reference":
        if not reference_sha256 or not reference_input:
            raise InvalidSettingError("anchor 'reference' needs a reference image")
        keys.reference, keys.reference_input = reference_sha256, reference_input
    return keys


# The fields of `ChunkSpec.key_fields` that name a frame's own noise (mode and window; and,
# under motion keyframe density, the chunk's first frame in the job's generated frames).
NOISE_KEY_FIELDS = ("noise", "noise_window", "first_frame")


def generation_key(keys: JobKeys, plan, span: tuple[int, int], request: dict,
                   anchor_key: str | None = None,
                   indices: list[int] | None = None) -> str:  # fmt: skip
    """Key of one chunk's generated frames: its poses, the diffusion settings and the prompt
    (and, when the anchor is a reference image, that image's bytes; with anchor attention, the
    key of the anchor keyframe it anchors on). The noise mode and window count only where a
    frame's own noise acts. `indices`: the grid frames the chunk generates, given only when
    they are not every frame of `span` (motion keyframe density: the chunk's rate is part of
    its key; a chunk that generates every frame keeps the key of a fixed-density plan)."""
    if not diffusion.own_noise_acts(plan.generation.scheduler, request.get("noise_sharing", 1.0)):
        # The noise mode and window cannot change these frames (`own_noise_acts`): left out,
        # so seamless noise alone keeps the keys (and the cache) of per-chunk noise.
        request = {k: v for k, v in request.items() if k not in NOISE_KEY_FIELDS}
    settings = {"generation": plan.generation, "request": request, "frames": list(span)}
    if indices is not None:
        settings["indices"] = list(indices)
    inputs = [keys.motion] + ([keys.reference] if keys.reference else [])
    inputs += [anchor_key] if anchor_key else []
    return content_key("diffusion", diffusion.DIFFUSION_CODE_VERSION, settings, inputs)


def keyframe_plan(plan):
    """The plan of a job's anchor keyframe: its generation settings (`keyframe_settings`), and
    the cache on even where the plan's is off: the chunks read the keyframe from it."""
    return plan.model_copy(
        update={"generation": diffusion.keyframe_settings(plan.generation), "cache": True,
                "schedule": None}
    )  # fmt: skip


def keyframe_key(keys: JobKeys, plan, request: dict) -> str:
    """Key of a job's anchor keyframe: the generation key of its frame 0 generated alone under
    `keyframe_plan` (`request`: the job's chunk 0 fields, `ChunkSpec.key_fields`)."""
    return generation_key(keys, keyframe_plan(plan), (0, 1), request)


def reference_image(ctx: StageContext, keys: JobKeys, plan) -> np.ndarray:
    """The job's reference image at the generation size (uint8 RGB), prepared once per job
    and size and cached under its content key (the bytes' hash, the size, the code version)."""
    g = plan.generation
    key = content_key(
        "reference", reference.REFERENCE_CODE_VERSION, [g.width, g.height], [keys.reference]
    )
    data = ctx.cache.get(key)
    if data is None:
        with tempfile.TemporaryDirectory(prefix="motionserve-reference-") as scratch:
            local = ctx.fetch_input(keys.reference_input, Path(scratch) / "reference")
            image = reference.prepare_reference(local, g.width, g.height)
        ctx.cache.put(key, image.tobytes(), {"stage": "reference"})
        return image
    return np.frombuffer(data, np.uint8).reshape(g.height, g.width, 3).copy()


def segment_key(plan, generated: str, next_generated: str | None, upscaler_identity: dict) -> str:
    """Key of one chunk's finished segment (it also depends on the next chunk's first frame)."""
    settings = {
        "interpolation": plan.interpolation,
        "upscaler": upscaler_identity,
        "output": [plan.output_width, plan.output_height, plan.output_fps, plan.output_crf],
        "generation_fps": plan.generation.fps,
    }
    if plan.chunk_overlap:  # only then, so the keys of plans without it did not change
        settings["chunk_overlap"] = plan.chunk_overlap
    inputs = [generated] + ([next_generated] if next_generated else [])
    return content_key("segment", SEGMENT_CODE_VERSION, settings, inputs)


# ------------------------------------------------------------------------- whole-video stages


def probe_input(ctx: StageContext, path: Path, source_sha256: str) -> video.VideoInfo:
    """Probe an input once per content: a repeat of the same bytes reads no frame at all
    (the limits are still enforced on the remembered facts)."""
    key = content_key("probe", video.VIDEO_CODE_VERSION, None, [source_sha256])
    data = ctx.cache.get(key)
    if data is not None:
        info = video.VideoInfo.model_validate_json(data)
        video.check_limits(info, ctx.limits)
        return info
    info = video.probe(path, ctx.limits)
    ctx.cache.put(key, info.model_dump_json().encode(), {"stage": "probe"})
    return info


def _cache_hit(ctx: StageContext, plan, key: str, record: StageRecord) -> bool:
    """Whether a whole-video stage's output is cached under `key` (and the plan reuses the
    cache); on a hit `record` says so, with the frame count the output was stored with."""
    meta = ctx.cache.get_meta(key) if plan.cache else None
    if meta is None:
        return False
    record.cache_hit, record.frames = True, int(meta.get("frames", 0))
    return True


def extract_pose(
    ctx: StageContext, input_ref: str, keys: JobKeys, plan, should_stop: ShouldStop | None = None
) -> list[StageRecord]:
    """Decode at the generation rate and size and extract the pose (cached under keys.pose).

    Two records: `decode` (fetching the input and decoding it) and `pose`, each with its own
    seconds. When the poses are cached nothing is fetched or decoded: both are cache hits (the
    decoded frames are never stored; the poses are what the job needs of them)."""
    decode, poses = StageRecord(stage="decode"), StageRecord(stage="pose")
    with MEASURE_LOCK:
        with measured(poses):
            hit = _cache_hit(ctx, plan, keys.pose, poses)
        if hit:
            decode.cache_hit, decode.frames = True, poses.frames
            decode.notes.append("not decoded: the poses of these frames are cached")
            return [decode, poses]
        check_stop(should_stop, "pose")
        with tempfile.TemporaryDirectory(prefix="motionserve-pose-") as scratch:
            with measured(decode):
                local = ctx.fetch_input(input_ref, Path(scratch) / "input")
            sequence = _decode_and_extract(local, ctx.limits, plan, decode, poses, should_stop)
        decode.frames = poses.frames = len(sequence)
        with measured(poses):
            ctx.cache.put(
                keys.pose, sequence.to_bytes(), {"stage": "pose", "frames": len(sequence)}
            )
    return [decode, poses]


def _decode_and_extract(
    path: Path,
    limits: video.InputLimits,
    plan,
    decode: StageRecord,
    poses: StageRecord,
    should_stop: ShouldStop | None = None,
) -> pose.PoseSequence:
    """Decode chunk by chunk and extract each chunk's poses, billing each part to its record."""
    with measured(decode):
        info = video.probe(path, limits)
        chunks = video.decode_chunks(path, plan.decode, limits, info)
    parts = []
    with measured(poses):
        extractor = pose.PoseExtractor(plan.pose)
    try:
        while True:
            with measured(decode):
                chunk = next(chunks, None)
            if chunk is None:
                break
            check_stop(should_stop, "pose decoding")
            with measured(poses):
                parts.append(extractor.extract(chunk.frames, plan.decode.fps, should_stop))
    finally:
        with measured(poses):
            extractor.close()
    return pose.PoseSequence.concatenate(parts)


def edit_motion(
    ctx: StageContext, keys: JobKeys, plan, should_stop: ShouldStop | None = None
) -> StageRecord:
    """Apply the motion styles to the cached poses (cached under keys.motion). One numpy pass
    over the whole sequence: `should_stop` is asked once, before it."""
    record = StageRecord(stage="motion")
    with measured(record):
        if _cache_hit(ctx, plan, keys.motion, record):
            return record
        check_stop(should_stop, "motion")
        sequence = pose.PoseSequence.from_bytes(_require(ctx.cache, keys.pose))
        edited = motion.MotionEditor(plan.styles).edit(sequence)
        record.frames = len(edited)
        ctx.cache.put(keys.motion, edited.to_bytes(), {"stage": "motion", "frames": len(edited)})
    return record


def load_edited_poses(ctx: StageContext, keys: JobKeys) -> pose.PoseSequence:
    return pose.PoseSequence.from_bytes(_require(ctx.cache, keys.motion))


def keyframe_schedule(
    ctx: StageContext, keys: JobKeys, plan, should_stop: ShouldStop | None = None
) -> density.DensitySchedule | None:
    """The chunks' strides under motion keyframe density, from the edited poses in the cache
    (`edit_motion` first); None for fixed density. Milliseconds of numpy, deterministic: a
    resumed job gets the same strides, so the same chunk keys."""
    if plan.keyframe_density.mode == "fixed":
        return None
    check_stop(should_stop, "keyframe density")
    edited = load_edited_poses(ctx, keys)
    g = plan.generation
    return density.density_schedule(
        edited.landmarks, edited.present, plan.chunk_frames, plan.keyframe_density, g.fps,
        scale=g.width / edited.width,
    )  # fmt: skip


def preview_key(keys: JobKeys, plan) -> str:
    """Key of a motion preview: the decoded frames it draws on and the edited poses (whose key
    chains the original poses and the styles)."""
    settings = {"render": motion_preview.PREVIEW_RENDER_VERSION, "fps": plan.decode.fps,
                "crf": PREVIEW_CRF}  # fmt: skip
    return content_key("preview", SEGMENT_CODE_VERSION, settings, [keys.decode, keys.motion])


def render_preview(
    ctx: StageContext, input_ref: str, keys: JobKeys, plan, result_key: str
) -> StageRecord:
    """The motion preview MP4 (source + original skeleton | source + edited skeleton, at the
    generation fps and size) stored at `result_key`; cached, so a repeat decodes nothing.
    Needs the poses and the edited poses in the cache (`extract_pose`, `edit_motion`)."""
    record = StageRecord(stage="preview")
    key = preview_key(keys, plan)
    with measured(record), tempfile.TemporaryDirectory(prefix="motionserve-preview-") as scratch:
        folder = Path(scratch)
        out = folder / "preview.mp4"
        meta = ctx.cache.get_meta(key) if plan.cache else None
        if meta is not None and ctx.cache.get_file(key, out) is not None:
            record.cache_hit, record.frames = True, int(meta.get("frames", 0))
        else:
            original = pose.PoseSequence.from_bytes(_require(ctx.cache, keys.pose))
            edited = load_edited_poses(ctx, keys)
            local = ctx.fetch_input(input_ref, folder / "input")
            info = video.probe(local, ctx.limits)
            chunks = video.decode_chunks(local, plan.decode, ctx.limits, info)
            sources = motion_preview.edited_source_frames(plan.styles, len(original))
            frames = motion_preview.side_by_side(
                (chunk.frames for chunk in chunks), original, edited, sources
            )
            settings = video.EncodeSettings(fps=plan.decode.fps, crf=PREVIEW_CRF)
            record.frames = video.encode_mp4(frames, out, settings)
            if plan.cache:
                ctx.cache.put_file(key, out, {"stage": "preview", "frames": record.frames})
        ctx.store.put_file(result_key, out, content_type="video/mp4")
    return record


def _require(cache: ArtifactCache, key: str) -> bytes:
    data = cache.get(key)
    if data is None:
        raise RuntimeError(f"artifact {key} is missing from the cache (was it evicted?)")
    return data


# ------------------------------------------------------------------------------ chunk stages


def render_maps(ctx: StageContext, keys: JobKeys, plan, chunk: int, span: tuple[int, int],
                anchor_key: str | None = None,
                should_stop: ShouldStop | None = None):  # fmt: skip
    """The chunk's pose maps at generation size, for ControlNet; with anchor attention also its
    anchor image: the job's anchor keyframe cached at `anchor_key` (every chunk's), or, for the
    keyframe's own call with anchor 'reference' (`anchor_key` None), the reference image.
    Milliseconds: `should_stop` is asked once, before."""
    record = StageRecord(stage="render", chunk=chunk)
    with measured(record):
        check_stop(should_stop, "render")
        edited = load_edited_poses(ctx, keys)
        g = plan.generation
        frames: slice | list[int] = slice(*span)
        if plan.schedule is not None:  # motion keyframe density: the chunk's grid frames
            frames = plan.generated_indices(chunk, plan.schedule.span(chunk))
        maps = pose_maps.render_pose_maps(edited, g.width, g.height, frames=frames)
        anchor = None
        if g.anchor != "off" and anchor_key is not None:
            anchor = keyframe_image(ctx, anchor_key)
        elif g.anchor == "reference":
            anchor = reference_image(ctx, keys, plan)
        elif g.anchor != "off":
            raise RuntimeError(f"chunk {chunk}: anchor '{g.anchor}' without its keyframe")
        record.frames = len(maps)
    return Frames(maps, [record], anchor_map=anchor)


def keyframe_image(ctx: StageContext, key: str) -> np.ndarray:
    """The job's anchor keyframe (uint8 RGB at the generation size) from the cache."""
    return np.load(io.BytesIO(_require(ctx.cache, key)))["frames"][0]


def store_keyframe_png(ctx: StageContext, key: str, result_key: str) -> StageRecord:
    """The anchor-frame preview: the keyframe cached at `key` as a PNG at `result_key`."""
    from PIL import Image

    record = StageRecord(stage="anchor_png")
    with measured(record):
        buffer = io.BytesIO()
        Image.fromarray(keyframe_image(ctx, key)).save(buffer, format="PNG")
        ctx.store.put_bytes(result_key, buffer.getvalue(), content_type="image/png")
        record.frames = 1
    return record


def cached_generation(ctx: StageContext, key: str, chunk: int, job_id: str) -> Frames | None:
    """Generated frames from the cache. Another job's (or request's) frames cost this job
    nothing; frames this same job generated before cost what they cost then: its first result
    never reached the ledger (a retried chunk, or a resumed job whose chunk was not
    checkpointed), so the work is billed here, once."""
    found = ctx.cache.get_with_meta(key)
    if found is None:
        return None
    data, meta = found
    frames = np.load(io.BytesIO(data))["frames"]
    if meta.get("job_id") == job_id and meta.get("record"):
        record = StageRecord.model_validate(meta["record"])
        note = "generated earlier by this job (its first result was lost): billed once, here"
        return Frames(frames, [record.model_copy(update={"notes": [*record.notes, note]})])
    return Frames(frames, [StageRecord(stage="diffusion", chunk=chunk, cache_hit=True)])


def store_generation(
    ctx: StageContext, key: str, frames: np.ndarray, job_id: str, record: StageRecord
) -> None:
    """Cache generated frames with who made them and what it cost (see cached_generation)."""
    buffer = io.BytesIO()
    np.savez(buffer, frames=frames)  # PNG-level compression gains little on noisy frames
    meta = {"stage": "diffusion", "frames": len(frames), "job_id": job_id,
            "record": record.model_dump(mode="json")}  # fmt: skip
    ctx.cache.put(key, buffer.getvalue(), meta)


def upscale_chunk(
    upscaler: upscale.Upscaler,
    generated: Frames,
    next_generated: Frames | None,
    out_size: tuple[int, int],
    chunk: int,
    overlap: int = 0,
    should_stop: ShouldStop | None = None,
) -> Frames:
    """Upscale the chunk's frames plus the next chunk's first (interpolation needs it); stops
    at the next batch of `upscaler.settings.batch_frames` frames once `should_stop` says so.

    With an overlap (seamless chunks), `generated` starts with `overlap` frames of the previous
    chunk's span (chunk 0 has none), which are left out here: the previous chunk's segment used
    them. The next chunk's generation starts with `overlap` frames of this chunk's span, which
    this chunk's last frames cross-fade into (`cross_fade`) before its first frame after them."""
    record = StageRecord(stage="upscale", chunk=chunk)
    small = generated.frames
    if overlap:
        small = small[overlap if chunk > 0 else 0 :]
    if next_generated is not None:
        following = next_generated.frames
        if overlap:
            small = cross_fade(small, following[:overlap])
            following = following[overlap:]
        small = np.concatenate([small, following[:1]])
    with measured(record):
        large = upscaler.upscale(small, out_size, should_stop)
        record.frames = len(large)
        record.device = upscaler.describe().get("device", "cpu")
    return Frames(large, generated.records + [record], guides=small)


def cross_fade(frames: np.ndarray, incoming: np.ndarray) -> np.ndarray:
    """`frames` with its last len(incoming) frames blended into `incoming` (the same frames as
    the next chunk generated them): overlap frame j of n takes weight (j + 1) / (n + 1) from the
    next chunk, so the change from one chunk to the next is spread over n + 1 intervals instead
    of one. Deterministic, and downstream of both chunks' cached generations: a chunk's frames
    never depend on its neighbour's, and a segment recomputed on resume or retry is the same."""
    count = len(incoming)
    if count == 0:
        return frames
    if count > len(frames):
        raise ValueError(f"an overlap of {count} frames is longer than the chunk ({len(frames)})")
    weights = (np.arange(1, count + 1, dtype=np.float32) / (count + 1)).reshape(-1, 1, 1, 1)
    tail = frames[-count:].astype(np.float32)
    mixed = tail + weights * (incoming.astype(np.float32) - tail)
    if np.issubdtype(frames.dtype, np.integer):
        info = np.iinfo(frames.dtype)
        mixed = np.clip(np.rint(mixed), info.min, info.max)
    return np.concatenate([frames[:-count], mixed.astype(frames.dtype)])


def interpolation_positions(
    first: int, count: int, total: int, in_fps: float, out_fps: float, pad_tail: bool,
    frames_at: list[int] | None = None,
) -> list[tuple[int, float]]:  # fmt: skip
    """(source index, t) of the output frames that fall in source frames [first, first+count).
    With `frames_at` (the grid frames the job generated, motion keyframe density) indices are
    positions in the job's generated frames (`interpolate.output_positions`)."""
    positions = interpolate.output_positions(total, in_fps, out_fps, pad_tail, frames_at)
    return [(i, float(t)) for i, t in positions if first <= i < first + count]


def interpolate_chunk(
    backend: interpolate.InterpolationBackend,
    upscaled: Frames,
    first: int,
    count: int,
    total: int,
    plan,
    chunk: int,
    should_stop: ShouldStop | None = None,
) -> Frames:
    """Output-rate frames for the chunk's time span; motion measured at generation size.
    `first`, `count`: the chunk's own generated frames, as positions in the job's generated
    frames (grid frames unless the plan has a motion density schedule); `total`: the job's
    grid frames. `should_stop` is asked before each pair of generated frames (one flow, its
    in-betweens)."""
    record = StageRecord(stage="interpolate", chunk=chunk)
    with measured(record):
        span = _interpolate_span(backend, upscaled, first, count, total, plan, should_stop)
        frames = list(span)
        record.frames = len(frames)
    if not frames:  # below the generation rate a chunk's span can hold no output time at all
        empty = np.empty((0, *upscaled.frames.shape[1:]), dtype=upscaled.frames.dtype)
        return Frames(empty, upscaled.records + [record])
    return Frames(np.stack(frames), upscaled.records + [record])


def _interpolate_span(backend, upscaled: Frames, first, count, total, plan, should_stop=None):
    frames_at = plan.schedule.job_indices() if plan.schedule is not None else None
    positions = interpolation_positions(
        first, count, total, plan.generation.fps, plan.output_fps, plan.interpolation.pad_tail,
        frames_at,
    )  # fmt: skip
    large, small = upscaled.frames, upscaled.guides
    run: list[float] = []  # times between the same pair, interpolated together (one flow)
    run_pair = -1
    for index, t in positions + [(-1, 0.0)]:  # the sentinel flushes the last run
        local = index - first
        if run and (t == 0 or local != run_pair):
            check_stop(should_stop, "interpolation")
            yield from backend.interpolate_with_flow_from(
                small[run_pair], small[run_pair + 1], large[run_pair], large[run_pair + 1], run
            )
            run = []
        if index < 0:
            break
        if t == 0:
            yield large[local]  # on a generated frame (or holding the last): bit-exact
        else:
            run.append(t)
            run_pair = local


def encode_segment(
    ctx: StageContext, frames: Frames, key: str, plan, chunk: int, store: bool,
    should_stop: ShouldStop | None = None,
) -> tuple[str, list[StageRecord]]:  # fmt: skip
    """Encode the chunk's output frames as an H.264 segment under its content key; the
    segment is stored only once whole (`should_stop` is asked before each frame)."""
    record = StageRecord(stage="encode", chunk=chunk)
    with measured(record), tempfile.TemporaryDirectory(prefix="motionserve-seg-") as scratch:
        path = Path(scratch) / "segment.mp4"
        check_stop(should_stop, "encode")
        if len(frames.frames):
            encoding = plan.output_encoding()
            record.frames = video.encode_mp4(frames.frames, path, encoding, should_stop)
        else:  # a chunk with no output frame: an empty file, which `join_segments` skips
            path.write_bytes(b"")
        meta = {"stage": "segment", "frames": record.frames, "chunk": chunk}
        if store:
            ctx.cache.put_file(key, path, meta)
        else:  # the naive path keeps nothing reusable, but the job still needs its segment
            ctx.store.put_file(f"scratch/{key}/segment.mp4", path)
    return key, frames.records + [record]


def segment_path(ctx: StageContext, key: str, dest: Path, cached: bool) -> Path:
    if cached:
        found = ctx.cache.get_file(key, dest)
        if found is None:
            raise RuntimeError(f"segment {key} is missing from the cache")
        return found
    return ctx.store.get_file(f"scratch/{key}/segment.mp4", dest)


def result_content_key(segment_keys: list[str], audio_sha256: str | None, plan) -> str:
    """Key of a joined result: its segments in order and the audio source, if any."""
    inputs = list(segment_keys) + ([audio_sha256] if audio_sha256 else [])
    return content_key("result", SEGMENT_CODE_VERSION, {"fps": plan.output_fps}, inputs)


def join_segments(
    ctx: StageContext,
    segment_keys: list[str],
    plan,
    result_key: str,
    audio: tuple[str, str] | None,
    cached: bool,
    should_stop: ShouldStop | None = None,
) -> StageRecord:
    """Stream-copy the segments into the result MP4 in the store, with the audio of
    `audio` = (input ref, its sha256); a repeat copies the cached result instead."""
    record = StageRecord(stage="join")
    ckey = result_content_key(segment_keys, audio[1] if audio else None, plan)
    with measured(record), tempfile.TemporaryDirectory(prefix="motionserve-join-") as scratch:
        folder = Path(scratch)
        out = folder / "result.mp4"
        if cached and ctx.cache.get_file(ckey, out) is not None:
            record.cache_hit = True
        else:
            paths = [
                segment_path(ctx, key, folder / f"{i:05d}.mp4", cached)
                for i, key in enumerate(until_stopped(segment_keys, should_stop, "join"))
            ]
            paths = [path for path in paths if path.stat().st_size > 0]  # chunks with no frame
            source = ctx.fetch_input(audio[0], folder / "audio-source") if audio else None
            record.frames = video.concat_mp4(
                paths, out, plan.output_fps, str(source) if source else None, should_stop
            )
            if cached:
                ctx.cache.put_file(ckey, out, {"stage": "result", "frames": record.frames})
        ctx.store.put_file(result_key, out, content_type="video/mp4")
    return record


# ------------------------------------------------------------------------ consistency metric

CONSISTENCY_NOTE = (
    "measured on the delivered video after encode (CPU); a quality figure outside the cost "
    "report: its seconds are shown here and billed to no stage"
)


class ConsistencySection(BaseModel):
    """The `consistency` section of a job's report (deployments/consistency.py)."""

    settings: consistency.ConsistencySettings = Field(
        description="Chunking the seam ratio assumed: the plan's chunk_frames and generation fps."
    )
    output: consistency.ConsistencyFigures = Field(description="Figures of the result video.")
    cache_hit: bool = Field(description="Figures read from the cache (same video bytes).")
    wall_s: float = Field(description="Wall-clock seconds the measurement took.")
    cpu_s: float = Field(description="CPU seconds the measurement took.")
    notes: list[str] = Field(default_factory=list, description="How to read the figures.")


def consistency_of_file(
    ctx: StageContext,
    path: Path,
    settings: consistency.ConsistencySettings,
    use_cache: bool = True,
    limits: video.InputLimits | None = None,
) -> tuple[consistency.ConsistencyFigures, bool]:
    """A video's consistency figures, cached under the sha256 of its bytes and the settings;
    returns (figures, whether they came from the cache)."""
    key = content_key(
        "consistency", consistency.CONSISTENCY_CODE_VERSION, settings, [hash_file(path)]
    )
    data = ctx.cache.get(key) if use_cache else None
    if data is not None:
        return consistency.ConsistencyFigures.model_validate_json(data), True
    figures = consistency.measure_video(path, settings, limits or ctx.limits)
    if use_cache:
        meta = {"stage": "consistency", "frames": figures.frames}
        ctx.cache.put(key, figures.model_dump_json().encode(), meta)
    return figures, False


def result_consistency(ctx: StageContext, result_key: str, plan) -> dict:
    """The consistency section of a job's report, measured on its result in the store."""
    settings = consistency.ConsistencySettings(
        chunk_frames=plan.chunk_frames, generation_fps=plan.generation.fps
    )
    # Our own output: the input limits do not apply (a retime=0.5 job lasts twice its input).
    limits = ctx.limits.model_copy(
        update={"max_bytes": 1 << 62, "max_duration_s": 1e9, "max_pixels": 7680 * 4320}
    )
    timing = StageRecord(stage="consistency")
    with measured(timing), tempfile.TemporaryDirectory(prefix="motionserve-cons-") as scratch:
        path = ctx.store.get_file(result_key, Path(scratch) / "result.mp4")
        figures, hit = consistency_of_file(ctx, path, settings, plan.cache, limits)
    section = ConsistencySection(
        settings=settings, output=figures, cache_hit=hit, wall_s=timing.wall_s,
        cpu_s=timing.cpu_s, notes=[CONSISTENCY_NOTE],
    )  # fmt: skip
    return section.model_dump(mode="json")
