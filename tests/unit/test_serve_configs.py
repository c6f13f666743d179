"""The tier configs are valid Serve deploy configs whose args are valid AppArgs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve.config import AppArgs

CONFIGS = sorted((Path(__file__).parents[2] / "serve" / "configs").glob("*.yaml"))
STAGES = {"Ingress", "Video", "Pose", "Motion", "Diffusion", "Interpolate", "Upscale"}


def test_every_tier_has_a_config():
    assert {p.stem for p in CONFIGS} == {"local", "dev", "mvp", "scale"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid(path):
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = config.applications
    assert app.import_path == "serve.app:build_app"
    args = AppArgs.model_validate(app.args)
    assert args.tier == path.stem
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == STAGES
    diffusion = deployments["Diffusion"]
    assert diffusion.autoscaling_config["min_replicas"] == 0, "GPU replicas scale to zero"
    assert diffusion.max_ongoing_requests > diffusion.user_config["max_batch_size"], (
        "batches never fill unless more requests than the batch size can be in flight"
    )


def test_app_args_reject_unknown_keys():
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"tier": "dev", "base_modle": "x"})
