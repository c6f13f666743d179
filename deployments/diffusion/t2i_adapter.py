"""T2I-Adapter conditioning: pose features once per keyframe per chunk, reused at every step.

A T2I-Adapter (diffusers `T2IAdapter`, e.g. TencentARC's openpose adapter for SD 1.x) turns a
pose map into one feature map per UNet down block, which the UNet adds inside those blocks
(`down_intrablock_additional_residuals`). Unlike ControlNet's residuals, the features depend on
the pose map alone: not on the latents, the timestep or the prompt.

Decisions (the why):
- Once per chunk, not per step: the features of a chunk's keyframes are computed at the first
  step that applies conditioning and reused at every later one (diffusers'
  StableDiffusionAdapterPipeline computes them once per call too). Per keyframe that is about
  0.075 UNet evaluations (SD 1.5 at 512x512, `SD15_ADAPTER_FLOPS`) instead of ControlNet's 0.35
  per keyframe per step, twice with CFG: conditioning becomes almost free.
- Keyframes as for ControlNet (`controlnet_every`, plus each chunk's last frame): the adapter
  sees the keyframes' pose maps and the frames between get linearly interpolated features (the
  same blend as ControlNet's residuals, `keyframes.BatchLayout`). At 0.075 evaluations a frame
  the saving is small, but one setting keeps one meaning for both conditioners and a plan's
  keyframes do not change with the conditioner.
- CFG: both halves add the same features (as diffusers' pipeline: `torch.cat([v] * 2)`), so
  the adapter runs once per keyframe, not twice, and is counted once.
- control_guidance_start/end apply as for ControlNet: outside the window the UNet runs without
  the features. diffusers' adapter pipeline has no such window (it adds the features at every
  step), which the default window (0, 1) reproduces exactly (a test holds the engine to that
  pipeline). Following the window costs nothing (the features are computed once either way,
  and an unconditioned UNet call costs what a conditioned one does) and keeps one meaning for
  one setting whichever conditioner runs; a chunk whose window holds no step computes no
  features and counts none.
- The conditioning scale (`controlnet_conditioning_scale`) multiplies the features, as
  diffusers' `adapter_conditioning_scale` does.
- Not with the motion module: diffusers' UNetMotionModel takes no adapter features (refused
  in `check_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deployments.diffusion.keyframes import BatchLayout
from deployments.diffusion.work_units import VAE_FACTOR, FlopFormula
from deployments.errors import InvalidWeightsError

if TYPE_CHECKING:
    import torch


def measure_adapter_formula(adapter: Any, unet: Any, cache_dir: Path | None = None) -> FlopFormula:
    """The adapter's `FlopFormula`: FLOPs of one pose map at 8x each latent shape, fitted over
    the UNet's levels with no quadratic term (convolutions only; the features of level l are
    the latent's level-l grid, pooled with ceil_mode as the UNet's stride-2 convs round up).
    Counted with `flops.py` on a meta copy built from the config (nothing computed, no memory
    used), once per config (kept in `cache_dir`)."""
    from deployments.diffusion.flops import (
        MOTION_FIT_SHAPES,
        cached,
        count_flops,
        fit_formula,
        unet_levels,
    )

    levels = unet_levels(unet)

    def measure() -> dict[str, Any]:
        import torch

        with torch.device("meta"):
            meta = type(adapter).from_config(adapter.config)
            counts = {}
            for height, width in MOTION_FIT_SHAPES:  # 1 + levels unknowns: 7 shapes leave 2
                image = torch.zeros(
                    1, adapter.config.in_channels, height * VAE_FACTOR, width * VAE_FACTOR
                )
                counts[(height, width)] = count_flops(lambda image=image: meta(image))
        return fit_formula(counts, levels, quadratic=False).model_dump()

    configs = (unet.config, adapter.config)
    return FlopFormula.model_validate(cached("t2i_adapter", configs, measure, cache_dir))


def check_adapter_fits(adapter: Any, unet: Any) -> None:
    """Raise InvalidWeightsError, in one line, when the adapter's features cannot go into this
    UNet (one feature map per down block, each with that block's width)."""
    channels = tuple(adapter.config.channels)
    blocks = tuple(unet.config.block_out_channels)
    if channels != blocks or adapter.config.in_channels != 3:
        raise InvalidWeightsError(
            f"the T2I-Adapter (channels {list(channels)}, {adapter.config.in_channels} input "
            f"channels) does not fit this UNet (down blocks {list(blocks)}, RGB pose maps): "
            "use an adapter made for this base model"
        )


class AdapterFeatures:
    """The adapter's features of a batch's keyframes (scaled), computed once and reused at
    every step; rows of requests that left the batch are dropped as the layout changes."""

    def __init__(self, levels: list[torch.Tensor], keyframe_owner: np.ndarray):
        self.levels = levels  # one tensor per UNet down block, (keyframes, channels, h, w)
        self.owner = np.asarray(keyframe_owner)

    def halves(self, layout: BatchLayout, cfg: bool) -> list[list[torch.Tensor]]:
        """The features in the shape of ControlNet's keyframe residuals for `layout` (one
        list of levels per CFG half; both halves the same), for `_interpolated_residuals`."""
        if len(self.owner) != len(layout.keyframes):  # requests left the batch
            keep = np.flatnonzero(np.isin(self.owner, layout.keyframe_owner))
            import torch

            index = torch.as_tensor(keep, device=self.levels[0].device)
            self.levels = [level[index] for level in self.levels]
            self.owner = self.owner[keep]
        return [self.levels, self.levels] if cfg else [self.levels]


def keyframe_features(
    adapter: Any,
    control: torch.Tensor,
    layout: BatchLayout,
    scale: float,
    forward_slices: Any,
    counts: np.ndarray,
    column: int,
) -> AdapterFeatures:
    """The adapter on the keyframes' pose maps (`control`: every frame's, NCHW in [0, 1]), in
    forwards of `forward_slices(count)`; counts one evaluation per keyframe on its request."""
    import torch

    keys = torch.as_tensor(layout.keyframes, device=control.device)
    parts: list[list[torch.Tensor]] = []
    for part in forward_slices(len(layout.keyframes)):
        parts.append([level * scale for level in adapter(control[keys[part]])])
        np.add.at(counts[:, column], layout.keyframe_owner[part], 1)
    levels = [torch.cat(level) for level in zip(*parts, strict=True)]
    return AdapterFeatures(levels, layout.keyframe_owner)
