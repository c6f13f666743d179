"""Anchor attention: every frame's UNet self-attention also attends to one anchor per job.

Training-free, no new weights: a diffusers attention processor on the UNet's self-attention
layers (`attn1`; the ControlNet and the cross-attention keep theirs) widens each frame's keys
and values with the anchor's. Per step the engine first runs each chunk's anchor through the
UNet with the bank in `write` mode (the anchor attends to itself only; its keys/values of every
attn1 layer are kept), then the chunk's frames with the bank in `read` mode (each row also
attends to its own anchor's keys/values, the unconditional CFG half to the anchor's
unconditional half, the conditional to the conditional).

Decisions (the why):
- The anchor is an image: the job's anchor keyframe, its frame 0 generated once per job before
  the chunks (alone, with the job's prompts, seed and first pose map; with a reference image it
  itself anchors on the reference), cached under a content key (it is also the anchor-frame
  preview a user sees before paying). Every chunk VAE-encodes it (the encoder's mean, so no
  sampling noise) and, at each step, the anchor's UNet input is that latent noised to the
  step's timestep, sqrt(a_t) x0 + sqrt(1 - a_t) e (a_t: the scheduler's cumulative alpha; this
  is what every scheduler's `scale_model_input` hands the UNet for a latent noised to t), with
  one noise e drawn from the job's seed: the keys/values depend on the job alone, so chunk 0
  and chunk 9 see the same anchor on any replica in any batch. No trajectory is stepped and no
  ControlNet runs on it (an image lends appearance; the frames' poses come from their own maps).
- Why an image and not the keyframe's own trajectory stepped beside every chunk (the first
  design): the trajectory cost every chunk an anchor ControlNet pass per step and could not be
  shown or reused; the image costs one 1-frame generation per job, is what the anchor-frame
  preview renders, and a job after that preview takes it from the cache (billed once). At each
  step the noised image gives the frames the finished keyframe's features, not a half-denoised
  one's.
- Batch independence: each anchor runs in its own forward (one row, two with CFG) and its own
  scheduler, so its keys/values are bit-identical whatever else is in the batch; only the
  frames' forwards mix requests.
- Cost of the wider attention: the anchor's keys/values are averaged over pool x pool token
  blocks (`GenerationSettings.anchor_pool`, default 2: a quarter of the tokens, as token
  downsampling does for plain self-attention), which makes the extra QK^T/AV work 1/pool^2 of a
  full-size anchor's. Keys and values are pooled after their projections (the projections are
  linear, so this equals projecting pooled hidden states, at no extra cost).
- The processors are installed only while an anchored batch runs and the originals are put
  back after, so a batch without the anchor runs the UNet exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

SELF_ATTENTION_SUFFIX = "attn1.processor"
# UNetMotionModel's temporal layers: their attention is also named attn1, but attends along the
# frames of a window, not over a frame's tokens; the anchor has no place there.
MOTION_MODULES = "motion_modules"


def is_spatial_self_attention(name: str) -> bool:
    """Whether the attention processor `name` (diffusers' attn_processors key) is a frame's own
    self-attention: attn1 of a spatial transformer, not the motion module's temporal attn1."""
    return name.endswith(SELF_ATTENTION_SUFFIX) and MOTION_MODULES not in name.split(".")


def grid_of(tokens: int, latent_height: int, latent_width: int) -> tuple[int, int]:
    """(height, width) of a UNet level with `tokens` tokens: each level halves the latent grid,
    rounding up (SD's downsampling convolution: stride 2, padding 1)."""
    height, width = latent_height, latent_width
    while height * width > tokens:
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    if height * width != tokens:
        raise ValueError(f"{tokens} tokens are no level of a {latent_height}x{latent_width} latent")
    return height, width


class AnchorBank:
    """The anchors' keys/values of one step, per self-attention layer, and what the
    processors do with them (`mode`): nothing, keep an anchor's, or let frames read them."""

    def __init__(self, latent_height: int, latent_width: int, pool: int):
        self.latent_height, self.latent_width, self.pool = latent_height, latent_width, pool
        self.mode: Literal["off", "write", "read"] = "off"
        self._written: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None  # read: bank row of each row of the forward

    def start_step(self) -> None:
        """Forget the previous step's anchors; the next forwards write this step's."""
        self._written.clear()
        self.keys.clear()
        self.values.clear()
        self.mode = "write"

    def write(self, name: str, key: torch.Tensor, value: torch.Tensor) -> None:
        self._written.setdefault(name, []).append((key, value))

    def finish_writing(self) -> None:
        """Stack the anchors written this step: bank row = anchor forward order x its rows."""
        import torch

        for name, written in self._written.items():
            self.keys[name] = torch.cat([key for key, _ in written])
            self.values[name] = torch.cat([value for _, value in written])
        self._written.clear()
        self.mode = "read"

    def pool_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, channels) averaged over pool x pool blocks of the level's grid."""
        import torch.nn.functional as F

        if self.pool == 1:
            return tensor
        batch, tokens, channels = tensor.shape
        height, width = grid_of(tokens, self.latent_height, self.latent_width)
        grid = tensor.transpose(1, 2).reshape(batch, channels, height, width)
        pooled = F.avg_pool2d(grid, self.pool, self.pool, ceil_mode=True)
        return pooled.flatten(2).transpose(1, 2)


class AnchorAttnProcessor:
    """Self-attention that also attends to the bank's anchor keys/values (diffusers'
    attention-processor interface). In `off` mode, or for cross-attention, it hands the call
    to the processor it replaced."""

    def __init__(self, bank: AnchorBank, name: str, replaced: Any):
        self.bank, self.name, self.replaced = bank, name, replaced

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        mode = self.bank.mode
        if mode == "off" or encoder_hidden_states is not None:
            return self.replaced(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        import torch
        import torch.nn.functional as F

        if (
            hidden_states.ndim != 3
            or attention_mask is not None
            or attn.spatial_norm is not None
            or attn.group_norm is not None
        ):
            raise ValueError(
                f"{self.name}: anchor attention supports SD 1.x self-attention (tokens in, no "
                "mask, no spatial or group norm)"
            )
        residual = hidden_states
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if mode == "write":
            self.bank.write(self.name, self.bank.pool_tokens(key), self.bank.pool_tokens(value))
        else:
            rows = self.bank.rows
            key = torch.cat([key, self.bank.keys[self.name][rows]], dim=1)
            value = torch.cat([value, self.bank.values[self.name][rows]], dim=1)
        head_dim = key.shape[-1] // attn.heads

        def heads(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def anchor_attention(unet: Any, bank: AnchorBank) -> Iterator[AnchorBank]:
    """Anchor processors on the UNet's spatial self-attention layers while the block runs (a
    UNetMotionModel's temporal attention keeps its own); the processors it had are put back
    after."""
    original = dict(unet.attn_processors)
    replaced = {
        name: AnchorAttnProcessor(bank, name, processor)
        if is_spatial_self_attention(name)
        else processor
        for name, processor in original.items()
    }
    unet.set_attn_processor(replaced)
    try:
        yield bank
    finally:
        bank.mode = "off"
        unet.set_attn_processor(original)


class ImageAnchor:
    """A request's anchor: its anchor image (the job's anchor keyframe, or the reference image
    for the keyframe's own generation; see the module's decisions).

    The constructor VAE-encodes the image (the caller counts one VAE encode for its owner);
    `model_input` noises the latent to each step.
    """

    def __init__(
        self,
        owner: int,
        request: Any,
        scheduler: Any,
        vae: Any,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        device: Any,
        dtype: Any,
    ):
        import torch

        from deployments.diffusion.noise import derive_seed

        anchor = request.anchor
        self.owner = owner
        self.cond, self.uncond = cond, uncond
        image = torch.from_numpy(anchor.image).permute(2, 0, 1)[None].contiguous()
        image = (image.to(torch.float32) / 127.5 - 1.0).to(device=device, dtype=dtype)
        latent = vae.encode(image, return_dict=False)[0].mode()
        self.latent = latent * vae.config.scaling_factor
        generator = torch.Generator().manual_seed(derive_seed(anchor.seed, "reference"))
        noise = torch.randn(tuple(self.latent.shape), generator=generator)
        self.noise = noise.to(device=device, dtype=dtype)
        self.alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)

    def model_input(self, timestep: torch.Tensor) -> torch.Tensor:
        index = int(round(float(timestep)))
        alpha = self.alphas[min(max(index, 0), len(self.alphas) - 1)]
        noised = alpha.sqrt() * self.latent.float() + (1.0 - alpha).sqrt() * self.noise.float()
        return noised.to(self.latent.dtype)
