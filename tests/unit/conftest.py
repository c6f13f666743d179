"""Fixtures shared by the diffusion unit tests (test_diffusion.py, test_diffusion_cancel.py)."""

from __future__ import annotations

import pytest
import torch

from deployments import diffusion as d
from deployments.model_loading import tiny_sd_controlnet_sources


@pytest.fixture
def one_torch_thread():
    # The tiny models gain nothing from threads, and on a shared 2-core machine OpenMP's
    # spinning threads can slow a forward down 50x.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(tiny_sd, tmp_path_factory) -> d.DiffusionEngine:
    """The tiny random-weight SD 1.5 + ControlNet, loaded once per module on CPU fp32."""
    base, controlnet = tiny_sd_controlnet_sources(tiny_sd.path)
    config = d.EngineConfig(
        model_id="tiny",
        base=base,
        controlnet=controlnet,
        device="cpu",
        cache_dir=tmp_path_factory.mktemp("model-cache"),
    )
    engine = d.DiffusionEngine(config)
    engine.load()
    return engine
