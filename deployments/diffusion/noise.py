"""Seeds, initial noise and schedulers: where every random number of a generation comes from.

Decisions (the why):
- Temporal consistency: the initial noise is one tensor drawn from the request's seed (the job's
  seed, the same for all its chunks) and broadcast to all frames, optionally mixed with
  per-frame noise: sqrt(s) * shared + sqrt(1 - s) * per_frame, s = noise_sharing, which keeps
  unit variance. Per-frame noise, and the step noise of ancestral/LCM schedulers, come from one
  generator per frame keyed by (seed, chunk index, frame index), so a frame's result does not
  depend on what else shares its batch.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

from deployments.diffusion.settings import LATENT_CHANNELS, ChunkRequest, SchedulerName

if TYPE_CHECKING:
    import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from parts, stable across processes and platforms."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _frame_seeds(request: ChunkRequest, purpose: str) -> list[int]:
    return [
        derive_seed(request.seed, request.chunk_index, frame, purpose)
        for frame in range(request.frames)
    ]


def initial_latents(request: ChunkRequest) -> torch.Tensor:
    """Unscaled initial noise (frames, 4, h/8, w/8) of a request, float32 on CPU.

    One tensor from the seed shared by all frames, mixed with per-frame noise by
    `noise_sharing`; it depends on the request alone, never on its batch.
    """
    import torch

    settings = request.settings
    shape = (1, LATENT_CHANNELS, settings.latent_height, settings.latent_width)
    shared = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed))
    sharing = request.noise_sharing
    if sharing == 1.0:
        return shared.expand(request.frames, -1, -1, -1).clone()
    own = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        for seed in _frame_seeds(request, "init")
    ]
    return math.sqrt(sharing) * shared + math.sqrt(1.0 - sharing) * torch.cat(own)


def step_generators(request: ChunkRequest) -> list[torch.Generator]:
    """One CPU generator per frame for the step noise of ancestral and LCM schedulers."""
    import torch

    return [torch.Generator().manual_seed(seed) for seed in _frame_seeds(request, "step")]


def build_scheduler(name: SchedulerName, config: dict[str, Any]) -> Any:
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        LCMScheduler,
        UniPCMultistepScheduler,
    )

    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2
        )
    classes = {
        "unipc": UniPCMultistepScheduler,
        "euler_a": EulerAncestralDiscreteScheduler,
        "lcm": LCMScheduler,
    }
    return classes[name].from_config(config)
