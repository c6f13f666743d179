"""The local Ray cluster the Serve tests deploy onto: one for the whole tests/serve package."""

from __future__ import annotations

import pytest
import ray
from ray import serve


@pytest.fixture(scope="package")
def ray_cluster():
    """Started by the first test that takes it, stopped after the package's last test
    (tests/ordering.py runs the modules that start Ray themselves before it)."""
    # address="local": a cluster of our own even if another runs on the machine; one logical
    # GPU for the Diffusion deployments' fractional GPUs; no HTTP proxy (handles only).
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    serve.start(proxy_location="Disabled")
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def delete_the_modules_apps():
    """Each module's Serve applications are deleted at its end, so the next module starts on a
    cluster with every CPU and logical GPU free, as on a cluster of its own."""
    yield
    if ray.is_initialized():  # the package cluster is up (with Serve): see ray_cluster
        for name in list(serve.status().applications):
            serve.delete(name)
