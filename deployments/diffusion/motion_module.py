"""Optional AnimateDiff motion module: the UNet becomes diffusers' `UNetMotionModel`, and a
chunk is its context window.

Decisions (the why):
- Weights: a diffusers `MotionAdapter` (directory, single file, s3:// or hub id), loaded by
  `model_loading.load_motion_adapter` through the same source resolution as SD and ControlNet.
- Memory: `UNetMotionModel.from_unet2d` would copy the UNet's weights into a new model; here
  the motion model is built on the meta device and each of its tensors is pointed at the
  loaded UNet's (spatial layers) or the adapter's (temporal layers) own tensor
  (`share_parameters`), so the plain UNet (for batches without the module) and the motion
  model are one set of weights: the module adds only the adapter's memory.
- Context window = one chunk: the temporal layers attend along the frames of a window, so each
  forward packs whole chunks of one length and reshapes the batch to (windows, channels,
  frames, h, w) with one window per chunk and CFG half (the unconditional half of a chunk is a
  window of its own, as is the conditional half): frames of different chunks, jobs or CFG
  halves never attend to each other, and a chunk's output does not depend on its batch mates.
  A chunk longer than the adapter's `motion_max_seq_length` is refused (its positional
  embeddings end there).
- Anchor attention stays on the spatial self-attention (`anchor.is_spatial_self_attention`);
  the temporal attention layers are also named `attn1` inside `motion_modules` and keep their
  processor. The anchor's own pass runs through the motion model as a window of one frame.
- Cost: the motion module's FLOPs per frame are affine in the window length F (projections,
  norms and feed-forwards per frame, plus the temporal QK^T and AV, F x channels per frame)
  and linear in each level's tokens (the temporal attention runs per token, along the frames):
  `ModelWeights.motion_module` + F x `ModelWeights.motion_attention`, fitted from counts on
  meta copies (`flops.measure_motion_formulas`, at MEASURE_WINDOWS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Window lengths the FLOP count is taken at; FLOPs per frame are exactly affine in the length,
# so two points give both coefficients (a test checks a third point lies on the line).
MEASURE_WINDOWS = (8, 16)


def build_motion_unet(unet: Any, adapter: Any) -> Any:
    """diffusers' UNetMotionModel from a loaded UNet2DConditionModel and MotionAdapter whose
    every parameter and buffer *is* the UNet's or the adapter's tensor (no second copy).

    The model is built on the meta device (`from_unet2d(..., load_weights=False)`, no memory),
    then each tensor is pointed at the same-named one of the UNet (spatial layers) or of the
    adapter (`motion_modules`: the names match)."""
    import torch
    from diffusers import UNetMotionModel

    from deployments.errors import InvalidWeightsError

    with torch.device("meta"):
        try:
            motion = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
        except ValueError as exc:  # diffusers: "Incompatible Motion Adapter, ..."
            raise InvalidWeightsError(f"the motion module does not fit this UNet: {exc}") from None
    if any(p.device != unet.device or p.dtype != unet.dtype for p in adapter.parameters()):
        adapter.to(device=unet.device, dtype=unet.dtype)
    missing = share_parameters(motion, [unet, adapter])
    if missing:
        raise InvalidWeightsError(
            f"the motion module does not fit this UNet: no weights for {missing[:3]} "
            f"({len(missing)} tensors)"
        )
    motion.eval().requires_grad_(False)
    return motion


def share_parameters(motion: Any, sources: Sequence[Any]) -> list[str]:
    """Point each parameter and buffer of `motion` at the same-named, same-shaped tensor of the
    first of `sources` that has one; returns the names no source had."""
    parameters: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    for source in reversed(sources):
        parameters.update(dict(source.named_parameters()))
        buffers.update(dict(source.named_buffers()))
    missing = []
    for kind, table, named in (
        ("parameter", parameters, motion.named_parameters()),
        ("buffer", buffers, motion.named_buffers()),
    ):
        for name, tensor in list(named):
            found = table.get(name)
            if found is None or found.shape != tensor.shape:
                missing.append(name)
                continue
            module_name, _, attribute = name.rpartition(".")
            module = motion.get_submodule(module_name) if module_name else motion
            if kind == "parameter":
                setattr(module, attribute, found)
            else:
                module._buffers[attribute] = found
    return missing


def window_groups(lengths: Sequence[int], max_frames: int) -> list[list[int]]:
    """Requests (indices) grouped for the motion model's forwards: only chunks of one length
    share a forward (one window each), whole, at most `max_frames` frames per forward (a chunk
    longer than that runs alone). Order within a length is kept."""
    groups: list[list[int]] = []
    by_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        by_length.setdefault(length, []).append(index)
    for length, indices in by_length.items():
        per_forward = max(1, max_frames // length)
        groups.extend(indices[a : a + per_forward] for a in range(0, len(indices), per_forward))
    return groups


def motion_forward(
    motion_unet: Any,
    x: Any,
    timestep: Any,
    text: Any,
    window: int,
    residuals: list[Any] | None = None,
) -> Any:
    """Noise prediction of `x` (frames, channels, h, w) whose rows are consecutive windows of
    `window` frames; `text` (per frame, as for the UNet) and the residuals (ControlNet's, per
    frame) follow the rows' order. Returns (frames, channels, h, w)."""
    frames, channels, height, width = x.shape
    windows = frames // window
    if windows * window != frames:
        raise ValueError(f"{frames} rows are not whole windows of {window} frames")
    sample = x.reshape(windows, window, channels, height, width).permute(0, 2, 1, 3, 4)
    extra = {}
    if residuals is not None:
        extra = {
            "down_block_additional_residuals": tuple(residuals[:-1]),
            "mid_block_additional_residual": residuals[-1],
        }
    out = motion_unet(sample, timestep, encoder_hidden_states=text, return_dict=False, **extra)[0]
    return out.permute(0, 2, 1, 3, 4).reshape(frames, channels, height, width)


def motion_window_limit(motion_unet: Any) -> int:
    """Longest window the motion module's positional embeddings cover."""
    return int(motion_unet.config.motion_max_seq_length)
