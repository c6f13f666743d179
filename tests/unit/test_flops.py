"""Work units that follow FLOPs: the per-level formula, its fit, and SD 1.5's constants checked
against torch's FLOP counter on the real architectures (meta device: nothing computed)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.sd15_random import (
    SD15_CONTROLNET_EMBEDDING,
    SD15_MOTION_ADAPTER,
    SD15_UNET,
    SD15_VAE,
)
from deployments import diffusion as d
from deployments.diffusion import flops
from deployments.diffusion.work_units import FlopFormula, level_tokens, pooled_tokens

# Latent shapes none of the fits saw: 720p (90x160) and an odd one (rounding up at every level).
HELD_OUT = ((90, 160), (35, 57))


@pytest.fixture(scope="module")
def sd15():
    """SD 1.5's UNet, OpenPose ControlNet v1.1 and VAE on the meta device."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=SD15_CONTROLNET_EMBEDDING
        )
        vae = AutoencoderKL(**SD15_VAE)
    return unet, controlnet, vae


def test_level_tokens_round_up_like_the_down_sampling_convs():
    assert level_tokens(135, 240, 4) == [135 * 240, 68 * 120, 34 * 60, 17 * 30]
    assert level_tokens(64, 64, 4) == [4096, 1024, 256, 64]
    assert pooled_tokens(135, 240, 2, 4) == [34 * 60, 17 * 30]


def test_a_fit_recovers_a_formula_and_refuses_a_form_it_does_not_have():
    known = FlopFormula(constant=7.0, linear=(3.0, 5.0, 11.0), quadratic=(2.0, 0.0, 13.0))
    counts = {s: known.flops(*s) for s in flops.FIT_SHAPES}
    assert flops.fit_formula(counts, 3) == known  # whole numbers back, exactly
    cubic = {(h, w): known.flops(h, w) + (h * w) ** 3 for h, w in flops.FIT_SHAPES}
    with pytest.raises(ValueError, match="residual"):
        flops.fit_formula(cubic, 3)


def test_sd15_formulas_match_the_flop_counter_at_held_out_shapes(sd15):
    unet, controlnet, vae = sd15
    weights = d.SD15_MODEL_WEIGHTS
    assert sum(p.numel() for p in unet.parameters()) == weights.unet_parameters
    assert sum(p.numel() for p in controlnet.parameters()) == weights.controlnet_parameters
    side = flops.reference_side()
    with torch.device("meta"):
        attn1, hooks = flops.recording_attn1(unet)
        try:
            assert flops.count_flops(flops.unet_call(unet, side, side)) == weights.unit_flops
        finally:
            for hook in hooks:
                hook.remove()
        assert flops.anchor_attention_flops(attn1, side, side, 4) == weights.anchor_attention
        for h, w in HELD_OUT:
            latents = torch.zeros(1, 4, h, w)
            pixels = torch.zeros(1, 3, 8 * h, 8 * w)
            counted = {
                "unet": flops.count_flops(flops.unet_call(unet, h, w)),
                "controlnet": flops.count_flops(flops.controlnet_call(controlnet, h, w)),
                "vae_decode": flops.count_flops(lambda x=latents: vae.decode(x)),
                "vae_encode": flops.count_flops(lambda x=pixels: vae.encode(x)),
            }
            for name, count in counted.items():
                formula = getattr(weights, name)
                assert formula.flops(h, w) == pytest.approx(count, rel=1e-6), (name, h, w)
    # 1080p: self-attention makes a UNet call 2.06x its latent-area weight, a ControlNet 2.20x.
    area = 135 * 240 / 64**2
    assert weights.units(weights.unet, 1920, 1080) / area == pytest.approx(2.0569, abs=1e-4)
    assert weights.units(weights.controlnet, 1920, 1080) / (
        weights.controlnet_weight * area
    ) == pytest.approx(2.1977, abs=1e-4)
    assert weights.units(weights.unet, 512, 512) == 1.0  # the unit did not move


def test_sd15_motion_formulas_match_the_flop_counter_at_a_held_out_shape():
    """AnimateDiff v1-5-2's adapter in UNetMotionModel: per-frame FLOPs beyond the UNet's are
    `motion_module + F x motion_attention` at a shape and at window lengths the fit never saw."""
    from diffusers import MotionAdapter

    with torch.device("meta"):
        adapter = MotionAdapter(**SD15_MOTION_ADAPTER)
    assert sum(p.numel() for p in adapter.parameters()) == 453_209_280
    weights = d.SD15_MODEL_WEIGHTS
    motion = flops.build_motion_meta(SD15_UNET, adapter.config)
    h, w = HELD_OUT[1]
    with torch.device("meta"):
        for window in (4, 24):
            extra = flops.motion_flops_per_frame(motion, h, w, window) - weights.unet.flops(h, w)
            formula = weights.motion_module.flops(h, w) + window * weights.motion_attention.flops(
                h, w
            )
            # Not exact: the motion model embeds the timestep once per window (4.1 MFLOPs for
            # SD 1.5, 5e-6 of a unit), a 1/F term per frame the affine form leaves out.
            assert formula == pytest.approx(extra, rel=1e-5), window
    # about +38% UNet work per frame at 512x512 and 16 frames
    assert 0.37 < weights.motion_module_weight + 16 * weights.motion_attention_weight < 0.39


def test_measurements_are_cached_per_architecture(engine, monkeypatch):
    """An engine that reloads (or a second one on the same architecture) counts nothing again;
    the tiny models' formulas are their own (not SD 1.5's)."""
    modules, cache_dir = engine._modules, engine.config.cache_dir
    assert list(cache_dir.glob("flops-sd-*.json"))  # kept beside the models
    monkeypatch.setattr(flops, "count_flops", lambda run: pytest.fail("counted again"))
    again = d.measure_model_weights(modules.unet, modules.controlnet, modules.vae)
    assert again == engine.model_weights
    monkeypatch.setattr(flops, "_CACHE", {})  # a new process: read back from the model cache
    reread = d.measure_model_weights(modules.unet, modules.controlnet, modules.vae, cache_dir)
    assert reread == engine.model_weights
    # the same architecture loaded from another folder (a copy, a download) is the same fit
    copies = [m.config.__class__(**{**m.config, "_name_or_path": "/elsewhere"})
              for m in (modules.unet, modules.controlnet, modules.vae)]  # fmt: skip
    assert [flops.architecture(c) for c in copies] == [
        flops.architecture(m.config) for m in (modules.unet, modules.controlnet, modules.vae)
    ]
    assert again.unet != d.SD15_MODEL_WEIGHTS.unet and len(again.unet.linear) == 4
    assert again.units(again.unet, 512, 512) == pytest.approx(1.0, rel=1e-12)
