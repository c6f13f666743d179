"""Request and response bodies of the HTTP API (every model its OpenAPI document shows).

The job's states and per-stage progress are here too: the manifest stores them and the API
reports them, with the same schema. Nothing here imports the rest of the app, so the client, the
CLI and the benchmarks can build requests without the service's machinery.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from deployments.motion import MotionStyle, parse_styles
from serve.presets import PRESETS

# 'naive' is the cost reports' baseline (benchmarks run it in process), not a service: the API
# refuses it, and its OpenAPI lists only these.
PUBLIC_PRESETS: tuple[str, ...] = tuple(name for name in PRESETS if name != "naive")
STYLE_NAMES: tuple[str, ...] = tuple(
    cls.model_fields["name"].default for cls in get_args(get_args(MotionStyle)[0])
)


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


# What deployments.motion.parse_style accepts: a style name in any case, with surrounding
# spaces, then nothing, `=value` or `:key=value,...` (the parser checks the values). Written
# without inline flags so ECMA-262 and Python regex engines read it alike.
STYLE_PATTERN = (
    r"^\s*(?:" + "|".join(_any_case(name) for name in STYLE_NAMES) + r")\s*(?:[:=][\s\S]*)?$"
)
# Documented only (the field validator gives the precise error, naming the valid styles).
StyleText = Annotated[
    str,
    WithJsonSchema(
        {
            "type": "string",
            "pattern": STYLE_PATTERN,
            "description": "name, name=value or name:key=value,... with name one of "
            + ", ".join(STYLE_NAMES),
        }
    ),
]


def motion_style_schemas(ref_template: str = "#/components/schemas/{model}") -> dict[str, dict]:
    """JSON schemas of the motion styles and their parameters (types, defaults, bounds), by
    name, plus `MotionStyle`, their union: the OpenAPI document carries them so clients (the web
    page) build the `name:key=value,...` texts of `JobRequest.styles` from one definition."""
    schema = TypeAdapter(MotionStyle).json_schema(ref_template=ref_template)
    return {**schema.pop("$defs", {}), "MotionStyle": schema}


PresetText = Annotated[
    str | None,
    WithJsonSchema({"anyOf": [{"type": "string", "enum": list(PUBLIC_PRESETS)}, {"type": "null"}]}),
]


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


# What a job can deliver (serve/pipeline.py enforces the same bounds on the planned output,
# sizes derived from the input's aspect included). Below 1 fps the result is a slideshow whose
# last frame outlasts the input by up to 1/fps; above 60 no player gains anything. The sides
# allow 4K either way up; the area caps it at 4K UHD.
OUTPUT_FPS_MIN, OUTPUT_FPS_MAX = 1.0, 60.0
OUTPUT_SIDE_MIN, OUTPUT_SIDE_MAX = 64, 3840
OUTPUT_PIXELS_MAX = 3840 * 2160
_OUTPUT_RANGES = {
    "fps": (OUTPUT_FPS_MIN, OUTPUT_FPS_MAX, "frames per second"),
    "width": (OUTPUT_SIDE_MIN, OUTPUT_SIDE_MAX, "pixels"),
    "height": (OUTPUT_SIDE_MIN, OUTPUT_SIDE_MAX, "pixels"),
}


class OutputSpec(BaseModel):
    """What the user gets back; None fields come from the preset."""

    model_config = {"extra": "forbid"}

    fps: float | None = Field(
        default=None,
        ge=OUTPUT_FPS_MIN,
        le=OUTPUT_FPS_MAX,
        description=f"Output frame rate, {OUTPUT_FPS_MIN:g} to {OUTPUT_FPS_MAX:g}.",
    )
    width: int | None = Field(
        default=None,
        ge=OUTPUT_SIDE_MIN,
        le=OUTPUT_SIDE_MAX,
        description=f"Output width, {OUTPUT_SIDE_MIN} to {OUTPUT_SIDE_MAX} (odd sizes round up "
        "to even); alone, the height follows the input's aspect.",
    )
    height: int | None = Field(
        default=None,
        ge=OUTPUT_SIDE_MIN,
        le=OUTPUT_SIDE_MAX,
        description=f"Output height, {OUTPUT_SIDE_MIN} to {OUTPUT_SIDE_MAX}; width x height at "
        f"most {OUTPUT_PIXELS_MAX} pixels (4K UHD).",
    )
    keep_audio: bool = Field(
        default=True, description="Carry the source's audio over (when timing is unchanged)."
    )

    @field_validator("fps", "width", "height", mode="wrap")
    @classmethod
    def _in_range(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo):
        """Say the whole allowed range, not just the side that was crossed."""
        try:
            return handler(value)
        except ValidationError:
            low, high, unit = _OUTPUT_RANGES[info.field_name]
            raise ValueError(
                f"output {info.field_name} must be from {low:g} to {high:g} {unit}, got {value!r}"
            ) from None

    @model_validator(mode="after")
    def _area_in_range(self) -> OutputSpec:
        if self.width and self.height and self.width * self.height > OUTPUT_PIXELS_MAX:
            raise ValueError(
                f"output {self.width}x{self.height} is {self.width * self.height} pixels; at "
                f"most {OUTPUT_PIXELS_MAX} (3840x2160 or 2160x3840) are allowed"
            )
        return self


class Coherence(BaseModel):
    """Switches for what makes the frames one video of one character; None keeps the preset's
    default (on for standard and high, off for draft). A field override (`anchor`,
    `anchor_pool`, `noise`, `chunk_overlap`) is more specific and wins over its switch; the
    order is `serve.pipeline.coherence_overrides`."""

    model_config = {"extra": "forbid"}

    anchor: bool | None = Field(
        default=None,
        description="Anchor attention: every generated frame also attends to one anchor per "
        "job (the job's anchor keyframe; with a reference image, anchored on it), so the "
        "character looks the same in every chunk. false turns it off (a reference image then "
        "has no effect), true turns it on where the preset leaves it off. Costs one anchor "
        "keyframe per job and one anchor pass per chunk (+7.7% work units on standard with "
        "seamless chunks).",
    )
    seamless: bool | None = Field(
        default=None,
        description="Seamless chunks: job-level noise windows so chunk k and k+1 do not meet "
        "in a cut (and, on high, one overlap frame cross-faded at each boundary, billed by "
        "both chunks). false gives every chunk its own noise; true turns it on where the "
        "preset leaves it off.",
    )
    motion_module: bool | None = Field(
        default=None,
        description="The AnimateDiff motion module (each chunk one context window), where the "
        "server has one configured: on by default in the high preset, off in the others. true "
        "where none is configured is refused (422). Costs about +0.38 UNet evaluations per frame.",
    )


class JobRequest(BaseModel):
    """A user's edit request (the JSON part of POST /v1/jobs)."""

    model_config = {"extra": "forbid"}

    prompt: str = Field(min_length=1, max_length=1000, description="What the person looks like.")
    negative_prompt: str = Field(default="", max_length=1000, description="What to avoid.")
    styles: list[StyleText] = Field(
        default_factory=lambda: ["smooth"],
        max_length=16,
        description="Motion styles applied in order, e.g. ['smooth', 'exaggerate=1.3'].",
    )
    preset: PresetText = Field(
        default=None,
        description="draft, standard, high or turbo (few-step: needs a few-step LoRA or base "
        "model); None uses the app's default.",
    )
    seed: int | None = Field(
        default=None, ge=0, lt=2**32, description="Noise seed; None picks one (recorded)."
    )
    output: OutputSpec = Field(default_factory=OutputSpec, description="Output size and rate.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Plan fields to override (see POST /v1/estimate)."
    )
    coherence: Coherence | None = Field(
        default=None,
        description="Turn anchor attention or seamless chunks off (or on) against the preset's "
        "default; None keeps the preset's.",
    )
    frames: Literal["motion", "anchor"] = Field(
        default="motion",
        description="Previews only (a job ignores it, so one body serves both): 'motion' is "
        "the CPU-only motion preview; 'anchor' also renders the job's anchor keyframe as a PNG "
        "(one GPU frame, billed to the preview; a job submitted afterwards with the same "
        "settings takes it from the cache). Needs anchor attention (a reference image, the "
        "preset's, or the `anchor` override).",
    )

    @field_validator("styles")
    @classmethod
    def _styles_parse(cls, styles: list[str]) -> list[str]:
        parse_styles(styles)  # raises InvalidSettingError listing the valid styles
        return styles


class StageProgress(BaseModel):
    done: int = Field(default=0, ge=0, description="Units (chunks or frames) finished.")
    total: int = Field(default=0, ge=0, description="Units planned; 0 while unknown.")


class JobAccepted(BaseModel):
    job_id: str = Field(description="Id to poll with GET /v1/jobs/{job_id}.")
    state: JobState = Field(description="queued, or done when served entirely from cache.")
    status_url: str = Field(description="Where to poll.")
    result_url: str = Field(description="Where the MP4 will be.")


class JobStatus(BaseModel):
    job_id: str
    state: JobState
    created_at: str
    updated_at: str
    progress: dict[str, StageProgress] = Field(description="Per stage: units done of total.")
    attempts: int = Field(description="1, plus one per resume (after a restart or lost replica).")
    cancel_requested: bool = Field(
        default=False,
        description="A cancel was asked for and the job's replica has not stopped it yet (it "
        "does between chunks).",
    )
    error: dict[str, str] | None = Field(default=None, description="code and message if failed.")
    report: dict[str, Any] | None = Field(default=None, description="Cost report when done.")
    result_url: str | None = Field(default=None, description="The MP4, when done.")
    checkpointed_chunks: list[int] = Field(
        default_factory=list, description="Chunks finished and stored (a resume skips them)."
    )
    ledger: list[dict[str, Any]] = Field(
        default_factory=list, description="Cost records of the work done so far, per stage call."
    )


class PreviewAccepted(BaseModel):
    preview_id: str = Field(description="Id to poll with GET /v1/previews/{preview_id}.")
    state: JobState = Field(description="queued.")
    status_url: str = Field(description="Where to poll.")
    video_url: str = Field(description="Where the preview MP4 will be.")


class PreviewStatus(BaseModel):
    """A motion preview: CPU only, no diffusion. When done, `report` holds what the preview
    cost (`preview`: zero work units, zero GPU seconds) and the `estimate` of the full job."""

    preview_id: str
    state: JobState
    created_at: str
    updated_at: str
    progress: dict[str, StageProgress] = Field(description="Per stage: units done of total.")
    cancel_requested: bool = Field(
        default=False, description="A cancel was asked for and has not taken effect yet."
    )
    error: dict[str, str] | None = Field(default=None, description="code and message if failed.")
    report: dict[str, Any] | None = Field(
        default=None, description="Preview cost and the full job's estimate, when done."
    )
    video_url: str | None = Field(
        default=None,
        description="The preview MP4, when done: the source with the original skeleton beside "
        "the same frames with the edited skeleton, at the generation fps and size.",
    )
    anchor_url: str | None = Field(
        default=None,
        description='The anchor keyframe PNG, when done and asked for (`frames: "anchor"`).',
    )
    ledger: list[dict[str, Any]] = Field(
        default_factory=list, description="Cost records of the work done so far, per stage call."
    )


class EstimateRequest(BaseModel):
    model_config = {"extra": "forbid"}

    duration_s: float = Field(gt=0, le=3600, description="Input video duration in seconds.")
    width: int = Field(gt=0, le=16384, description="Input video width.")
    height: int = Field(gt=0, le=16384, description="Input video height.")
    request: JobRequest = Field(description="The edit request to estimate.")


class S3JobRequest(JobRequest):
    """The JSON body of POST /v1/jobs: a `JobRequest` plus the input by reference."""

    input: str = Field(
        description="s3://bucket/key of the video, in one of the app's allowed input buckets "
        "(anything else is refused with 403)."
    )
    reference: str | None = Field(
        default=None,
        description="s3://bucket/key of an optional reference image (PNG, JPEG or WebP, one "
        "frame), under the same allowed buckets: the character's look. It turns anchor "
        "attention on with the reference as the anchor (override `anchor` to change that).",
    )


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. job_not_found.")
    message: str = Field(description="What went wrong, in words a user understands.")


class ErrorResponse(BaseModel):
    """The one shape of every error the API sends (validation errors included)."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    """GET /readyz: 200 when ready, 503 with the same body when not."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ready", "not_ready"]
    active_jobs: int = Field(description="Jobs running on the replica that answered.")
    max_active_jobs: int = Field(description="Jobs in flight a replica admits (503 beyond).")
    active_previews: int = Field(default=0, description="Previews running on that replica.")
    max_active_previews: int = Field(
        default=0, description="Previews in flight a replica admits (503 beyond)."
    )
