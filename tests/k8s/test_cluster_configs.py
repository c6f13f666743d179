"""The Ray cluster-launcher configs (`ray up cluster/<cloud>.yaml`) are valid for the Ray we pin,
share node types with each other, and put GPUs on spot first with an on-demand fallback."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from .conftest import REPO

CLOUDS = ("aws", "gcp")
NODE_TYPES = {"head", "cpu-ondemand", "gpu-spot", "gpu-ondemand"}


def load(cloud: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / f"{cloud}.yaml").read_text())


def is_spot(cloud: str, node_config: dict) -> bool:
    if cloud == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("cloud", CLOUDS)
def test_config_matches_the_schema_shipped_with_ray(cloud, ray_schema):
    config = load(cloud)
    jsonschema.validate(config, ray_schema)  # the file as written
    validate_config(prepare_config(config))  # and as `ray up` fills it out and checks it


def test_schema_check_is_not_vacuous(ray_schema):
    config = load("aws")
    config["available_node_types"]["gpu-spot"]["idle_timeout_minutes"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_gpu_workers_start_on_spot_with_on_demand_fallback(cloud):
    config = load(cloud)
    types = config["available_node_types"]
    assert set(types) == NODE_TYPES
    assert config["head_node_type"] == "head"
    assert config["idle_timeout_minutes"] > 0
    spot, fallback = types["gpu-spot"], types["gpu-ondemand"]
    assert spot["min_workers"] == 0 and fallback["min_workers"] == 0
    assert spot["priority"] > fallback["priority"]
    assert is_spot(cloud, spot["node_config"])
    for name in ("head", "cpu-ondemand", "gpu-ondemand"):
        assert not is_spot(cloud, types[name]["node_config"]), name
    assert types["head"]["resources"]["CPU"] == 0, "no Serve replicas on the head"
    assert "RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S" in " ".join(
        config["head_start_ray_commands"]
    )
    assert config["max_workers"] >= sum(
        t.get("max_workers", 0) for n, t in types.items() if n != "head"
    )


def test_clouds_share_node_types():
    aws, gcp = (load(c)["available_node_types"] for c in CLOUDS)
    keys = ("min_workers", "max_workers", "priority", "idle_timeout_s", "resources")
    for name in NODE_TYPES:
        assert {k: aws[name].get(k) for k in keys} == {k: gcp[name].get(k) for k in keys}, name


@pytest.mark.parametrize("cloud", CLOUDS)
def test_gpu_nodes_fit_the_scale_tier(cloud):
    """One GPU node holds a replica of every GPU stage of serve/configs/scale.yaml."""
    serve = yaml.safe_load((REPO / "serve" / "configs" / "scale.yaml").read_text())
    (app,) = serve["applications"]
    gpu_stages = [d["ray_actor_options"] for d in app["deployments"]
                  if d["ray_actor_options"].get("num_gpus", 0) > 0]  # fmt: skip
    diffusion = next(d for d in app["deployments"] if d["name"] == "Diffusion")
    types = load(cloud)["available_node_types"]
    for name in ("gpu-spot", "gpu-ondemand"):
        resources = types[name]["resources"]
        assert resources["CPU"] >= sum(s["num_cpus"] for s in gpu_stages), name
        assert resources["GPU"] >= sum(s["num_gpus"] for s in gpu_stages), name
    spot_gpus = types["gpu-spot"]["max_workers"] * types["gpu-spot"]["resources"]["GPU"]
    assert (
        spot_gpus
        >= diffusion["autoscaling_config"]["max_replicas"]
        * (diffusion["ray_actor_options"]["num_gpus"])
    )
