"""The fake autoscaling cluster's config and the scenario's Serve config, without starting Ray
(tests/cluster runs them): they must mirror cluster/*.yaml and serve/configs/scale.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

from serve.autoscale_scenario import SCALE_CONFIG, scenario_serve_config
from serve.fake_cluster import FAKE_PROVIDER, HEAD_TYPE, FakeCluster, gpu_node_types

REPO = Path(__file__).parents[2]


def test_gpu_groups_mirror_the_cluster_launcher_configs(tmp_path):
    launcher = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    config = FakeCluster(tmp_path, gpu_node_types()).autoscaling_config()
    types = config["available_node_types"]
    for name in ("gpu-spot", "gpu-ondemand"):
        assert name in launcher["available_node_types"]
        assert types[name]["min_workers"] == launcher["available_node_types"][name]["min_workers"]
        assert types[name]["resources"]["GPU"] == 1
    # spot first, as in cluster/aws.yaml
    assert types["gpu-spot"]["priority"] > types["gpu-ondemand"]["priority"]
    assert types["gpu-spot"]["resources"]["spot"] == 1
    assert types["gpu-ondemand"]["resources"]["on-demand"] == 1
    assert "GPU" not in types[HEAD_TYPE]["resources"]  # the head runs CPU stages only
    # the provider by class: under type fake_multinode Ray would look for a missing example.yaml
    assert config["provider"]["type"] == "external"
    assert config["provider"]["module"] == FAKE_PROVIDER
    assert all(
        not label.startswith("ray.io/") for t in types.values() for label in t.get("labels", {})
    )


def test_set_max_workers_rewrites_the_config_the_autoscaler_reads(tmp_path):
    cluster = FakeCluster(tmp_path, gpu_node_types(spot_max=3))
    cluster.write_config()
    cluster.set_max_workers("gpu-spot", 0)
    written = yaml.safe_load(cluster.config_path.read_text())
    assert written["available_node_types"]["gpu-spot"]["max_workers"] == 0
    assert written["available_node_types"]["gpu-ondemand"]["max_workers"] == 1


def test_scenario_config_is_scale_yaml_smaller(tmp_path):
    scale = yaml.safe_load(SCALE_CONFIG.read_text())
    config = scenario_serve_config(str(tmp_path / "store"), port=8123)
    (app,) = config["applications"]
    (scale_app,) = scale["applications"]
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in scale_app["deployments"]]
    assert app["import_path"] == scale_app["import_path"]
    assert app["args"]["base_model"] == app["args"]["controlnet_model"] == "tiny"
    by_name = {d["name"]: d for d in app["deployments"]}
    diffusion = by_name.pop("Diffusion")
    assert diffusion["autoscaling_config"]["min_replicas"] == 0
    assert diffusion["ray_actor_options"]["num_gpus"] > 0.5  # one replica per GPU node
    for name, deployment in by_name.items():  # everything else on the CPU head
        assert deployment["ray_actor_options"]["num_gpus"] == 0, name
    assert config["http_options"]["port"] == 8123
