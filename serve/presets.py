"""The presets, and the one definition of the naive baseline (pure pydantic: no media imports,
so the cost model can read them without loading what `serve.pipeline` needs).

`naive` is the baseline every cost report compares against: every output frame generated at
output size, with the naive preset's steps, precision and ControlNet interval, batch 1, no
cache, everything on the GPU.

Coherence (issue 15, design 5b): `standard` and `high` render one video of one character by
default: anchor attention (every frame also attends to the job's anchor keyframe) and seamless
chunks (job-level noise windows; `high` also one overlap frame per boundary). `draft` and
`naive` have neither, so their plans and content keys are what they were before coherence
existed. A request turns each off or on with its `coherence` switches; how the switches, the
field overrides and a reference image combine is `serve.pipeline.coherence_overrides`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from deployments.density import DensityMode
from deployments.diffusion.settings import MAX_ANCHOR_POOL, Conditioner, GenerationSettings

PresetName = Literal["draft", "standard", "high", "turbo", "naive"]
MAX_CHUNK_OVERLAP = 8  # the plan's bound on seamless chunks' overlap frames


class PresetCoherence(BaseModel):
    """A preset's coherence: whether anchor attention and seamless chunks are on by default,
    and how they run when on (also when a request switches on what the preset leaves off)."""

    model_config = {"frozen": True, "extra": "forbid"}

    anchor: bool = Field(
        description="Anchor attention on by default: every frame's self-attention also attends "
        "to the job's anchor keyframe (anchor 'first_keyframe'; with a reference image, "
        "'reference')."
    )
    anchor_pool: int = Field(
        ge=1,
        le=MAX_ANCHOR_POOL,
        description="The anchor's keys/values averaged over pool x pool token blocks when the "
        "anchor is on: the wider attention costs 1/pool^2 of a full-size anchor's.",
    )
    seamless: bool = Field(
        description="Seamless chunks on by default: job-level noise windows (noise "
        "'job_windows'), so neighbouring chunks meet on continuous noise."
    )
    chunk_overlap: int = Field(
        ge=0,
        le=MAX_CHUNK_OVERLAP,
        description="With seamless chunks: frames every chunk but the first also generates "
        "before its span and cross-fades at the boundary (each billed by both chunks).",
    )
    motion_module: bool = Field(
        default=False,
        description="The AnimateDiff motion module joins by default when the app has one "
        "configured (AppArgs.motion_module); without one the preset runs without it.",
    )


# No anchor, per-chunk noise, no overlap: each chunk generated on its own (the plans of before
# coherence existed). Switched on (by a reference image, a switch or an override), the anchor
# runs at the engine's default pool, as it did before presets had coherence.
COHERENCE_OFF = PresetCoherence(
    anchor=False,
    anchor_pool=GenerationSettings.model_fields["anchor_pool"].default,
    seamless=False,
    chunk_overlap=0,
)


class Preset(BaseModel):
    """The levers a preset sets; a request may override any of them."""

    generation_long_side: int | None = Field(
        description="Long side of generated frames, pixels; None picks 512 or 768 by aspect."
    )
    generation_fps: float = Field(description="Frames the diffusion model generates per second.")
    steps: int = Field(description="Denoising steps.")
    scheduler: str = Field(default="dpmpp_2m", description="Diffusion scheduler.")
    precision: Literal["fp16", "bf16", "fp32"] = Field(description="Model dtype on CUDA.")
    guidance_scale: float = Field(
        default=7.5,
        description="Classifier-free guidance scale; <= 1 turns CFG off (one UNet "
        "row per frame instead of two).",
    )
    few_step: bool = Field(
        default=False,
        description="Needs a few-step model: refused unless the app's base model is flagged "
        "few-step or a few-step LoRA is configured (the plan then fuses it).",
    )
    controlnet_every: int = Field(
        description="ControlNet (or the T2I-Adapter) on every K-th frame."
    )
    conditioner: Conditioner = Field(
        default="controlnet",
        description='What turns the pose maps into conditioning: "controlnet" (every '
        'keyframe at every step in the control window) or "t2i_adapter" (a T2I-Adapter once per '
        "keyframe per chunk, its features reused at every step: nearly free conditioning, "
        "looser pose adherence; needs the app's t2i_adapter, else 422). A request sets it with "
        '`overrides: {"conditioner": "t2i_adapter"}`.',
    )
    output_long_side: int = Field(description="Long side of the delivered video, pixels.")
    output_fps: float = Field(default=25.0, description="Delivered frame rate.")
    batching: bool = Field(default=True, description="Micro-batch chunks across jobs.")
    cache: bool = Field(default=True, description="Reuse cached stage outputs.")
    coherence: PresetCoherence = Field(
        description="Anchor attention and seamless chunks by default (a request's `coherence` "
        "switches and field overrides change them).",
    )
    keyframe_density: DensityMode = Field(
        default="fixed",
        description="'motion': slow chunks generate fewer frames, chosen from the edited "
        "skeleton (deployments/density.py); 'fixed': every chunk every grid frame. The "
        "override `keyframe_density` changes it.",
    )


PRESETS: dict[str, Preset] = {
    # Cheapest acceptable: SD 1.5 at its native 512, 15 DPM++ 2M steps (the scheduler's
    # quality plateaus around 15-20), ControlNet on every 4th frame, 720p-class output.
    "draft": Preset(
        generation_long_side=512, generation_fps=12, steps=15, precision="fp16",
        controlnet_every=4, output_long_side=1280, coherence=COHERENCE_OFF,
    ),
    # The default: 512 or 768 by aspect (wide frames get 768 so the short side stays near the
    # 512 SD 1.5 was trained at), 12 fps (half of 25: interpolation fills the rest on CPU),
    # 18 steps, fp16 (half the VRAM, no visible loss), ControlNet every 4th frame (poses move
    # little in 1/3 s; residuals are interpolated), upscaled to 1080p. Coherent: anchor
    # attention at pool 4 (its wider attention then costs 1/16 of a full-size anchor's) and job
    # noise windows (free): +7.7% work units on the 10 s 1080p25 clip (benchmarks/cost.py).
    # Motion keyframe density: a chunk whose edited skeleton moves slowly generates at 6 fps
    # (the interpolator carries it within the error budget of benchmarks/keyframe_density.py),
    # fast ones at 12: the default plan is the one that should pay only for the motion there is.
    "standard": Preset(
        generation_long_side=None, generation_fps=12, steps=18, precision="fp16",
        controlnet_every=4, output_long_side=1920,
        coherence=PresetCoherence(anchor=True, anchor_pool=4, seamless=True, chunk_overlap=0),
        keyframe_density="motion",
    ),
    # For fast motion: 768, 20 steps and ControlNet every 2nd frame; a finer anchor (pool 2)
    # and one overlap frame cross-faded at each chunk boundary; the AnimateDiff motion module
    # when the app has one (+28.9% work units: high is the preset that pays for quality).
    "high": Preset(
        generation_long_side=768, generation_fps=12, steps=20, precision="fp16",
        controlnet_every=2, output_long_side=1920,
        coherence=PresetCoherence(anchor=True, anchor_pool=2, seamless=True, chunk_overlap=1,
                                  motion_module=True),
    ),
    # Few-step: what `standard` plans, denoised in 6 LCM steps with CFG off (guidance 1: one UNet
    # row per frame, not two), which only a few-step model does well: it needs a few-step LoRA
    # (LCM-LoRA, TCD, Hyper-SD; fused into the weights, so no per-step cost) or a few-step base
    # model, and is refused without one (6 steps of plain SD 1.5 give mush). Anchor attention
    # and seamless chunks as in `standard` (issue 18: one character, whatever the step count).
    "turbo": Preset(
        generation_long_side=None, generation_fps=12, steps=6, scheduler="lcm", precision="fp16",
        guidance_scale=1.0, few_step=True, controlnet_every=4, output_long_side=1920,
        coherence=PresetCoherence(anchor=True, anchor_pool=4, seamless=True, chunk_overlap=0),
        keyframe_density="motion",
    ),
    # `draft` and `high` keep fixed density: draft's plans, keys and the demo's figures stay as
    # they were (a request turns it on with the `keyframe_density` override), and high is the
    # preset that pays for quality, every grid frame generated. Turbo takes standard's density.
    # The baseline: what a straightforward implementation would run for the same output.
    "naive": Preset(
        generation_long_side=1920, generation_fps=25, steps=30, precision="fp32",
        controlnet_every=1, output_long_side=1920, batching=False, cache=False,
        coherence=COHERENCE_OFF,
    ),
}  # fmt: skip

NAIVE = PRESETS["naive"]
# Stages the naive plan does not have: it generates every output frame at output size.
NAIVE_SKIPS = frozenset({"upscale", "interpolate"})
