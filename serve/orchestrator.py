"""Runs a plan's stages with content-addressed caching.

`LocalRunner` calls the Ray-free stage classes in this process (the `motionserve edit`/`demo`
path and the reference the Serve pipeline is measured against). Each stage's output is stored
under a key chained from its inputs' keys, and the chain is walked from the end: a repeat of the
same video and style finds the last artifact and never opens the video.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deployments import motion, pose, video
from serve.cache import ArtifactCache, content_key, hash_file
from serve.pipeline import Plan

POSE_MAP_VIDEO_VERSION = "posemap-video-1"


@dataclass
class StageRecord:
    """What one stage cost in this run; a cache hit costs (almost) nothing."""

    stage: str
    key: str
    cache_hit: bool
    wall_s: float
    cpu_s: float
    frames: int = 0


@dataclass
class RunReport:
    output: str
    stages: list[StageRecord] = field(default_factory=list)

    @property
    def cpu_s(self) -> float:
        return sum(record.cpu_s for record in self.stages)

    @property
    def frames_decoded(self) -> int:
        return sum(r.frames for r in self.stages if r.stage == "decode" and not r.cache_hit)

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "cpu_s": self.cpu_s,
            "stages": [asdict(s) for s in self.stages],
        }


@dataclass(frozen=True)
class StageKeys:
    """The chain of content keys for one video and plan (computed before any work)."""

    source: str
    decode: str
    pose: str
    motion: str
    pose_map_video: str

    @classmethod
    def for_plan(cls, video_path: Path, plan: Plan) -> StageKeys:
        source = hash_file(video_path)
        decode = content_key("decode", video.VIDEO_CODE_VERSION, plan.decode, [source])
        poses = content_key("pose", pose.POSE_CODE_VERSION, plan.pose, [decode])
        editor = motion.MotionEditor(motion.parse_styles(plan.styles))
        edited = content_key("motion", motion.MOTION_CODE_VERSION, editor.settings_key(), [poses])
        maps = content_key(
            "pose_map_video", POSE_MAP_VIDEO_VERSION, plan.pose_map_encoding(), [edited]
        )
        return cls(source, decode, poses, edited, maps)


class LocalRunner:
    """Runs the CPU stages of a plan in this process, reusing cached artifacts."""

    def __init__(self, cache: ArtifactCache, limits: video.InputLimits | None = None):
        self.cache = cache
        self.limits = limits or video.InputLimits()

    def pose_map_video(self, video_path: Path, plan: Plan, output: Path) -> RunReport:
        """Edit the motion of `video_path` and write its ControlNet pose maps as an MP4."""
        keys = StageKeys.for_plan(Path(video_path), plan)
        report = RunReport(output=str(output))
        job = _Job(self, Path(video_path), plan, keys, report)
        job.pose_map_video(Path(output))
        return report


class _Job:
    """One run's state: the lazily computed stage outputs and the records of what they cost."""

    def __init__(self, runner: LocalRunner, video_path: Path, plan: Plan, keys, report):
        self.runner, self.video_path, self.plan, self.keys, self.report = (
            runner,
            video_path,
            plan,
            keys,
            report,
        )
        self._decoded_frames = 0

    def pose_map_video(self, output: Path) -> None:
        def compute(path: Path) -> None:
            edited = self.edited_poses()
            width, height = edited.width, edited.height
            chunk = self.plan.decode.chunk_frames
            maps = (
                motion.render_pose_maps(edited, width, height, frames=slice(i, i + chunk))
                for i in range(0, len(edited), chunk)
            )
            video.encode_mp4(maps, path, self.plan.pose_map_encoding())

        self._stage(
            "pose_map_video",
            self.keys.pose_map_video,
            lambda: self.runner.cache.get_or_compute_file(
                self.keys.pose_map_video, compute, output, self._meta("pose_map_video")
            )[1],
        )

    def edited_poses(self) -> pose.PoseSequence:
        result: dict = {}

        def compute() -> bytes:
            editor = motion.MotionEditor(motion.parse_styles(self.plan.styles))
            return editor.edit(self.poses()).to_bytes()

        def run() -> bool:
            data, hit = self.runner.cache.get_or_compute(
                self.keys.motion, compute, self._meta("motion")
            )
            result["seq"] = pose.PoseSequence.from_bytes(data)
            return hit

        self._stage("motion", self.keys.motion, run)
        return result["seq"]

    def poses(self) -> pose.PoseSequence:
        """Pose per generation frame; on a miss this decodes (the only stage reading frames)."""
        result: dict = {}

        def run() -> bool:
            data, hit = self.runner.cache.get_or_compute(
                self.keys.pose, lambda: self._decode_and_extract().to_bytes(), self._meta("pose")
            )
            result["seq"] = pose.PoseSequence.from_bytes(data)
            return hit

        self._stage("pose", self.keys.pose, run)
        return result["seq"]

    def _decode_and_extract(self) -> pose.PoseSequence:
        info = video.probe(self.video_path, self.runner.limits)
        extractor = pose.PoseExtractor(self.plan.pose)
        parts, decode_wall, decode_cpu = [], 0.0, 0.0
        try:
            chunks = video.decode_chunks(
                self.video_path, self.plan.decode, self.runner.limits, info
            )
            while True:
                wall0, cpu0 = time.perf_counter(), time.process_time()
                chunk = next(chunks, None)
                decode_wall += time.perf_counter() - wall0
                decode_cpu += time.process_time() - cpu0
                if chunk is None:
                    break
                self._decoded_frames += len(chunk.frames)
                parts.append(extractor.extract(chunk.frames, self.plan.decode.fps))
        finally:
            extractor.close()
        self.report.stages.append(
            StageRecord(
                "decode", self.keys.decode, False, decode_wall, decode_cpu, self._decoded_frames
            )
        )
        return pose.PoseSequence.concatenate(parts)

    def _stage(self, name: str, key: str, run: Callable[[], bool]) -> None:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        # Records of upstream stages run inside `run`; their time is subtracted from this one.
        before = len(self.report.stages)
        hit = run()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        inner = self.report.stages[before:]
        wall -= sum(r.wall_s for r in inner)
        cpu -= sum(r.cpu_s for r in inner)
        self.report.stages.append(StageRecord(name, key, hit, max(wall, 0.0), max(cpu, 0.0)))

    def _meta(self, stage: str) -> dict:
        return {"stage": stage, "plan": self.plan.model_dump(mode="json")}


def copy_result(source: Path, dest: Path) -> Path:
    """Copy an output atomically (temp file beside `dest`, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=".tmp-", delete=False) as tmp:
        shutil.copyfileobj(source.open("rb"), tmp)
    Path(tmp.name).replace(dest)
    return dest
