"""Interpolation settings: how frames between generated frames are made (part of the stage's
cache key)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

# Bump when the same frames and settings would give other interpolated frames.
INTERPOLATE_CODE_VERSION = "interpolate-1"


class InterpolationSettings(BaseModel):
    """How frames between generated frames are made; part of the stage's cache key."""

    backend: Literal["flow", "rife"] = Field(
        default="flow",
        description="'flow': OpenCV optical flow on CPU, no weights. 'rife': a learned model, "
        "needs `rife_weights` and a registered implementation.",
    )
    rife_weights: str | None = Field(
        default=None, description="Path of the RIFE weights file; required by backend 'rife'."
    )
    flow_preset: Literal["ultrafast", "fast", "medium"] = Field(
        default="medium", description="OpenCV DIS preset: speed against flow accuracy."
    )
    flow_refinement_iterations: int = Field(
        default=2,
        ge=0,
        le=20,
        description="DIS variational refinement iterations per pyramid level (the 'medium' "
        "preset uses 5; 2 measured faster and as accurate here).",
    )
    flow_scale: float = Field(
        default=0.75,
        gt=0,
        le=1,
        description="Motion is estimated on frames scaled by this factor (grey), then "
        "upsampled: the main speed knob.",
    )
    candidate_shift_px: int = Field(
        default=2,
        ge=0,
        le=16,
        description="Also try the flows found this many pixels (at flow scale) away from each "
        "pixel, diagonally both ways; fixes flow smeared across moving edges. 0 disables.",
    )
    match_window: int = Field(
        default=5,
        ge=1,
        le=15,
        description="Side of the box (at flow scale) over which the matching cost that picks "
        "each pixel's motion is averaged.",
    )
    occlusion: bool = Field(
        default=False,
        description="Weight each frame by its forward-backward flow consistency where the two "
        "warps disagree (content hidden in one frame comes from the other).",
    )
    occlusion_sigma_px: float = Field(
        default=2.0,
        gt=0,
        description="Forward-backward flow error (pixels at flow scale) at which a pixel's "
        "visibility falls to 1/e.",
    )
    disagreement_range: tuple[float, float] = Field(
        default=(6.0, 20.0),
        description="Grey-level disagreement of the two warps over which occlusion weighting "
        "fades in (below: plain time-weighted blend; above: full occlusion weighting).",
    )
    scene_cut_correlation: float = Field(
        default=0.5,
        ge=-1,
        le=1,
        description="Thumbnail correlation below which two frames are a scene cut: the "
        "nearer frame is held instead of morphing.",
    )
    sampling: Literal["auto", "linear", "cubic"] = Field(
        default="auto",
        description="Resampling of the colour frames when warping. Bilinear blurs fine detail "
        "at fractional offsets, so interpolated frames would look softer than generated ones "
        "(a visible pulse of sharpness); bicubic keeps it. 'auto': bicubic, except bilinear "
        "on frames at least twice the size the motion was measured on (upscaled frames are "
        "smooth at pixel scale, and bicubic costs 6x more there for no gain).",
    )
    pad_tail: bool = Field(
        default=True,
        description="Hold the last source frame for output times inside its display interval "
        "(after the last source time), so the retimed clip lasts as long as the source.",
    )

    @model_validator(mode="after")
    def _ordered_range(self) -> InterpolationSettings:
        low, high = self.disagreement_range
        if not 0 <= low < high:
            raise ValueError("disagreement_range must be (low, high) with 0 <= low < high")
        return self
