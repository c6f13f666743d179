"""The local Ray cluster the Serve tests deploy onto, one per test module."""

from __future__ import annotations

import pytest
import ray
from ray import serve


@pytest.fixture(scope="module")
def ray_cluster():
    # address="local": a cluster of our own even if another runs on the machine; one logical
    # GPU for the Diffusion deployments' fractional GPUs; no HTTP proxy (handles only).
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    serve.start(proxy_location="Disabled")
    yield
    serve.shutdown()
    ray.shutdown()
