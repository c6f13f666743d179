"""Seeds, initial noise and schedulers: where every random number of a generation comes from.

Decisions (the why):
- Temporal consistency: the initial noise is one tensor drawn from the request's seed (the job's
  seed, the same for all its chunks) and broadcast to all frames, optionally mixed with
  per-frame noise: sqrt(s) * shared + sqrt(1 - s) * per_frame, s = noise_sharing, which keeps
  unit variance. Per-frame noise, and the step noise of ancestral/LCM schedulers, come from one
  generator per frame keyed by (seed, chunk index, frame index) (`noise="per_chunk"`), so a
  frame's result does not depend on what else shares its batch.
- Seamless chunks (`noise="job_windows"`): a frame's own noise is read from one noise sequence
  of the job at the frame's index g in the job's generated frames, never from its chunk: knots
  K_0, K_1, ... (one tensor each, seeded by (seed, window)) every `noise_window` frames, and
  frame g = w * W + p lies on the arc between two knots: cos(a) K_w + sin(a) K_{w+1},
  a = pi/2 * p / W (unit variance, as the knots are independent). So neighbouring frames get
  nearby noise across a chunk boundary as inside a chunk, and a frame generated twice (by its
  chunk, and as the next chunk's overlap) gets the same noise and step noise both times, in
  any batch on any replica. It is FreeNoise's idea (windows of one job-level sequence instead
  of noise per context window) without its shuffle: the shuffle serves a temporal attention
  window, which SD 1.5 frames do not have; frame by frame, a permuted neighbour would flicker.
  With noise_sharing = 1 (the default) every frame gets the shared tensor in both modes.
- So a frame's own noise, and with it the noise mode and window, acts only where
  `own_noise_acts`: noise_sharing below 1, or a scheduler whose step draws noise
  (`STEP_NOISE_SCHEDULERS`). DPM++ 2M (its dpmsolver++ algorithm, not the SDE variant) and
  UniPC are deterministic given the initial latents; elsewhere the generation key leaves the
  noise fields out, as they cannot change a frame.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

from deployments.diffusion.settings import LATENT_CHANNELS, ChunkRequest, SchedulerName

if TYPE_CHECKING:
    import torch

# Schedulers whose step draws noise from `step_generators` (Euler ancestral; LCM's multistep
# sampling re-noises between steps).
STEP_NOISE_SCHEDULERS: frozenset[str] = frozenset({"euler_a", "lcm"})


def own_noise_acts(scheduler: str, noise_sharing: float) -> bool:
    """Whether a frame's own noise (so the noise mode and window) can change its frames."""
    return noise_sharing < 1.0 or scheduler in STEP_NOISE_SCHEDULERS


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from parts, stable across processes and platforms."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _frame_seeds(request: ChunkRequest, purpose: str) -> list[int]:
    if request.noise == "job_windows":  # by the frame's index in the job, not in its chunk
        return [
            derive_seed(request.seed, "job", request.first_frame + frame, purpose)
            for frame in range(request.frames)
        ]
    return [
        derive_seed(request.seed, request.chunk_index, frame, purpose)
        for frame in range(request.frames)
    ]


def job_window_noise(
    seed: int, first_frame: int, frames: int, window: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """Frames [first_frame, first_frame + frames) of the job's noise sequence, (frames, *shape
    without its leading 1), float32 on CPU; the same values for a frame whatever the range."""
    import torch

    knots: dict[int, torch.Tensor] = {}

    def knot(index: int) -> torch.Tensor:
        if index not in knots:
            generator = torch.Generator().manual_seed(derive_seed(seed, "knot", index))
            knots[index] = torch.randn(shape, generator=generator)
        return knots[index]

    rows = []
    for frame in range(first_frame, first_frame + frames):
        w, p = divmod(frame, window)
        if p == 0:
            rows.append(knot(w))
        else:
            angle = math.pi / 2 * p / window
            rows.append(math.cos(angle) * knot(w) + math.sin(angle) * knot(w + 1))
    return torch.cat(rows)


def initial_latents(request: ChunkRequest) -> torch.Tensor:
    """Unscaled initial noise (frames, 4, h/8, w/8) of a request, float32 on CPU.

    One tensor from the seed shared by all frames, mixed with per-frame noise by
    `noise_sharing` (per chunk, or the job's noise sequence: `noise`); it depends on the
    request alone, never on its batch.
    """
    import torch

    settings = request.settings
    shape = (1, LATENT_CHANNELS, settings.latent_height, settings.latent_width)
    shared = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed))
    sharing = request.noise_sharing
    if sharing == 1.0:
        return shared.expand(request.frames, -1, -1, -1).clone()
    if request.noise == "job_windows":
        own = job_window_noise(
            request.seed, request.first_frame, request.frames, request.noise_window, shape
        )
    else:
        own = torch.cat(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                for seed in _frame_seeds(request, "init")
            ]
        )
    return math.sqrt(sharing) * shared + math.sqrt(1.0 - sharing) * own


def step_generators(request: ChunkRequest) -> list[torch.Generator]:
    """One CPU generator per frame for the step noise of ancestral and LCM schedulers."""
    import torch

    return [torch.Generator().manual_seed(seed) for seed in _frame_seeds(request, "step")]


def build_scheduler(name: SchedulerName, config: dict[str, Any]) -> Any:
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        LCMScheduler,
        TCDScheduler,
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
        "tcd": TCDScheduler,
    }
    return classes[name].from_config(config)
