"""A cancelled CPU stage call stops at its next frame batch on its replica: the replica is free
again within seconds, not when the call's frame loop would have ended, and the stopped call
caches nothing (serve/app.py `StageServer._work`, deployments/stopping.py)."""

from __future__ import annotations

import time

import pytest
from ray import serve
from ray.serve.exceptions import RequestCancelledError

from serve import stages
from serve.app import PoseServer
from serve.cache import hash_file
from serve.config import AppArgs
from serve.factory import stage_context
from serve.pipeline import make_plan
from tests.media import make_clip

FREE_WITHIN_S = 5.0  # from the cancel to no call at work on the replica


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.02)  # polling the replica's status
    return value


def test_a_cancelled_pose_call_stops_at_its_next_frame(ray_cluster, tmp_path):
    args = AppArgs(storage_uri=str(tmp_path / "store"))
    deployment = serve.deployment(PoseServer, name="Pose", ray_actor_options={"num_cpus": 1})
    handle = serve.run(deployment.bind(args), name="stagecancel", route_prefix=None)
    plan = make_plan("draft", 128, 96, model_id="tiny")
    cache = stage_context(args).cache

    def clip(name: str, frames: int):
        path = make_clip(tmp_path / name, frames=frames, fps=12.0, width=128, height=96)
        return str(path), stages.job_keys(hash_file(path), plan)

    (short, short_keys), (long, long_keys) = clip("short.mp4", 24), clip("long.mp4", 12 * 120)
    decode, poses = handle.extract.remote(short, short_keys, plan).result()
    per_frame_s = (decode.wall_s + poses.wall_s) / poses.frames
    long_frames = 12 * 120

    response = handle.extract.remote(long, long_keys, plan)
    status = handle.status.remote
    wait_for(lambda: status().result()["batches_begun"] >= 5, 60, "the long call never ran")
    response.cancel()
    cancelled = time.monotonic()
    wait_for(lambda: status().result()["in_flight"] == 0, FREE_WITHIN_S, "still at work")
    free_s = time.monotonic() - cancelled
    with pytest.raises(RequestCancelledError):
        response.result()
    assert free_s < long_frames * per_frame_s / 4  # far from the end of its frame loop
    assert not cache.contains(long_keys.pose)  # nothing half-made was cached

    _, other_keys = clip("other.mp4", 25)
    started = time.monotonic()
    _, again = handle.extract.remote(str(tmp_path / "other.mp4"), other_keys, plan).result()
    assert again.frames == 25 and not again.cache_hit  # the replica serves on at once
    assert time.monotonic() - started < 25 * per_frame_s + FREE_WITHIN_S
    assert cache.contains(other_keys.pose)
