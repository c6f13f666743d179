"""The presets, and the one definition of the naive baseline (pure pydantic: no media imports,
so the cost model can read them without loading what `serve.pipeline` needs).

`naive` is the baseline every cost report compares against: every output frame generated at
output size, with the naive preset's steps, precision and ControlNet interval, batch 1, no
cache, everything on the GPU.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

PresetName = Literal["draft", "standard", "high", "turbo", "naive"]


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
    controlnet_every: int = Field(description="ControlNet on every K-th frame.")
    output_long_side: int = Field(description="Long side of the delivered video, pixels.")
    output_fps: float = Field(default=25.0, description="Delivered frame rate.")
    batching: bool = Field(default=True, description="Micro-batch chunks across jobs.")
    cache: bool = Field(default=True, description="Reuse cached stage outputs.")


PRESETS: dict[str, Preset] = {
    # Cheapest acceptable: SD 1.5 at its native 512, 15 DPM++ 2M steps (the scheduler's
    # quality plateaus around 15-20), ControlNet on every 4th frame, 720p-class output.
    "draft": Preset(
        generation_long_side=512, generation_fps=12, steps=15, precision="fp16",
        controlnet_every=4, output_long_side=1280,
    ),
    # The default: 512 or 768 by aspect (wide frames get 768 so the short side stays near the
    # 512 SD 1.5 was trained at), 12 fps (half of 25: interpolation fills the rest on CPU),
    # 18 steps, fp16 (half the VRAM, no visible loss), ControlNet every 4th frame (poses move
    # little in 1/3 s; residuals are interpolated), upscaled to 1080p.
    "standard": Preset(
        generation_long_side=None, generation_fps=12, steps=18, precision="fp16",
        controlnet_every=4, output_long_side=1920,
    ),
    # For fast motion: 768, 20 steps and ControlNet every 2nd frame.
    "high": Preset(
        generation_long_side=768, generation_fps=12, steps=20, precision="fp16",
        controlnet_every=2, output_long_side=1920,
    ),
    # Few-step: what `standard` plans, denoised in 6 LCM steps with CFG off (guidance 1: one UNet
    # row per frame, not two), which only a few-step model does well: it needs a few-step LoRA
    # (LCM-LoRA, TCD, Hyper-SD; fused into the weights, so no per-step cost) or a few-step base
    # model, and is refused without one (6 steps of plain SD 1.5 give mush).
    "turbo": Preset(
        generation_long_side=None, generation_fps=12, steps=6, scheduler="lcm", precision="fp16",
        guidance_scale=1.0, few_step=True, controlnet_every=4, output_long_side=1920,
    ),
    # The baseline: what a straightforward implementation would run for the same output.
    "naive": Preset(
        generation_long_side=1920, generation_fps=25, steps=30, precision="fp32",
        controlnet_every=1, output_long_side=1920, batching=False, cache=False,
    ),
}  # fmt: skip

NAIVE = PRESETS["naive"]
# Stages the naive plan does not have: it generates every output frame at output size.
NAIVE_SKIPS = frozenset({"upscale", "interpolate"})
