"""/readyz's stage check (`ServeStages.ready`) on a local Ray: not ready while a stage is not
deployed or its replica does not answer, ready once every stage answers; a stage scaled to zero
counts as ready and is not woken by the probe."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ray import serve

from serve import app as serve_app
from serve.app import (
    DiffusionServer,
    InterpolateServer,
    MotionServer,
    PoseServer,
    ServeStages,
    UpscaleServer,
    VideoServer,
)
from serve.config import AppArgs
from serve.factory import stage_context


class SlowVideoServer(VideoServer):
    """A video replica that answers the readiness probe only once `answer_file` exists."""

    def __init__(self, args: AppArgs, answer_file: str):
        super().__init__(args)
        self.answer_file = Path(answer_file)

    async def ready(self) -> bool:
        while not self.answer_file.exists():
            await asyncio.sleep(0.05)
        return True


STAGES = {  # handle name -> (deployment name, server class)
    "pose": ("Pose", PoseServer),
    "motion": ("Motion", MotionServer),
    "diffusion": ("Diffusion", DiffusionServer),
    "upscale": ("Upscale", UpscaleServer),
    "interpolate": ("Interpolate", InterpolateServer),
    "video": ("Video", VideoServer),
}


def deploy(name: str, cls, *init_args, **options) -> None:
    """One stage as an application of its own (app name = handle name)."""
    deployment_name, _ = STAGES[name]
    actor = {"num_cpus": 0, **({"num_gpus": 0.25} if name == "diffusion" else {})}
    deployment = serve.deployment(
        cls, name=deployment_name, ray_actor_options=actor, **options
    ).bind(*init_args)
    serve.run(deployment, name=name, route_prefix=None, blocking=False)


def wait_until_running(name: str, replicas: int = 1) -> None:
    deadline = time.monotonic() + 120
    while True:
        app = serve.status().applications.get(name)
        deployment = app.deployments.get(STAGES[name][0]) if app else None
        if deployment and deployment.replica_states.get("RUNNING", 0) == replicas:
            return
        assert time.monotonic() < deadline, f"{name} not running: {deployment}"
        time.sleep(0.1)  # polling the controller for a condition, not a fixed wait


def stage_calls(args: AppArgs) -> ServeStages:
    handles = {
        name: serve.get_deployment_handle(deployment, app_name=name, _check_exists=False)
        for name, (deployment, _) in STAGES.items()
    }
    return ServeStages(handles, stage_context(args))


def ready(calls: ServeStages) -> bool:
    calls._ready_until = -float("inf")  # each check asks the stages (no cached answer)
    return asyncio.run(calls.ready())


def test_ready_only_when_every_stage_is_deployed_and_answers(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(serve_app, "READY_TIMEOUT_S", 1.0)
    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    calls = stage_calls(args)
    assert not ready(calls)  # nothing deployed

    answer = tmp_path / "video-answers"
    for name, (_, cls) in STAGES.items():
        if name == "video":
            deploy(name, SlowVideoServer, args, str(answer))
        elif name == "interpolate":
            deploy(name, cls)
        elif name == "diffusion":  # scaled to zero, as the GPU stage is between jobs
            scale = {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1}
            deploy(name, cls, args, autoscaling_config=scale)
        else:
            deploy(name, cls, args)
    for name in STAGES:
        if name != "diffusion":
            wait_until_running(name)
    # Every stage is up, but the video replica does not answer within the timeout.
    assert not ready(calls)

    answer.touch()
    assert ready(calls)
    # The diffusion stage stayed at zero replicas: the probe did not wake it.
    diffusion = serve.status().applications["diffusion"].deployments["Diffusion"]
    assert diffusion.replica_states.get("RUNNING", 0) == 0

    # A positive answer is reused for a few seconds: a probe right after asks nobody.
    serve.delete("pose")
    assert asyncio.run(calls.ready())
    assert not ready(calls)  # asked again: the pose stage is gone
