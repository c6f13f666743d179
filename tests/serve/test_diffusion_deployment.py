"""The diffusion deployment on a local Ray with logical GPUs: keyed batches, runtime batch size,
idle unload and reload. (No CUDA here: the engine runs on the CPU inside a replica that holds
a fractional logical GPU, exactly as it is placed on a GPU node.)"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from ray import serve

from serve.app import DiffusionServer
from serve.chunks import ChunkSpec
from serve.config import AppArgs
from serve.pipeline import Plan, make_plan
from serve.stages import Frames, StageRecord


def plan_for(width: int) -> Plan:
    overrides = {"generation_long_side": width, "output_long_side": 256, "steps": 2}
    return make_plan("draft", 320, 180, model_id="tiny", overrides=overrides)


def maps(plan: Plan, frames: int, seed: int) -> Frames:
    g = plan.generation
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (frames, g.height, g.width, 3), dtype=np.uint8)
    return Frames(images, [StageRecord(stage="render")])


def deploy(tmp_path, user_config: dict, name: str):
    args = AppArgs(storage_uri=str(tmp_path / "store"))
    deployment = serve.deployment(
        DiffusionServer,
        name="Diffusion",
        ray_actor_options={"num_cpus": 1, "num_gpus": 0.5},
        max_ongoing_requests=16,
        user_config=user_config,
    )
    return serve.run(deployment.bind(args), name=name, route_prefix=None)


async def generate_all(handle, calls: list[tuple[Plan, Frames, ChunkSpec]]):
    responses = [
        handle.options(multiplexed_model_id=plan.generation.batch_key()).generate.remote(
            frames, spec, f"{'0' * 63}{i % 10}", plan.model_copy(update={"cache": False})
        )
        for i, (plan, frames, spec) in enumerate(calls)
    ]
    return await asyncio.gather(*responses)


def fields(job: str, chunk: int, seed: int) -> ChunkSpec:
    return ChunkSpec(job_id=job, chunk_index=chunk, prompt=f"p{seed}", seed=seed)


def test_batches_hold_one_key_and_callers_get_their_own_frames(ray_cluster, tmp_path):
    handle = deploy(tmp_path, {"max_batch_size": 4, "batch_wait_timeout_s": 0.5}, "keyed")
    small, large = plan_for(128), plan_for(192)
    calls = []
    for i in range(8):  # interleaved keys
        plan = small if i % 2 == 0 else large
        calls.append((plan, maps(plan, 2, i), fields(f"job{i}", i, seed=i)))
    results = asyncio.run(generate_all(handle, calls))
    for (plan, _, request), result in zip(calls, results, strict=True):
        g = plan.generation
        assert result.frames.shape == (2, g.height, g.width, 3)
        diffusion = result.records[-1]
        assert diffusion.stage == "diffusion" and diffusion.chunk == request.chunk_index
        assert result.records[0].stage == "render"  # upstream records travel with the frames
    batches = handle.recent_batches.remote().result()
    assert all(len(b["keys"]) == 1 for b in batches), batches
    # Interleaved keys still fill a batch: chunks wait per key (serve/keyed_batcher.py), where
    # @serve.batch would split each batch of 4 into two of 2.
    assert max(b["size"] for b in batches) == 4, batches
    assert sum(b["size"] for b in batches) == 8


def test_batch_size_changes_at_runtime_and_weights_unload_when_idle(ray_cluster, tmp_path):
    # user_config reaches the replica through `reconfigure` (Ray calls it at start and on a
    # config-file update; a Python-API redeploy like this one restarts the replica).
    handle = deploy(tmp_path, {"max_batch_size": 1, "batch_wait_timeout_s": 0.2,
                               "idle_unload_s": 1.0}, "reconf")  # fmt: skip
    plan = plan_for(128)
    calls = [(plan, maps(plan, 1, i), fields("j", i, i)) for i in range(4)]
    asyncio.run(generate_all(handle, calls))
    assert {b["size"] for b in handle.recent_batches.remote().result()} == {1}

    deploy(tmp_path, {"max_batch_size": 4, "batch_wait_timeout_s": 0.5,
                      "idle_unload_s": 1.0}, "reconf")  # fmt: skip
    asyncio.run(generate_all(handle, calls))
    sizes = [b["size"] for b in handle.recent_batches.remote().result()]
    assert max(sizes) > 1, sizes

    deadline = time.monotonic() + 30
    while any(handle.status.remote().result()["loaded"].values()):
        assert time.monotonic() < deadline, "weights were not unloaded after idle_unload_s"
        time.sleep(0.2)  # waiting on the replica's idle timer; polled, not a fixed sleep
    (again,) = asyncio.run(generate_all(handle, calls[:1]))
    assert again.records[-1].load_s > 0, "the next request reloads the weights (cold start)"
