"""The plan: which stages run with which settings (pure; no Ray, no I/O).

Every stage setting that changes an output is in the plan, because the plan's parts are what the
content keys hash. Issue 5 adds the diffusion fields and the presets (draft/standard/high/naive).
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from deployments.motion import parse_styles
from deployments.pose import PoseSettings
from deployments.video import DecodeSettings, EncodeSettings


class Plan(BaseModel):
    """Settings of the CPU stages: decode -> pose -> motion edit -> pose maps."""

    decode: DecodeSettings = Field(
        default_factory=DecodeSettings,
        description="Generation frame rate and size; pose runs on these frames.",
    )
    pose: PoseSettings = Field(default_factory=PoseSettings, description="Pose extraction.")
    styles: list[str] = Field(
        default_factory=lambda: ["smooth"],
        description="Motion styles applied in order, e.g. ['smooth', 'exaggerate=1.3'].",
    )
    pose_map_crf: int = Field(
        default=18, ge=0, le=51, description="x264 quality of the pose-map video."
    )

    @field_validator("styles")
    @classmethod
    def _styles_parse(cls, styles: list[str]) -> list[str]:
        parse_styles(styles)  # raises InvalidSettingError naming the valid styles
        return styles

    def pose_map_encoding(self) -> EncodeSettings:
        return EncodeSettings(fps=self.decode.fps, crf=self.pose_map_crf)
