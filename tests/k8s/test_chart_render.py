"""The Helm chart, rendered by a real Helm for every values file and checked against the schemas
Kubernetes and KubeRay would apply: core objects with kubernetes-validate, the RayService with the
KubeRay v1.7.0 CRD (unknown fields rejected), serveConfigV2 with Ray Serve's and the app's own."""

from __future__ import annotations

import copy
import json
import math
import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import TypeAdapter
from ray.serve.schema import ServeDeploySchema

from serve.config import AppArgs, TenantKey

from .conftest import (
    CHART,
    KUBE_VERSION,
    REPO,
    TIER_VALUES,
    only,
    run_helm,
    values_args,
    worker_groups,
)

TIER_FILES = tuple(f"values-{tier}.yaml" for tier in TIER_VALUES)
ALL_VALUES = ((),) + tuple((name,) for name in TIER_FILES)  # () is values.yaml alone
CUSTOM_KINDS = {"RayService", "ServiceMonitor"}
GPU_GROUPS = ("gpu-spot", "gpu-ondemand")
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # sha256("test")


def ids(values_files: tuple[str, ...]) -> str:
    return values_files[0] if values_files else "values.yaml"


def tier_values(name: str) -> dict:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return deep_merge(defaults, yaml.safe_load((CHART / name).read_text()))


def deep_merge(dst: dict, src: dict) -> dict:
    """The merge the chart documents: maps key by key, everything else replaces."""
    out = copy.deepcopy(dst)
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(only(docs, "RayService")["spec"]["serveConfigV2"])


def deployments(config: dict) -> dict[str, dict]:
    (app,) = config["applications"]
    return {d["name"]: d for d in app["deployments"]}


def ray_pod_templates(docs: list[dict]) -> dict[str, dict]:
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]}
    pods.update({name: g["template"] for name, g in worker_groups(docs).items()})
    return pods


# --- helm lint and kubernetes-validate --------------------------------------------------------


@pytest.mark.parametrize("values_files", ALL_VALUES, ids=ids)
def test_lint_strict_passes(helm, values_files):
    result = run_helm(helm, "lint", "--strict", str(CHART), *values_args(values_files, ()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values_files", ALL_VALUES, ids=ids)
def test_core_objects_validate_for_target_kubernetes(render, values_files):
    docs = render(*values_files)
    core = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    assert {d["kind"] for d in docs} - {d["kind"] for d in core} <= CUSTOM_KINDS
    assert {"ServiceAccount", "PodDisruptionBudget"} <= {d["kind"] for d in core}
    for doc in core:
        # strict=True: the -strict schemas reject fields Kubernetes does not know.
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_kubernetes_validate_catches_a_bad_core_object(render):
    ingress = copy.deepcopy(only(render("values-mvp.yaml"), "Ingress"))
    ingress["spec"]["rules"][0]["http"]["paths"][0]["pathTyp"] = "Prefix"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ingress, KUBE_VERSION, strict=True)


# --- the RayService against the KubeRay CRD ---------------------------------------------------


def strict_schema(node):
    """Reject unknown fields wherever the CRD lists properties and does not preserve unknowns."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayservice_validator(crd_dir):
    crd = yaml.safe_load((crd_dir / "ray.io_rayservices.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict_schema(v1["schema"]["openAPIV3Schema"]))


def crd_errors(validator, doc: dict) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


@pytest.mark.parametrize("values_files", ALL_VALUES, ids=ids)
def test_rayservice_matches_kuberay_crd(render, rayservice_validator, values_files):
    rayservice = only(render(*values_files), "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert crd_errors(rayservice_validator, rayservice) == []


def test_crd_check_rejects_unknown_fields(render, rayservice_validator):
    rayservice = copy.deepcopy(only(render("values-scale.yaml"), "RayService"))
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 0
    rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]["idleTimeout"] = 3
    errors = crd_errors(rayservice_validator, rayservice)
    assert any("minReplica" in e for e in errors), errors
    assert any("idleTimeout" in e for e in errors), errors


# --- serveConfigV2 is the app's config --------------------------------------------------------


@pytest.mark.parametrize("values_file", TIER_FILES)
def test_serve_config_is_the_tier_config_plus_documented_overrides(render, values_file):
    values = tier_values(values_file)
    rendered = serve_config(render(values_file))

    config = ServeDeploySchema.model_validate(rendered)
    (app,) = config.applications
    assert app.import_path == "serve.app:build_app"
    AppArgs.model_validate(app.args)

    expected = yaml.safe_load(
        (REPO / "serve" / "configs" / f"{values['serve']['config']}.yaml").read_text()
    )
    (expected_app,) = expected["applications"]
    expected_app["args"] = deep_merge(expected_app["args"], values["serve"]["appArgs"])
    for deployment in expected_app["deployments"]:
        override = values["serve"]["deploymentOverrides"].get(deployment["name"], {})
        deployment.update(deep_merge(deployment, override))
    assert rendered == expected


def test_burst_uses_scale_config_with_burst_prices_and_a_higher_gpu_ceiling(render):
    scale = deployments(serve_config(render("values-scale.yaml")))
    burst_config = serve_config(render("values-burst.yaml"))
    burst = deployments(burst_config)
    assert burst_config["applications"][0]["args"]["tier"] == "burst"
    assert burst["Diffusion"]["autoscaling_config"]["max_replicas"] == 32
    # Keys the override does not name are kept from scale.yaml.
    for key in ("min_replicas", "target_ongoing_requests", "downscale_delay_s"):
        assert (
            burst["Diffusion"]["autoscaling_config"][key]
            == (scale["Diffusion"]["autoscaling_config"][key])
        )
    assert burst["Diffusion"]["user_config"] == scale["Diffusion"]["user_config"]
    assert burst["Pose"] == scale["Pose"]


def test_overrides_apply_zero_false_and_replace_lists(render):
    docs = render(
        "values-dev.yaml",
        sets=(
            "serve.deploymentOverrides.Video.autoscaling_config.min_replicas=0",
            "serve.appArgs.allowed_input_buckets={uploads,archive}",
            "serve.appArgs.max_chunks_in_flight=8",
        ),
    )
    config = serve_config(docs)
    video = deployments(config)["Video"]
    assert video["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 2}
    args = AppArgs.model_validate(config["applications"][0]["args"])
    assert args.allowed_input_buckets == ["uploads", "archive"]
    assert args.max_chunks_in_flight == 8
    assert args.base_model == "s3://motionserve-models/sd15"


# --- typos fail -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "bad_key"),
    [
        ("gpuSpot.maxReplica=3", "maxReplica"),
        ("ingress.enabld=true", "enabld"),
        ("serve.appArgs.base_modle=s3://x/y", "base_modle"),
        ("serve.appArgs.limits.max_byte=10", "max_byte"),
        ("serve.deploymentOverrides.Difusion.max_ongoing_requests=3", "Difusion"),
        ("nodePlacement.provider=aks", "provider"),
    ],
)
def test_typo_in_values_fails_template(helm, setting, bad_key):
    result = run_helm(helm, "template", "ms", str(CHART), "--set", setting)
    assert result.returncode != 0
    assert bad_key in result.stderr, result.stderr


def test_typo_in_values_file_fails_lint(helm, tmp_path):
    typo = tmp_path / "values-typo.yaml"
    typo.write_text("gpuSpot:\n  minReplicas: 0\n  maxReplicass: 4\n")
    result = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(typo))
    assert result.returncode != 0
    assert "maxReplicass" in result.stdout + result.stderr


def test_inconsistent_values_fail_with_a_clear_message(helm):
    cases = {
        "gcsFaultTolerance.enabled=true": "redisAddress",
        "drain.maxWaitSeconds=200": "maxWaitSeconds",
        "gpuSpot.minReplicas=3": "minReplicas",
    }
    for setting, words in cases.items():
        result = run_helm(helm, "template", "ms", str(CHART), "--set", setting)
        assert result.returncode != 0, setting
        assert words in result.stderr, result.stderr


# --- GPU groups: spot from zero, on-demand fallback -------------------------------------------


@pytest.mark.parametrize("values_file", TIER_FILES)
def test_gpu_groups_scale_from_zero_on_spot_with_on_demand_fallback(render, values_file):
    docs = render(values_file)
    groups = worker_groups(docs)
    assert set(groups) == {"cpu", *GPU_GROUPS}
    spot, fallback = groups["gpu-spot"], groups["gpu-ondemand"]
    assert spot["minReplicas"] == 0 and spot["replicas"] == 0
    assert fallback["minReplicas"] == 0
    assert spot["priority"] > fallback["priority"], "spot must be tried first"
    spot_pod, fallback_pod = spot["template"]["spec"], fallback["template"]["spec"]
    assert spot_pod["nodeSelector"]["karpenter.sh/capacity-type"] == "spot"
    assert {"key": "karpenter.sh/capacity-type", "operator": "Equal", "value": "spot",
            "effect": "NoSchedule"} in spot_pod["tolerations"]  # fmt: skip
    assert fallback_pod["nodeSelector"]["karpenter.sh/capacity-type"] == "on-demand"
    cpu_pod = groups["cpu"]["template"]["spec"]
    assert cpu_pod["nodeSelector"]["karpenter.sh/capacity-type"] == "on-demand"
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    for pod in (spot_pod, fallback_pod):
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            pod["tolerations"]
        )


@pytest.mark.parametrize("values_file", TIER_FILES)
def test_gpu_groups_fit_the_serve_config(render, values_file):
    """A GPU pod holds one replica of each GPU stage; spot alone reaches Diffusion's ceiling."""
    docs = render(values_file)
    stages = deployments(serve_config(docs))
    gpu_stages = [d["ray_actor_options"] for d in stages.values()
                  if d["ray_actor_options"].get("num_gpus", 0) > 0]  # fmt: skip
    assert stages["Diffusion"]["ray_actor_options"] in gpu_stages
    for name in GPU_GROUPS:
        group = worker_groups(docs)[name]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        ray_cpus = float(group["rayStartParams"].get("num-cpus", limits["cpu"]))
        assert ray_cpus >= sum(options["num_cpus"] for options in gpu_stages), name
        assert limits["nvidia.com/gpu"] >= sum(options["num_gpus"] for options in gpu_stages)
        assert ray_cpus <= float(limits["cpu"]), name
    diffusion = stages["Diffusion"]
    spot = worker_groups(docs)["gpu-spot"]
    spot_gpus = (
        spot["maxReplicas"]
        * (spot["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    )
    needed = (
        diffusion["autoscaling_config"]["max_replicas"]
        * (diffusion["ray_actor_options"]["num_gpus"])
    )
    assert spot_gpus >= math.ceil(needed - 1e-9)


@pytest.mark.parametrize(
    ("provider", "spot_selector", "on_demand_selector"),
    [
        ("gke", {"cloud.google.com/gke-spot": "true"}, {}),
        ("eks", {"eks.amazonaws.com/capacityType": "SPOT"},
         {"eks.amazonaws.com/capacityType": "ON_DEMAND"}),
        ("none", {}, {}),
    ],
)  # fmt: skip
def test_spot_presets(render, provider, spot_selector, on_demand_selector):
    docs = render("values-scale.yaml", sets=(f"nodePlacement.provider={provider}",))
    groups = worker_groups(docs)
    spot = groups["gpu-spot"]["template"]["spec"]
    fallback = groups["gpu-ondemand"]["template"]["spec"]
    assert spot.get("nodeSelector", {}) == spot_selector
    assert fallback.get("nodeSelector", {}) == on_demand_selector
    tolerated = {t["key"] for t in spot["tolerations"]}
    assert tolerated == {"nvidia.com/gpu", *spot_selector}


def test_group_selectors_and_tolerations_extend_the_preset(render):
    docs = render(
        "values-scale.yaml",
        sets=(
            "gpuSpot.nodeSelector.karpenter\\.k8s\\.aws/instance-family=g6",
            "gpuSpot.tolerations[0].key=dedicated",
            "gpuSpot.tolerations[0].operator=Exists",
        ),
    )
    spot = worker_groups(docs)["gpu-spot"]["template"]["spec"]
    assert spot["nodeSelector"] == {
        "karpenter.sh/capacity-type": "spot",
        "karpenter.k8s.aws/instance-family": "g6",
    }
    assert {"key": "dedicated", "operator": "Exists"} in spot["tolerations"]


# --- autoscaling, draining, fault tolerance ---------------------------------------------------


@pytest.mark.parametrize("values_file", TIER_FILES)
def test_autoscaler_v2_with_idle_timeout_and_spot_allocation_timeout(render, values_file):
    values = tier_values(values_file)
    cluster = only(render(values_file), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert options["version"] == "v2"
    assert options["idleTimeoutSeconds"] == values["autoscaler"]["idleTimeoutSeconds"]
    env = {e["name"]: e["value"] for e in options["env"]}
    assert env["RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S"] == str(
        values["autoscaler"]["spotAllocationTimeoutSeconds"]
    )


@pytest.mark.parametrize("values_file", TIER_FILES)
def test_workers_drain_before_termination(render, values_file):
    for name, group in worker_groups(render(values_file)).items():
        pod = group["template"]["spec"]
        hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert "ray drain-node --reason=DRAIN_NODE_REASON_PREEMPTION" in hook[-1], name
        assert (
            pod["terminationGracePeriodSeconds"]
            > tier_values(values_file)["drain"]["maxWaitSeconds"]
        )


def test_head_is_protected_from_voluntary_eviction(render):
    head = ray_pod_templates(render("values-scale.yaml"))["head"]
    assert head["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
    assert head["spec"]["nodeSelector"] == {"karpenter.sh/capacity-type": "on-demand"}


@pytest.mark.parametrize(("values_file", "enabled"), [("values-dev.yaml", False),
                                                      ("values-scale.yaml", True),
                                                      ("values-burst.yaml", True)])  # fmt: skip
def test_gcs_fault_tolerance_uses_external_redis(render, values_file, enabled):
    cluster = only(render(values_file), "RayService")["spec"]["rayClusterConfig"]
    if not enabled:
        assert "gcsFaultToleranceOptions" not in cluster
        return
    options = cluster["gcsFaultToleranceOptions"]
    assert options["redisAddress"] == "motionserve-redis-master:6379"
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"] == {
        "name": "motionserve-redis",
        "key": "redis-password",
    }


# --- identity, API keys, networking, metrics --------------------------------------------------


def ray_envs(docs: list[dict]) -> dict[str, dict[str, dict]]:
    return {
        name: {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        for name, pod in ray_pod_templates(docs).items()
    }


def test_api_key_secret_holds_hashes_every_ray_container_reads(render):
    docs = render(
        "values-dev.yaml", sets=("auth.apiKeys[0].tenant=acme", f"auth.apiKeys[0].keySha256={SHA}")
    )
    secret = only(docs, "Secret")
    keys = TypeAdapter(list[TenantKey]).validate_json(secret["stringData"]["api-keys.json"])
    assert keys == [TenantKey(tenant="acme", key_sha256=SHA)]
    for name, env in ray_envs(docs).items():
        ref = env["MOTIONSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "api-keys.json"}, name


def test_existing_api_key_secret_is_referenced_not_created(render):
    docs = render("values-dev.yaml", sets=("auth.existingSecret=tenant-keys",))
    assert not [d for d in docs if d["kind"] == "Secret"]
    for env in ray_envs(docs).values():
        assert env["MOTIONSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "tenant-keys"
    no_auth = render("values-dev.yaml")
    assert all("MOTIONSERVE_API_KEYS" not in env for env in ray_envs(no_auth).values())


def test_api_key_digests_can_go_into_app_args(render):
    docs = render(
        "values-dev.yaml",
        sets=(
            "serve.appArgs.api_keys[0].tenant=acme",
            f"serve.appArgs.api_keys[0].key_sha256={SHA}",
        ),
    )
    args = AppArgs.model_validate(serve_config(docs)["applications"][0]["args"])
    assert args.api_keys == [TenantKey(tenant="acme", key_sha256=SHA)]


def test_service_account_carries_irsa_and_workload_identity(render):
    docs = render(
        "values-scale.yaml",
        sets=(
            "serviceAccount.awsRoleArn=arn:aws:iam::123456789012:role/motionserve",
            "serviceAccount.gcpServiceAccount=ms@proj.iam.gserviceaccount.com",
        ),
    )
    account = only(docs, "ServiceAccount")
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/motionserve",
        "iam.gke.io/gcp-service-account": "ms@proj.iam.gserviceaccount.com",
    }
    for name, pod in ray_pod_templates(docs).items():
        assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"], name


def test_ingress_routes_to_the_serve_service(render):
    docs = render("values-mvp.yaml")
    serve_service = only(docs, "RayService")["spec"]["serveService"]
    backend = only(docs, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == serve_service["metadata"]["name"]
    assert backend["port"]["number"] == serve_service["spec"]["ports"][0]["port"]
    http = serve_config(docs)["http_options"]
    assert backend["port"]["number"] == http["port"]
    assert not [d for d in render("values-dev.yaml") if d["kind"] == "Ingress"]


def test_service_monitor_scrapes_every_ray_pod(render):
    docs = render("values-scale.yaml")
    monitor = only(docs, "ServiceMonitor")
    (metrics_service,) = [
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics")
    ]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics_service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    start_params = [cluster["headGroupSpec"]["rayStartParams"]] + [
        g["rayStartParams"] for g in cluster["workerGroupSpecs"]
    ]
    assert {p["metrics-export-port"] for p in start_params} == {"8080"}
    for name, pod in ray_pod_templates(docs).items():
        labels = pod["metadata"]["labels"]
        assert metrics_service["spec"]["selector"].items() <= labels.items(), name
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 8080, name
    assert not [d for d in render("values-dev.yaml") if d["kind"] == "ServiceMonitor"]


def test_each_pdb_selects_exactly_one_worker_group(render):
    docs = render("values-scale.yaml")
    pods = ray_pod_templates(docs)
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"].items()
        matched = [name for name, p in pods.items() if selector <= p["metadata"]["labels"].items()]
        assert len(matched) == 1 and matched[0] != "head", (pdb["metadata"]["name"], matched)


# --- documentation ----------------------------------------------------------------------------


def schema_node(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].removeprefix("#/$defs/")]
    return node


def test_every_value_is_documented():
    """Each key the schema declares carries a helm-docs `# --` comment in values.yaml."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, dict]] = [(-1, schema)]
    undocumented = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while stack[-1][0] >= indent:
            stack.pop()
        parent = schema_node(schema, stack[-1][1])
        key = stripped.split(":", 1)[0]
        declared = parent.get("properties", {})
        if key in declared:
            node = schema_node(schema, declared[key])
            is_leaf = "properties" not in node or not stripped.endswith(":")
            comment = _comment_above(lines, number)
            if is_leaf and not comment.startswith("# --"):
                undocumented.append(key)
            stack.append((indent, node))
        else:
            stack.append((indent, {}))
    assert undocumented == []


def _comment_above(lines: list[str], number: int) -> str:
    """The first line of the comment block directly above `lines[number]`."""
    first = ""
    index = number - 1
    while index >= 0 and lines[index].strip().startswith("#"):
        first = lines[index].strip()
        index -= 1
    return first


def test_chart_readme_lists_every_top_level_value():
    readme = (CHART / "README.md").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing = [key for key in schema["properties"] if f"`{key}" not in readme]
    assert missing == []


def test_default_values_render_without_tier_file(render):
    docs = render()
    assert serve_config(docs)["applications"][0]["args"]["tier"] == "dev"


# --- the image ----------------------------------------------------------------------------


def ray_images(docs: list[dict]) -> dict[str, str]:
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    images = {"autoscaler": cluster["autoscalerOptions"]["image"]}
    for name, pod in ray_pod_templates(docs).items():
        for container in pod["spec"]["containers"]:
            images[f"{name}/{container['name']}"] = container["image"]
    return images


@pytest.mark.parametrize("values_files", ALL_VALUES, ids=ids)
def test_every_ray_container_runs_the_image_make_image_builds(render, values_files):
    """Default: `motionserve:<pyproject version>`, the Dockerfile's image as `make image` tags
    it, with the Dockerfile's Ray version as rayVersion (tests/unit/test_image.py ties those)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    docs = render(*values_files)
    images = ray_images(docs)
    assert {"autoscaler", "head/ray-head"} < set(images) and len(images) >= 4
    assert set(images.values()) == {f"motionserve:{project['version']}"}
    (ray,) = [d for d in project["dependencies"] if d.startswith("ray[")]
    rayservice = only(docs, "RayService")["spec"]["rayClusterConfig"]
    assert ray.endswith("==" + rayservice["rayVersion"])


def test_image_repository_points_every_ray_container_at_a_registry(render):
    docs = render("values-scale.yaml", sets=("image.repository=registry.example.com/motionserve",))
    images = set(ray_images(docs).values())
    assert len(images) == 1 and images.pop().startswith("registry.example.com/motionserve:")
