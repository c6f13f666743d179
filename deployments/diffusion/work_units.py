"""The work-unit formula: what the GPU must do for a chunk, independent of hardware.

Pure Python (pydantic only, no torch, no numpy), so the cost model (`serve/cost.py`) imports it
without loading the engine; `DiffusionEngine.generate` counts the same things as it runs.

Decisions (the why):
- Outside `control_guidance_start/end` ControlNet is not evaluated at all (the pipeline
  evaluates it and multiplies by 0; adding zero residuals changes nothing, so skipping it is
  exact and saves the work).
- Classifier-free guidance runs only when guidance_scale > 1; then UNet and ControlNet see each
  frame twice (unconditional and conditional halves), and both are counted twice.
- Text encoding (one per distinct prompt per batch, about 2% of one UNet evaluation at SD 1.5
  size) is not counted in work units.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, field_validator

if TYPE_CHECKING:
    from deployments.diffusion.settings import GenerationSettings

VAE_FACTOR = 8  # SD's VAE downsamples each side by 8
REFERENCE_LATENT_AREA = 64 * 64  # 512x512 pixels: one work unit per UNet evaluation
# Units are sums of float products taken in different orders (counted: chunk by chunk as they
# finish; predicted: one chunk times the chunk count), so their last bits differ (seen:
# 3.2524024390243915 vs 3.252402439024391). Rounded to a millionth of a unit, far below any
# priced quantity, counted and predicted compare equal.
UNIT_DECIMALS = 6


class WorkUnits(BaseModel):
    """What the GPU must do, independent of hardware.

    Evaluations are counted per frame per step (twice with CFG); units weigh them by latent area
    relative to 512x512 and, for ControlNet and the VAE decoder, by their cost relative to the
    UNet (`ModelWeights`). Units add up across chunks and jobs.
    """

    unet_evals: int = Field(default=0, description="UNet evaluations (frame x step x CFG).")
    controlnet_evals: int = Field(default=0, description="ControlNet evaluations.")
    vae_decodes: int = Field(default=0, description="Frames decoded by the VAE.")
    unet_units: float = Field(default=0.0, description="UNet evaluations x area.")
    controlnet_units: float = Field(
        default=0.0, description="ControlNet evaluations x area x ControlNet weight."
    )
    vae_units: float = Field(default=0.0, description="VAE decodes x area x VAE weight.")

    @field_validator("unet_units", "controlnet_units", "vae_units")
    @classmethod
    def _rounded(cls, units: float) -> float:
        return round(units, UNIT_DECIMALS)

    @property
    def total(self) -> float:
        return self.unet_units + self.controlnet_units + self.vae_units

    def __add__(self, other: WorkUnits) -> WorkUnits:
        return WorkUnits(
            **{name: getattr(self, name) + getattr(other, name) for name in WorkUnits.model_fields}
        )


class ModelWeights(BaseModel):
    """Cost of one ControlNet evaluation and one VAE decode relative to one UNet evaluation."""

    controlnet_weight: float = Field(
        gt=0, description="ControlNet parameters / UNet parameters (from the loaded models)."
    )
    vae_weight: float = Field(
        gt=0,
        description="VAE-decoder FLOPs / UNet FLOPs per frame at 512x512, counted on meta "
        "copies of the loaded models (parameters would understate the decoder ~17x: it runs "
        "at pixel resolution).",
    )
    unet_parameters: int = Field(default=0, ge=0, description="UNet parameter count.")
    controlnet_parameters: int = Field(default=0, ge=0, description="ControlNet parameter count.")


# Measured with `measure_model_weights` on SD 1.5's UNet/VAE and ControlNet v1.x architectures
# (859,520,964 and 361,279,120 parameters; VAE decode 2515 GFLOPs vs UNet 803 GFLOPs at 512x512).
# A test rebuilds these architectures on the meta device and checks the numbers.
SD15_MODEL_WEIGHTS = ModelWeights(
    controlnet_weight=361_279_120 / 859_520_964,
    vae_weight=3.1303,
    unet_parameters=859_520_964,
    controlnet_parameters=361_279_120,
)


def cfg_enabled(guidance_scale: float) -> bool:
    return guidance_scale > 1.0


def latent_area_weight(width: int, height: int) -> float:
    """Latent area relative to 512x512 (1.0 there)."""
    return (height // VAE_FACTOR) * (width // VAE_FACTOR) / REFERENCE_LATENT_AREA


def controlnet_active_steps(steps: int, start: float, end: float) -> list[bool]:
    """Whether ControlNet applies at each step (the same test diffusers' pipeline makes)."""
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def keyframe_indices(frames: int, every: int) -> list[int]:
    """Every `every`-th frame from 0, plus the last frame, so no frame needs extrapolation."""
    if frames <= 0:
        return []
    keys = list(range(0, frames, every))
    if keys[-1] != frames - 1:
        keys.append(frames - 1)
    return keys


def weigh_work(
    unet_evals: int,
    controlnet_evals: int,
    vae_decodes: int,
    *,
    width: int,
    height: int,
    controlnet_weight: float,
    vae_weight: float,
) -> WorkUnits:
    area = latent_area_weight(width, height)
    return WorkUnits(
        unet_evals=unet_evals,
        controlnet_evals=controlnet_evals,
        vae_decodes=vae_decodes,
        unet_units=unet_evals * area,
        controlnet_units=controlnet_evals * area * controlnet_weight,
        vae_units=vae_decodes * area * vae_weight,
    )


def predict_work_units(
    frames: int,
    steps: int,
    guidance_scale: float,
    controlnet_every: int,
    control_guidance_start: float,
    control_guidance_end: float,
    width: int,
    height: int,
    controlnet_weight: float = SD15_MODEL_WEIGHTS.controlnet_weight,
    vae_weight: float = SD15_MODEL_WEIGHTS.vae_weight,
) -> WorkUnits:
    """Work units of one chunk of `frames` frames, before running it.

    UNet: frames x steps (x2 with CFG). ControlNet: keyframes x active steps (x2 with CFG).
    VAE: one decode per frame. `DiffusionEngine.generate` counts exactly this.
    """
    passes = 2 if cfg_enabled(guidance_scale) else 1
    active = sum(controlnet_active_steps(steps, control_guidance_start, control_guidance_end))
    keyframes = len(keyframe_indices(frames, controlnet_every))
    return weigh_work(
        frames * steps * passes,
        keyframes * active * passes,
        frames,
        width=width,
        height=height,
        controlnet_weight=controlnet_weight,
        vae_weight=vae_weight,
    )


def predict_chunk_units(
    settings: GenerationSettings, frames: int, weights: ModelWeights = SD15_MODEL_WEIGHTS
) -> WorkUnits:
    """`predict_work_units` for a chunk with these settings."""
    return predict_work_units(
        frames,
        settings.steps,
        settings.guidance_scale,
        settings.controlnet_every,
        settings.control_guidance_start,
        settings.control_guidance_end,
        settings.width,
        settings.height,
        weights.controlnet_weight,
        weights.vae_weight,
    )
