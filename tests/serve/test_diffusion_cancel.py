"""Cancelled diffusion calls stop costing: a call cancelled through its `DeploymentResponse`
leaves the replica's queue at once, and one in the running batch leaves it at the next
denoising step (the batch stops when all its calls are gone)."""

from __future__ import annotations

import time

from ray import serve

from serve.app import DiffusionServer
from serve.config import AppArgs
from serve.pipeline import make_plan
from tests.serve.test_diffusion_deployment import fields, maps

EMPTY_WITHIN_S = 5.0


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)  # polling the replica's status
    return value


def test_cancelled_calls_leave_the_queue_and_the_running_batch(ray_cluster, tmp_path):
    args = AppArgs(storage_uri=str(tmp_path / "store"))
    deployment = serve.deployment(
        DiffusionServer, name="Diffusion", ray_actor_options={"num_cpus": 1, "num_gpus": 0.5},
        max_ongoing_requests=16,
        user_config={"max_batch_size": 2, "batch_wait_timeout_s": 0.0},
    )  # fmt: skip
    handle = serve.run(deployment.bind(args), name="cancel", route_prefix=None)
    overrides = {"generation_long_side": 128, "output_long_side": 256, "steps": 40}
    plan = make_plan("draft", 320, 180, model_id="tiny", overrides=overrides)
    plan = plan.model_copy(update={"cache": False})
    keyed = handle.options(multiplexed_model_id=plan.generation.batch_key())

    def call(i: int):
        return keyed.generate.remote(maps(plan, 3, i), fields(f"job{i}", i, i), "0" * 64, plan)

    started = time.monotonic()
    call(0).result()  # loads the engine
    alone_s = time.monotonic() - started
    responses = [call(i) for i in range(1, 9)]
    status = handle.status.remote
    wait_for(lambda: status().result()["running"] > 0, 60, "no batch started")
    assert status().result()["waiting"] > 0  # 2 running, the rest queued behind them
    for response in responses:
        response.cancel()
    cancelled = time.monotonic()
    wait_for(
        lambda: (s := status().result())["waiting"] == s["running"] == s["in_flight"] == 0,
        EMPTY_WITHIN_S, "cancelled calls still on the replica",
    )  # fmt: skip
    emptied_s = time.monotonic() - cancelled
    batches = handle.recent_batches.remote().result()
    dropped = [row for batch in batches for row in batch.get("dropped", [])]
    assert dropped, batches  # the running batch's calls left it
    for batch in batches:
        for row in batch.get("dropped", []):
            assert row["frames"] == 0 and row["notes"], row
            # No step timed (None): the rows left at the batch's first step, before any ran.
            assert row["after_cancel_s"] <= (batch["longest_step_s"] or 0.0), (row, batch)
    assert len(batches) <= 2  # the warm-up and the batch that ran: the queued ones never ran
    assert emptied_s < alone_s  # it did not wait for the 40-step batch to end
    again = call(20).result()  # the replica serves on
    assert again.frames.shape[0] == 3
