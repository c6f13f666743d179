"""FLOP formulas of the loaded models, fitted from FLOP counts on the meta device.

A model call's FLOPs at a latent shape (h, w) are exactly `FlopFormula.flops(h, w)`: a constant
plus, per resolution level l, a linear and a quadratic term in the level's tokens
`T_l = ceil(h / 2**l) * ceil(w / 2**l)` (see `work_units.py`). This module counts FLOPs with
torch's FlopCounterMode on meta-device copies built from the models' configs (nothing is
computed, no memory is used) at FIT_SHAPES, fits the coefficients by least squares, rounds them
to whole FLOPs where the counts are whole (every SD-family layer's are), and refuses a fit
whose residual is not ~0. Fits are cached per architecture config, so an engine that reloads
(or a second engine with the same models) measures nothing again.

Decisions (the why):
- Fitted, not derived layer by layer: the counter sees what diffusers really runs (down-sampling
  convs that round up, the up path upsampled to each skip's size, attention processors), so the
  formula cannot drift from the architecture; the residual check catches an architecture the
  form does not describe.
- FIT_SHAPES mix multiples of 64 pixels with odd latent sides (1080p's 135x240, 288-pixel
  heights, primes): only those separate the levels (at multiples of 2**levels every T_l is
  T_0 / 4**l and the columns are collinear).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deployments.diffusion.work_units import (
    REFERENCE_LATENT_AREA,
    FlopFormula,
    level_tokens,
)

# Latent (height, width) shapes the formulas are fitted at: a UNet's or ControlNet's form has
# 1 + 2 x levels unknowns (9 for SD 1.5's four levels), so its 10 shapes leave one to check;
# the VAE's (3 unknowns) takes the first 5, the motion module's (1 + levels, no quadratic
# term) the first 7. Each count is one meta forward (about 0.1-0.3 s for the tiny models).
FIT_SHAPES: tuple[tuple[int, int], ...] = (
    (64, 64),  # 512x512: the unit
    (135, 240),  # 1080p
    (36, 64),  # 288 pixels high
    (17, 23),
    (33, 47),
    (54, 96),
    (71, 29),
    (9, 13),
    (45, 80),
    (27, 11),
)
VAE_FIT_SHAPES = FIT_SHAPES[:5]
MOTION_FIT_SHAPES = FIT_SHAPES[:7]
# Largest relative residual a fit may leave (FLOP counts are exact; float64 least squares on
# sums near 1e13 leaves ~1e-12).
MAX_RELATIVE_RESIDUAL = 1e-6

# Part of the cache key: bump when what is measured or how changes.
FLOPS_VERSION = "flops-1"
_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()


def count_flops(run: Callable[[], Any]) -> int:
    """FLOPs torch's FlopCounterMode counts while `run` runs (no gradients)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def architecture(config: Any) -> dict[str, Any]:
    """A model config without where it was loaded from (`_name_or_path`) or the diffusers
    version that wrote it: the same architecture at another path has the same FLOPs, so a copy
    of the models (a test's, a replica's download folder) reads the fit back instead of fitting
    again (about 10 s of CPU for the tiny models)."""
    return {
        key: value
        for key, value in dict(config).items()
        if key not in ("_name_or_path", "_diffusers_version")
    }


def cached(
    kind: str, configs: Sequence[Any], measure: Callable[[], Any], directory: Path | None = None
) -> Any:
    """`measure()` (a JSON-able value) once per (kind, architecture configs, torch and diffusers
    versions): kept in this process, and in `directory` (the engine's model cache) when given,
    so a replica that starts again on the same machine reads its formulas back."""
    import diffusers
    import torch

    identity = json.dumps(
        [FLOPS_VERSION, kind, torch.__version__, diffusers.__version__]
        + [architecture(c) for c in configs],
        sort_keys=True,
        default=str,
    )
    key = hashlib.sha256(identity.encode()).hexdigest()[:32]
    path = directory / f"flops-{kind}-{key}.json" if directory is not None else None
    stored = False
    with _CACHE_LOCK:
        if path is not None and path.is_file():
            try:
                stored = _CACHE.setdefault(key, json.loads(path.read_text())) is not None
            except ValueError:  # a torn or foreign file: measured again, overwritten below
                pass
        if key not in _CACHE:
            _CACHE[key] = measure()
        value = _CACHE[key]
    if path is not None and not stored:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.part")
            partial.write_text(json.dumps(value))
            partial.replace(path)  # atomic: a reader sees the whole file or none
        except OSError:  # a read-only model cache: measured again by the next process
            pass
    return value


def fit_formula(
    counts: dict[tuple[int, int], float], levels: int, *, quadratic: bool = True
) -> FlopFormula:
    """The `FlopFormula` with `levels` levels through FLOP counts at latent shapes, by least
    squares; raises if it leaves a residual (the form does not describe the model)."""
    import numpy as np

    shapes = list(counts)

    def features(height: int, width: int) -> list[float]:
        tokens = level_tokens(height, width, levels)
        return [1.0, *tokens, *([t * t for t in tokens] if quadratic else [])]

    rows = np.array([features(h, w) for h, w in shapes], dtype=np.float64)
    target = np.array([counts[s] for s in shapes], dtype=np.float64)
    scale = np.abs(rows).max(axis=0)
    solution, *_ = np.linalg.lstsq(rows / scale, target, rcond=None)
    coefficients = [_whole(c) for c in solution / scale]
    formula = FlopFormula(
        constant=coefficients[0],
        linear=tuple(coefficients[1 : 1 + levels]),
        quadratic=tuple(coefficients[1 + levels :]) if quadratic else (0.0,) * levels,
    )
    worst = max(
        abs(formula.flops(h, w) - counts[(h, w)]) / max(abs(counts[(h, w)]), 1.0) for h, w in shapes
    )
    if worst > MAX_RELATIVE_RESIDUAL:
        raise ValueError(
            f"FLOPs are not c + sum(a_l T_l + b_l T_l^2) over {levels} levels here: relative "
            f"residual {worst:.2e} > {MAX_RELATIVE_RESIDUAL:g}"
        )
    return formula


def _whole(value: float) -> float:
    """A coefficient rounded to whole FLOPs where it is one (float64 noise removed)."""
    nearest = round(value)
    return float(nearest) if abs(value - nearest) <= 0.01 + 1e-9 * abs(value) else value


def unet_levels(unet: Any) -> int:
    """Resolution levels of a UNet (or ControlNet): one per down block."""
    return len(unet.config.block_out_channels)


def unet_call(unet_meta: Any, height: int, width: int) -> Callable[[], Any]:
    """One row through a meta UNet at a latent shape, with a 77-token text."""
    import torch

    latents = torch.zeros(1, unet_meta.config.in_channels, height, width)
    text = torch.zeros(1, 77, unet_meta.config.cross_attention_dim)
    return lambda: unet_meta(latents, 10, encoder_hidden_states=text)


def controlnet_call(controlnet_meta: Any, height: int, width: int) -> Callable[[], Any]:
    """One row through a meta ControlNet: latents and a pose map at 8x the latent size."""
    import torch

    from deployments.diffusion.work_units import VAE_FACTOR

    latents = torch.zeros(1, controlnet_meta.config.in_channels, height, width)
    text = torch.zeros(1, 77, controlnet_meta.config.cross_attention_dim)
    channels = controlnet_meta.config.conditioning_channels
    cond = torch.zeros(1, channels, height * VAE_FACTOR, width * VAE_FACTOR)
    return lambda: controlnet_meta(latents, 10, text, controlnet_cond=cond)


def fit_model(
    call: Callable[[int, int], Callable[[], Any]],
    levels: int,
    shapes: Sequence[tuple[int, int]] = FIT_SHAPES,
) -> FlopFormula:
    """Count `call(h, w)` at every shape and fit its formula."""
    return fit_formula({(h, w): count_flops(call(h, w)) for h, w in shapes}, levels)


def recording_attn1(unet_meta: Any) -> tuple[list[tuple[int, int]], list[Any]]:
    """(shapes, hooks): every attn1 layer's (tokens, channels) is appended to `shapes` while
    the hooks are on (remove them after)."""
    shapes: list[tuple[int, int]] = []

    def record(module: Any, args: Any, kwargs: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        shapes.append((hidden.shape[-2], module.to_q.out_features))

    hooks = [
        module.register_forward_pre_hook(record, with_kwargs=True)
        for name, module in unet_meta.named_modules()
        if name.endswith("attn1")
    ]
    return shapes, hooks


def anchor_attention_flops(
    shapes: Sequence[tuple[int, int]], height: int, width: int, levels: int
) -> tuple[float, ...]:
    """FLOPs an anchor adds per (query token x anchor token) at each level: 4 x channels (QK^T
    and AV) summed over the level's attn1 layers, from their shapes in one evaluation at a
    latent (height, width) whose levels have distinct token counts."""
    tokens = level_tokens(height, width, levels)
    per_level = [0.0] * levels
    for count, channels in shapes:
        per_level[tokens.index(count)] += 4 * channels
    return tuple(per_level)


def measure_formulas(
    unet: Any, controlnet: Any, vae: Any, cache_dir: Path | None = None
) -> dict[str, Any]:
    """`ModelWeights` fields (formulas and unit FLOPs, as JSON) of these architectures, once per
    config (see `cached`)."""
    configs = (unet.config, controlnet.config, vae.config)
    return cached("sd", configs, lambda: _measure_formulas(unet, controlnet, vae), cache_dir)


def _measure_formulas(unet: Any, controlnet: Any, vae: Any) -> dict[str, Any]:
    import torch

    from deployments.diffusion.work_units import VAE_FACTOR

    levels = unet_levels(unet)
    with torch.device("meta"):
        unet_meta = type(unet).from_config(unet.config)
        controlnet_meta = type(controlnet).from_config(controlnet.config)
        vae_meta = type(vae).from_config(vae.config)
        latent, image = vae.config.latent_channels, vae.config.in_channels

        def decode(h: int, w: int) -> Callable[[], Any]:
            return lambda: vae_meta.decode(torch.zeros(1, latent, h, w))

        def encode(h: int, w: int) -> Callable[[], Any]:
            pixels = torch.zeros(1, image, h * VAE_FACTOR, w * VAE_FACTOR)
            return lambda: vae_meta.encode(pixels)

        side = reference_side()
        attn1, hooks = recording_attn1(unet_meta)
        try:
            unit = count_flops(unet_call(unet_meta, side, side))
        finally:
            for hook in hooks:
                hook.remove()
        unet_counts = {(side, side): unit}
        unet_counts.update(
            {(h, w): count_flops(unet_call(unet_meta, h, w)) for h, w in FIT_SHAPES[1:]}
        )
        formulas = {
            "unet": fit_formula(unet_counts, levels),
            "controlnet": fit_model(lambda h, w: controlnet_call(controlnet_meta, h, w), levels),
            # The VAE's own levels are whole multiples of the latent (8h x 8w pixels in and
            # out), so one level in latent tokens holds them all.
            "vae_decode": fit_model(decode, 1, VAE_FIT_SHAPES),
            "vae_encode": fit_model(encode, 1, VAE_FIT_SHAPES),
        }
        return {
            "unit_flops": float(unit),
            **{name: formula.model_dump() for name, formula in formulas.items()},
            "anchor_attention": list(anchor_attention_flops(attn1, side, side, levels)),
        }


def measure_motion_formulas(
    unet: Any,
    adapter_config: Any,
    unet_flops: FlopFormula,
    cache_dir: Path | None = None,
    windows: Sequence[int] | None = None,
) -> tuple[FlopFormula, FlopFormula]:
    """(motion_module, motion_attention): the motion model's FLOPs per frame minus the UNet's
    (`unet_flops`, the UNet's fitted formula) are `motion_module + F x motion_attention` for a
    window of F frames, both linear in each level's tokens (the temporal attention runs per
    token, along the frames); counted at two window lengths at each of MOTION_FIT_SHAPES, once
    per config. Affine in F up to the timestep embedding, which the motion model runs once per
    window (a 1/F term per frame: 4.1 MFLOPs per window for SD 1.5, 5e-6 of a work unit, the
    line through F = 8 and 16 off by at most that at other F)."""
    from deployments.diffusion.motion_module import MEASURE_WINDOWS

    windows = windows or MEASURE_WINDOWS
    configs = (unet.config, adapter_config)
    module, attention = cached(
        "motion", configs, lambda: _motion(unet, adapter_config, unet_flops, windows), cache_dir
    )
    return FlopFormula.model_validate(module), FlopFormula.model_validate(attention)


def motion_flops_per_frame(motion_meta: Any, height: int, width: int, window: int) -> float:
    """The motion model's FLOPs per frame at a latent shape and window length."""
    import torch

    config = motion_meta.config
    sample = torch.zeros(1, config.in_channels, window, height, width)
    texts = torch.zeros(window, 77, config.cross_attention_dim)
    return count_flops(lambda: motion_meta(sample, 10, texts)) / window


def build_motion_meta(unet_config: Any, adapter_config: Any) -> Any:
    """A UNetMotionModel on the meta device from its UNet's and adapter's configs."""
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    with torch.device("meta"):
        unet_meta = UNet2DConditionModel.from_config(unet_config)
        adapter_meta = MotionAdapter.from_config(adapter_config)
        return UNetMotionModel.from_unet2d(unet_meta, adapter_meta, load_weights=False)


def _motion(
    unet: Any, adapter_config: Any, unet_flops: FlopFormula, windows: Sequence[int]
) -> list[dict[str, Any]]:
    import torch

    motion_meta = build_motion_meta(unet.config, adapter_config)
    first, second = windows
    intercepts, slopes = {}, {}
    with torch.device("meta"):
        for h, w in MOTION_FIT_SHAPES:
            a = motion_flops_per_frame(motion_meta, h, w, first) - unet_flops.flops(h, w)
            b = motion_flops_per_frame(motion_meta, h, w, second) - unet_flops.flops(h, w)
            slopes[(h, w)] = (b - a) / (second - first)
            intercepts[(h, w)] = a - slopes[(h, w)] * first
    levels = unet_levels(unet)
    return [
        fit_formula(intercepts, levels, quadratic=False).model_dump(),
        fit_formula(slopes, levels, quadratic=False).model_dump(),
    ]


def reference_side() -> int:
    return int(math.sqrt(REFERENCE_LATENT_AREA))
