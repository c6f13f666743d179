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
- Anchor attention (settings.anchor on) costs three things, all counted. (1) The anchor
  keyframe: the job's frame 0 generated once, alone, before the chunks (`keyframe_settings`:
  with a reference image it carries its own anchor pass); a 1-frame generation like any other,
  counted by the engine on that request and predicted per job (`serve/cost.py`). (2) Each
  chunk's anchor pass: one VAE encode of the keyframe image per chunk (`vae_encodes`, weighted
  by the encoder's FLOPs relative to the UNet's; encoding per chunk rather than once per job
  keeps a chunk's work independent of the others: any chunk may run on any replica, be retried
  or be cached; about 1.4 UNet evaluations per chunk) and one UNet row per chunk per step
  (twice with CFG), no ControlNet (an image anchor has no pose map). One per chunk, not per
  (job, batch): two chunks of one job in one batch each carry their own (identical) anchor row,
  so a chunk's work never depends on its batch mates and the prediction, made before any batch
  exists, equals the count. (3) The wider self-attention: each frame's attn1 layers also take
  the anchor's tokens (1/pool^2 of them), which adds the QK^T and AV products with them;
  counted per frame evaluation as `anchor_attention_weight` (those FLOPs / UNet FLOPs at
  512x512, measured on the loaded model) x area^2 / pool^2 (query and anchor tokens both grow
  with the latent area; exact at sizes divisible by 64 pixels).
- The motion module (settings.motion_module on, see motion_module.py) runs inside every UNet
  evaluation of the chunk's frames (and of its anchor, a window of one frame). Its FLOPs per
  frame are affine in the window length F (a chunk is one window): `motion_module_weight`
  (projections, norms, feed-forwards of the temporal layers) + `motion_attention_weight` x F
  (the temporal QK^T and AV), both relative to one UNet evaluation at 512x512 and both linear
  in the latent area (the temporal attention runs per token, along the frames). Counted as
  `motion_module_evals` (evaluations) and `motion_attention_evals` (evaluations x F).
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
    vae_encodes: int = Field(
        default=0, description="Images encoded by the VAE (a reference-image anchor's)."
    )
    vae_encode_units: float = Field(
        default=0.0, description="VAE encodes x area x VAE encoder weight."
    )
    anchor_attention_evals: int = Field(
        default=0, description="UNet evaluations whose self-attention also took an anchor."
    )
    anchor_attention_units: float = Field(
        default=0.0,
        description="Those evaluations x area^2 / anchor_pool^2 x anchor attention weight.",
    )
    motion_module_evals: int = Field(
        default=0, description="UNet evaluations that ran through the motion module."
    )
    motion_module_units: float = Field(
        default=0.0, description="Those evaluations x area x motion module weight."
    )
    motion_attention_evals: int = Field(
        default=0,
        description="Motion-module evaluations x frames in their context window (the temporal "
        "attention of a frame grows with the window).",
    )
    motion_attention_units: float = Field(
        default=0.0, description="Those frame-evaluations x area x motion attention weight."
    )

    # Every float field: one left out compares unequal in its last bits (counted vs predicted).
    @field_validator(
        "unet_units",
        "controlnet_units",
        "vae_units",
        "vae_encode_units",
        "anchor_attention_units",
        "motion_module_units",
        "motion_attention_units",
    )
    @classmethod
    def _rounded(cls, units: float) -> float:
        return round(units, UNIT_DECIMALS)

    @property
    def total(self) -> float:
        return (
            self.unet_units
            + self.controlnet_units
            + self.vae_units
            + self.vae_encode_units
            + self.anchor_attention_units
            + self.motion_module_units
            + self.motion_attention_units
        )

    def __add__(self, other: WorkUnits) -> WorkUnits:
        return WorkUnits(
            **{name: getattr(self, name) + getattr(other, name) for name in WorkUnits.model_fields}
        )


# SD 1.5's UNet at 512x512: 16 attn1 layers (5 at each of 64x64, 32x32 and 16x16 tokens, 1 at
# 8x8); a full-size anchor adds 4 x N^2 x channels FLOPs to each. Measured with
# `measure_model_weights`; a test rebuilds the architecture on the meta device and checks it.
SD15_ANCHOR_ATTENTION_WEIGHT = 0.152494
# SD 1.5's VAE encoder at 512x512 / its UNet, measured the same way (see SD15_MODEL_WEIGHTS).
SD15_VAE_ENCODE_WEIGHT = 1.3901
# AnimateDiff's SD 1.5 motion adapter (v1-5-2 architecture: 453,209,280 parameters, motion mid
# block) in UNetMotionModel at 512x512: per frame 1108.54 GFLOPs at F=8 and 1109.31 at F=16
# against the UNet's 803.27, i.e. 0.379078 + 0.000119076 x F UNet evaluations per frame (about
# +0.381 at 16 frames). Measured with `motion_module.measure_motion_weights`; a test rebuilds
# the architecture on the meta device and checks it.
SD15_MOTION_MODULE_WEIGHT = 0.379078
SD15_MOTION_ATTENTION_WEIGHT = 0.000119076


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
    vae_encode_weight: float = Field(
        default=SD15_VAE_ENCODE_WEIGHT,
        ge=0,
        description="VAE-encoder FLOPs / UNet FLOPs per image at 512x512 (meta copies, as the "
        "decoder's).",
    )
    anchor_attention_weight: float = Field(
        default=SD15_ANCHOR_ATTENTION_WEIGHT,
        ge=0,
        description="FLOPs a full-size anchor adds to one UNet evaluation's self-attention "
        "(QK^T and AV over the anchor's tokens in every attn1 layer) / UNet FLOPs, at 512x512.",
    )
    motion_module_weight: float = Field(
        default=SD15_MOTION_MODULE_WEIGHT,
        ge=0,
        description="FLOPs the motion module adds to one frame evaluation, apart from its "
        "temporal attention over the window, / UNet FLOPs, at 512x512 (meta copies).",
    )
    motion_attention_weight: float = Field(
        default=SD15_MOTION_ATTENTION_WEIGHT,
        ge=0,
        description="FLOPs the motion module's temporal attention adds to one frame evaluation "
        "per frame of its window / UNet FLOPs, at 512x512 (meta copies).",
    )
    unet_parameters: int = Field(default=0, ge=0, description="UNet parameter count.")
    controlnet_parameters: int = Field(default=0, ge=0, description="ControlNet parameter count.")


# Measured with `measure_model_weights` on SD 1.5's UNet/VAE and ControlNet v1.x architectures
# (859,520,964 and 361,279,120 parameters; VAE decode 2515 GFLOPs vs UNet 803 GFLOPs at 512x512;
# a full-size anchor adds 122 GFLOPs of self-attention to a UNet evaluation).
# A test rebuilds these architectures on the meta device and checks the numbers.
SD15_MODEL_WEIGHTS = ModelWeights(
    controlnet_weight=361_279_120 / 859_520_964,
    vae_weight=3.1303,
    vae_encode_weight=SD15_VAE_ENCODE_WEIGHT,
    anchor_attention_weight=SD15_ANCHOR_ATTENTION_WEIGHT,
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


def anchor_attention_scale(width: int, height: int, pool: int) -> float:
    """Cost of one frame evaluation's wider attention in units of `anchor_attention_weight`."""
    return latent_area_weight(width, height) ** 2 / pool**2


def weigh_work(
    unet_evals: int,
    controlnet_evals: int,
    vae_decodes: int,
    *,
    width: int,
    height: int,
    controlnet_weight: float,
    vae_weight: float,
    anchor_attention_evals: int = 0,
    anchor_attention_weight: float = 0.0,
    anchor_pool: int = 1,
    vae_encodes: int = 0,
    vae_encode_weight: float = 0.0,
    motion_module_evals: int = 0,
    motion_attention_evals: int = 0,
    motion_module_weight: float = 0.0,
    motion_attention_weight: float = 0.0,
) -> WorkUnits:
    area = latent_area_weight(width, height)
    anchor_scale = anchor_attention_scale(width, height, anchor_pool)
    return WorkUnits(
        unet_evals=unet_evals,
        controlnet_evals=controlnet_evals,
        vae_decodes=vae_decodes,
        unet_units=unet_evals * area,
        controlnet_units=controlnet_evals * area * controlnet_weight,
        vae_units=vae_decodes * area * vae_weight,
        vae_encodes=vae_encodes,
        vae_encode_units=vae_encodes * area * vae_encode_weight,
        anchor_attention_evals=anchor_attention_evals,
        anchor_attention_units=anchor_attention_evals * anchor_attention_weight * anchor_scale,
        motion_module_evals=motion_module_evals,
        motion_module_units=motion_module_evals * area * motion_module_weight,
        motion_attention_evals=motion_attention_evals,
        motion_attention_units=motion_attention_evals * area * motion_attention_weight,
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
    anchor: bool = False,
    anchor_pool: int = 1,
    anchor_attention_weight: float = SD15_ANCHOR_ATTENTION_WEIGHT,
    vae_encode_weight: float = SD15_VAE_ENCODE_WEIGHT,
    motion_module: bool = False,
    motion_module_weight: float = SD15_MOTION_MODULE_WEIGHT,
    motion_attention_weight: float = SD15_MOTION_ATTENTION_WEIGHT,
) -> WorkUnits:
    """Work units of one chunk of `frames` frames, before running it.

    UNet: frames x steps (x2 with CFG). ControlNet: keyframes x active steps (x2 with CFG).
    VAE: one decode per frame. With the anchor: one VAE encode (the anchor image), one more
    UNet row per step (the anchor's pass) and every frame evaluation's wider attention.
    `motion_module`: every UNet row also runs the motion module, the frames as one window of
    `frames`, the anchor as a window of one.
    `DiffusionEngine.generate` counts exactly this.
    """
    passes = 2 if cfg_enabled(guidance_scale) else 1
    active = sum(controlnet_active_steps(steps, control_guidance_start, control_guidance_end))
    keyframes = len(keyframe_indices(frames, controlnet_every))
    rows = frames + (1 if anchor else 0)
    window_frames = frames * frames + (1 if anchor else 0)  # sum of each row's window length
    return weigh_work(
        rows * steps * passes,
        keyframes * active * passes,
        frames,
        width=width,
        height=height,
        controlnet_weight=controlnet_weight,
        vae_weight=vae_weight,
        anchor_attention_evals=frames * steps * passes if anchor else 0,
        anchor_attention_weight=anchor_attention_weight,
        anchor_pool=anchor_pool,
        vae_encodes=1 if anchor else 0,
        vae_encode_weight=vae_encode_weight,
        motion_module_evals=rows * steps * passes if motion_module else 0,
        motion_attention_evals=window_frames * steps * passes if motion_module else 0,
        motion_module_weight=motion_module_weight,
        motion_attention_weight=motion_attention_weight,
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
        anchor=settings.anchor != "off",
        anchor_pool=settings.anchor_pool,
        anchor_attention_weight=weights.anchor_attention_weight,
        vae_encode_weight=weights.vae_encode_weight,
        motion_module=settings.motion_module,
        motion_module_weight=weights.motion_module_weight,
        motion_attention_weight=weights.motion_attention_weight,
    )
