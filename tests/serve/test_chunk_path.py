"""One chunk path (serve/chunks.py) for Serve and in-process runs: a chunk generated on one
path is a cache hit on the other, billed the same way (the job that generated the frames pays
once, another job nothing), and nothing is generated twice."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ray import serve

from deployments import diffusion
from serve.app import DiffusionServer
from serve.chunks import ChunkSpec
from serve.config import AppArgs
from serve.factory import engine_config, make_upscaler, stage_context
from serve.local_run import LocalStages
from serve.pipeline import Plan, make_plan
from serve.stages import Frames, StageRecord


@pytest.fixture
def app_args(tmp_path) -> AppArgs:
    return AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")


def tiny_plan() -> Plan:
    overrides = {"generation_long_side": 128, "output_long_side": 256, "steps": 2}
    return make_plan("draft", 320, 180, model_id="tiny", overrides=overrides)


def pose_maps(plan: Plan) -> Frames:
    g = plan.generation
    images = np.random.default_rng(0).integers(0, 255, (2, g.height, g.width, 3), np.uint8)
    return Frames(images, [StageRecord(stage="render", chunk=0)])


def chunk(job_id: str) -> ChunkSpec:
    return ChunkSpec(job_id=job_id, chunk_index=0, prompt="a dancer", seed=3)


class CountingEngine(diffusion.DiffusionEngine):
    """The tiny engine, counting the chunks it generates."""

    generated = 0

    def generate(self, requests, **options):
        CountingEngine.generated += len(requests)
        return super().generate(requests, **options)


def in_process(app_args: AppArgs, plan: Plan, spec: ChunkSpec, key: str) -> Frames:
    engine = CountingEngine(engine_config(app_args, plan.generation.model_id))
    calls = LocalStages(stage_context(app_args), engine, make_upscaler(app_args))

    async def run():
        return await calls.generate(pose_maps(plan), spec, key, plan)

    return asyncio.run(run())


def through_serve(handle, plan: Plan, spec: ChunkSpec, key: str) -> Frames:
    keyed = handle.options(multiplexed_model_id=plan.generation.batch_key())
    return keyed.generate.remote(pose_maps(plan), spec, key, plan).result()


def deploy(app_args: AppArgs, name: str):
    deployment = serve.deployment(
        DiffusionServer, name="Diffusion", ray_actor_options={"num_cpus": 0, "num_gpus": 0.5}
    )
    return serve.run(deployment.bind(app_args), name=name, route_prefix=None)


def assert_billed_like(first: Frames, own: Frames, other: Frames) -> None:
    """`own` (the same job again) bills the first run's diffusion record once; `other` is free."""
    work = first.records[-1]
    assert not work.cache_hit and work.work_units["total"] > 0
    again = own.records[-1]
    assert (again.cache_hit, again.cpu_s, again.gpu_s, again.work_units) == (
        False, work.cpu_s, work.gpu_s, work.work_units,
    )  # fmt: skip
    assert "billed once" in again.notes[-1]
    free = other.records[-1]
    assert free.cache_hit and free.cpu_s == free.gpu_s == 0 and not free.work_units
    for result in (own, other):
        np.testing.assert_array_equal(result.frames, first.frames)
        assert result.records[0].stage == "render"  # the maps' records still travel along


def test_a_chunk_generated_in_process_is_a_cache_hit_through_serve(ray_cluster, app_args):
    plan, key = tiny_plan(), "a1" * 32
    CountingEngine.generated = 0
    first = in_process(app_args, plan, chunk("job-a"), key)
    assert CountingEngine.generated == 1
    handle = deploy(app_args, "from-local")
    own = through_serve(handle, plan, chunk("job-a"), key)
    other = through_serve(handle, plan, chunk("job-b"), key)
    assert_billed_like(first, own, other)
    assert handle.recent_batches.remote().result() == []  # the replica generated nothing


def test_a_chunk_generated_through_serve_is_a_cache_hit_in_process(ray_cluster, app_args):
    plan, key = tiny_plan(), "b2" * 32
    handle = deploy(app_args, "to-local")
    first = through_serve(handle, plan, chunk("job-a"), key)
    assert [b["size"] for b in handle.recent_batches.remote().result()] == [1]
    CountingEngine.generated = 0
    own = in_process(app_args, plan, chunk("job-a"), key)
    other = in_process(app_args, plan, chunk("job-b"), key)
    assert_billed_like(first, own, other)
    assert CountingEngine.generated == 0  # the in-process engine generated nothing
