"""The plan: which stages run, with which settings (pure; no Ray, no I/O).

Every setting that changes an output is in the plan, because the plan's parts are what the
content keys hash. Presets (`serve.presets`) are the cheap defaults; `naive` is the baseline
every cost report compares against.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from deployments.density import DensitySchedule, KeyframeDensity
from deployments.diffusion import GenerationSettings
from deployments.diffusion.settings import MAX_NOISE_WINDOW, NoiseMode
from deployments.diffusion.settings import MIN_SIDE as GENERATION_SIDE_MIN
from deployments.errors import InvalidSettingError
from deployments.interpolate import InterpolationSettings
from deployments.motion import MotionEditor, parse_styles
from deployments.pose import PoseSettings
from deployments.video import DecodeSettings, EncodeSettings
from serve.presets import MAX_CHUNK_OVERLAP, PRESETS, Preset, PresetName
from serve.schemas import (
    OUTPUT_FPS_MAX,
    OUTPUT_FPS_MIN,
    OUTPUT_PIXELS_MAX,
    OUTPUT_SIDE_MAX,
    OUTPUT_SIDE_MIN,
    Coherence,
)


class Plan(BaseModel):
    """Everything that decides a job's output and cost."""

    preset: PresetName = Field(default="standard", description="The preset it started from.")
    decode: DecodeSettings = Field(
        default_factory=DecodeSettings,
        description="Generation frame rate and size; pose runs on these frames.",
    )
    pose: PoseSettings = Field(default_factory=PoseSettings, description="Pose extraction.")
    styles: list[str] = Field(
        default_factory=lambda: ["smooth"],
        description="Motion styles applied in order, e.g. ['smooth', 'exaggerate=1.3'].",
    )
    generation: GenerationSettings = Field(
        default_factory=lambda: GenerationSettings(model_id="tiny", width=512, height=288),
        description="Diffusion settings (the micro-batching key).",
    )
    output_fps: float = Field(default=25.0, gt=0, le=60, description="Delivered frame rate.")
    output_width: int = Field(default=1920, ge=16, le=7680, description="Delivered width.")
    output_height: int = Field(default=1080, ge=16, le=4320, description="Delivered height.")
    chunk_frames: int = Field(
        default=16, ge=1, le=256, description="Generated frames per chunk (cache/retry unit)."
    )
    noise: NoiseMode = Field(
        default="per_chunk",
        description="Each frame's own noise: 'per_chunk' (per chunk and frame in it) or "
        "'job_windows' (the job's one noise sequence at the frame's index in the job, so "
        "chunks meet on continuous noise; seamless chunks). Only the 1 - noise_sharing part "
        "(and ancestral schedulers' step noise) is a frame's own.",
    )
    noise_sharing: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of the initial noise common to all frames (1 = one noise tensor "
        "for every frame of the job: stable, but textures stick to the frame).",
    )
    noise_window: int = Field(
        default=16,
        ge=1,
        le=MAX_NOISE_WINDOW,
        description="job_windows: frames from one knot of the job's noise sequence to the next.",
    )
    chunk_overlap: int = Field(
        default=0,
        ge=0,
        le=MAX_CHUNK_OVERLAP,
        description="Seamless chunks: every chunk but the first also generates the previous "
        "chunk's last N frames (same frame indices, same noise: needs noise 'job_windows'), and "
        "the previous chunk's segment cross-fades its last N frames into them. Each overlap "
        "frame is generated, and billed, by both chunks.",
    )
    interpolation: InterpolationSettings = Field(
        default_factory=InterpolationSettings, description="Frame interpolation."
    )
    keyframe_density: KeyframeDensity = Field(
        default_factory=KeyframeDensity,
        description="How many frames each chunk generates: every frame of the generation grid "
        "('fixed'), or, by the edited skeleton's motion, fewer in slow chunks ('motion'; "
        "deployments/density.py). An override may give just the mode: 'motion' or 'fixed'.",
    )
    schedule: DensitySchedule | None = Field(
        default=None,
        description="The chunks' strides under motion density, set by the orchestrator from "
        "the edited skeleton before any GPU work (None: every chunk generates every grid "
        "frame). Not part of a submitted plan.",
    )
    batching: bool = Field(default=True, description="Micro-batch chunks across jobs.")
    cache: bool = Field(default=True, description="Reuse cached stage outputs.")
    output_crf: int = Field(default=18, ge=0, le=51, description="x264 quality of the result.")

    @field_validator("styles")
    @classmethod
    def _styles_parse(cls, styles: list[str]) -> list[str]:
        parse_styles(styles)  # raises InvalidSettingError naming the valid styles
        return styles

    @field_validator("keyframe_density", mode="before")
    @classmethod
    def _density_mode(cls, value: Any) -> Any:
        return {"mode": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _overlap_fits(self) -> Plan:
        if self.chunk_overlap and self.chunk_overlap >= self.chunk_frames:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be less than chunk_frames "
                f"({self.chunk_frames})"
            )
        if self.chunk_overlap and self.noise != "job_windows":
            raise ValueError(
                "chunk_overlap needs noise 'job_windows' (an overlap frame must get the same "
                "noise in both chunks that generate it)"
            )
        shortest = -(-self.chunk_frames // self.keyframe_density.max_stride(self.generation.fps))
        if self.chunk_overlap and self.chunk_overlap >= shortest:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be less than the frames a slow chunk "
                f"generates under motion keyframe density ({shortest})"
            )
        return self

    def generated_indices(self, chunk: int, span: tuple[int, int]) -> list[int]:
        """Grid frames chunk `chunk` generates (its overlap first); `span` is its own span."""
        if self.schedule is None:
            return list(range(span[0] - self.overlap_before(chunk), span[1]))
        return self.schedule.with_overlap(chunk, self.overlap_before(chunk))

    def first_generated(self, chunk: int, span: tuple[int, int]) -> int:
        """Index in the job's generated frames of the chunk's first own frame (grid index
        without a schedule)."""
        return span[0] if self.schedule is None else self.schedule.generated_before(chunk)

    def overlap_before(self, chunk: int) -> int:
        """Frames chunk `chunk` generates before its span (the previous chunk's last ones)."""
        return self.chunk_overlap if chunk > 0 else 0

    @property
    def interpolation_factor(self) -> float:
        return self.output_fps / self.generation.fps

    @property
    def upscale_factor(self) -> float:
        return max(self.output_width / self.generation.width, 1.0)

    def output_encoding(self) -> EncodeSettings:
        return EncodeSettings(fps=self.output_fps, crf=self.output_crf)

    def explain(self) -> list[str]:
        """One line per lever, for the job report."""
        g = self.generation
        anchor = ""
        if g.anchor != "off":
            anchor = f", anchor attention ({g.anchor}, pool {g.anchor_pool})"
        if g.motion_module:
            anchor += f", motion module (context window = chunk of {self.chunk_frames} frames)"
        if g.loras:
            fused = ", ".join(f"{lora.name} x{lora.scale:g}" for lora in g.loras)
            anchor += f", LoRA fused: {fused}"
        if not g.cfg:
            anchor += ", CFG off"
        conditioner = "ControlNet"
        if g.conditioner == "t2i_adapter":
            conditioner = "T2I-Adapter (once per keyframe per chunk)"
        return (
            [
                f"preset {self.preset}",
                f"generate {g.width}x{g.height} at {g.fps:g} fps, {g.steps} steps {g.scheduler}, "
                f"{g.precision}, {conditioner} on every {g.controlnet_every} frame(s){anchor}",
                f"interpolate {g.fps:g} -> {self.output_fps:g} fps "
                f"({self.interpolation.backend}, x{self.interpolation_factor:.2f})",
                f"upscale {g.width}x{g.height} -> {self.output_width}x{self.output_height} "
                f"(x{self.upscale_factor:.2f})",
                f"micro-batching {'on' if self.batching else 'off'}, "
                f"cache {'on' if self.cache else 'off'}",
            ]
            + self._explain_seamless()
            + self._explain_density()
        )

    def _explain_density(self) -> list[str]:
        if self.keyframe_density.mode == "fixed":
            return []
        if self.schedule is None:
            return [
                "keyframe density by motion: slow chunks generate fewer frames (decided from "
                "the edited skeleton before the GPU runs; an estimate without it assumes none)"
            ]
        return [self.schedule.explain(self.generation.fps)]

    def _explain_seamless(self) -> list[str]:
        if self.noise == "per_chunk" and self.noise_sharing == 1.0 and not self.chunk_overlap:
            return []  # today's plans explain themselves as before
        noise = (
            f"job noise in windows of {self.noise_window} frames"
            if self.noise == "job_windows"
            else "per-chunk noise"
        )
        overlap = (
            f", {self.chunk_overlap} overlap frame(s) per chunk cross-faded at each boundary"
            if self.chunk_overlap
            else ""
        )
        return [f"{noise}, noise sharing {self.noise_sharing:g}{overlap}"]


def long_side_by_aspect(width: int, height: int) -> int:
    """768 for wide or tall frames (short side ~432 at 16:9), 512 for squarer ones."""
    aspect = max(width, height) / min(width, height)
    return 768 if aspect >= 1.5 else 512


def fit_size(width: int, height: int, long_side: int, multiple: int) -> tuple[int, int]:
    """Scale (width, height) so its long side is `long_side`, rounding both to `multiple`."""
    scale = long_side / max(width, height)
    w = max(multiple, round(width * scale / multiple) * multiple)
    h = max(multiple, round(height * scale / multiple) * multiple)
    return w, h


def make_plan(
    preset_name: str,
    source_width: int,
    source_height: int,
    *,
    model_id: str,
    styles: list[str] | None = None,
    output_fps: float | None = None,
    output_width: int | None = None,
    output_height: int | None = None,
    overrides: dict[str, Any] | None = None,
    coherence: Coherence | None = None,
    reference: bool | None = None,
    motion_module_available: bool = False,
) -> Plan:
    """The plan for a source of this size under a preset, with the request's overrides and
    coherence switches, for a job with a reference image or not (`reference`; None: not known,
    as for an estimate). See `coherence_overrides` for how those combine.

    Raises InvalidSettingError (a 422 at submission) for anything the pipeline could not
    deliver, so an accepted job does not fail later on its settings."""
    if preset_name not in PRESETS:
        raise InvalidSettingError(f"unknown preset {preset_name!r}; use one of {list(PRESETS)}")
    overrides = coherence_overrides(
        PRESETS[preset_name], overrides or {}, coherence, reference, motion_module_available
    )
    try:
        preset = Preset.model_validate(
            {**PRESETS[preset_name].model_dump(), **_preset_overrides(overrides)}
        )
    except ValidationError as exc:
        raise InvalidSettingError(f"invalid override: {_first_error(exc)}") from None
    _check_fps("generation_fps", preset.generation_fps)
    _check_fps("output fps", output_fps or preset.output_fps)  # an output_fps override too
    long_side = preset.generation_long_side or long_side_by_aspect(source_width, source_height)
    gen_w, gen_h = fit_size(source_width, source_height, long_side, 8)
    if min(gen_w, gen_h) < GENERATION_SIDE_MIN:
        raise InvalidSettingError(
            f"a {source_width}x{source_height} input is too narrow: generated at {long_side} "
            f"pixels on its long side, its short side would be under {GENERATION_SIDE_MIN}; "
            f"inputs up to {long_side / GENERATION_SIDE_MIN:g}:1 are supported"
        )
    out_w, out_h = _output_size(source_width, source_height, preset, output_width, output_height)
    check_output_size(out_w, out_h, source_width, source_height)
    generation = _generation(preset, model_id, gen_w, gen_h, overrides)
    fields: dict[str, Any] = {
        "preset": preset_name,
        "generation": generation,
        "output_fps": output_fps or preset.output_fps,
        "output_width": out_w,
        "output_height": out_h,
        "batching": preset.batching,
        "cache": preset.cache,
        "keyframe_density": {"mode": preset.keyframe_density},
    }
    if styles is not None:
        fields["styles"] = styles
        MotionEditor(styles)  # raises InvalidSettingError if the retimes slow it down too much
    fields.update({k: v for k, v in overrides.items() if k in _PLAN_FIELDS})
    try:
        fields["decode"] = DecodeSettings(
            fps=preset.generation_fps, width=gen_w, height=gen_h, fit="crop"
        )
        return Plan(**fields)
    except ValidationError as exc:
        raise InvalidSettingError(f"invalid plan: {_first_error(exc)}") from None


def coherence_overrides(
    preset: Preset,
    overrides: dict[str, Any],
    coherence: Coherence | None = None,
    reference: bool | None = None,
    motion_module_available: bool = False,
) -> dict[str, Any]:
    """The request's overrides completed with the job's coherence fields (`anchor`,
    `anchor_pool`, `noise`, `chunk_overlap`, `motion_module`): the one place that decides
    them. Each field is taken from the first of these that says something about it:

    1. an explicit field override (`overrides["anchor"]`, `["anchor_pool"]`, `["noise"]`,
       `["chunk_overlap"]`): the most specific; an explicit `noise` also decides whether the
       chunks are seamless, so `"per_chunk"` leaves no preset overlap behind;
    2. the request's coherence switches (`coherence.anchor`, `coherence.seamless`; None says
       nothing): on uses the preset's pool and overlap, off turns the fields off;
    3. a reference image (`reference` True): it turns the anchor on, with the reference as the
       anchor (`anchor: "reference"`); it never overrides 1 or 2 (an explicit other anchor, or
       the anchor switched off, leaves it without effect);
    4. the preset's default (`Preset.coherence`; its motion module only where the app has one,
       `motion_module_available`, and not under a T2I-Adapter, which it cannot run with).

    When the anchor is on by 2 or 4 and the job has a reference, the reference is the anchor.
    `anchor: "reference"` without a reference image (`reference` False) is refused."""
    resolved = dict(overrides)
    switches = coherence or Coherence()
    preset_coherence = preset.coherence
    if "anchor" not in resolved:
        anchor_on = switches.anchor
        if anchor_on is None:
            anchor_on = bool(reference) or preset_coherence.anchor
        if anchor_on:
            resolved["anchor"] = "reference" if reference else "first_keyframe"
        else:
            resolved["anchor"] = "off"
    resolved.setdefault("anchor_pool", preset_coherence.anchor_pool)
    if reference is False and resolved["anchor"] == "reference":
        raise InvalidSettingError(
            "anchor 'reference' needs a reference image (multipart file 'reference', or "
            "'reference': 's3://...')"
        )
    if "noise" in resolved:
        seamless = resolved["noise"] == "job_windows"
    else:
        seamless = preset_coherence.seamless if switches.seamless is None else switches.seamless
        resolved["noise"] = "job_windows" if seamless else "per_chunk"
    resolved.setdefault("chunk_overlap", preset_coherence.chunk_overlap if seamless else 0)
    if "motion_module" not in resolved:
        module = switches.motion_module
        if module is None:  # the preset's module yields to a T2I-Adapter (they cannot combine)
            adapter = resolved.get("conditioner", preset.conditioner) == "t2i_adapter"
            module = preset_coherence.motion_module and motion_module_available and not adapter
        resolved["motion_module"] = module
    return resolved


def check_output_size(width: int, height: int, source_width: int, source_height: int) -> None:
    """The delivered size must be one the upscaler and encoder take (see serve/schemas.py);
    a side derived from the input's aspect can fall outside even when the given one is in."""
    sides_ok = all(OUTPUT_SIDE_MIN <= side <= OUTPUT_SIDE_MAX for side in (width, height))
    if sides_ok and width * height <= OUTPUT_PIXELS_MAX:
        return
    raise InvalidSettingError(
        f"the output would be {width}x{height} (for a {source_width}x{source_height} input); "
        f"each side must be from {OUTPUT_SIDE_MIN} to {OUTPUT_SIDE_MAX} pixels and the area at "
        f"most {OUTPUT_PIXELS_MAX} pixels: give output width and height explicitly"
    )


def _check_fps(name: str, fps: float) -> None:
    """Output below 1 fps is a slideshow (see serve/schemas.py); generation below 1 fps would
    leave interpolation to invent whole seconds of motion, with output frames per generated
    frame unbounded, and above the output range it buys nothing."""
    if not OUTPUT_FPS_MIN <= fps <= OUTPUT_FPS_MAX:
        raise InvalidSettingError(
            f"{name} must be from {OUTPUT_FPS_MIN:g} to {OUTPUT_FPS_MAX:g} frames per second, "
            f"got {fps:g}"
        )


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ()))
    return f"{where}: {error['msg']}" if where else str(error["msg"])


# Coherence is set through the request's switches or its own fields (`coherence_overrides`);
# keyframe density through the plan's field (a mode, or the whole settings object).
_PRESET_FIELDS = set(Preset.model_fields) - {"coherence", "keyframe_density"}
_PLAN_FIELDS = {"chunk_frames", "noise", "noise_sharing", "noise_window", "chunk_overlap",
                "keyframe_density"}  # fmt: skip
_GENERATION_FIELDS = {"control_guidance_start", "control_guidance_end",
                      "controlnet_conditioning_scale", "anchor", "anchor_pool",
                      "motion_module", "loras"}  # fmt: skip


def _preset_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - _PRESET_FIELDS - _GENERATION_FIELDS - _PLAN_FIELDS
    if unknown:
        allowed = sorted(_PRESET_FIELDS | _GENERATION_FIELDS | _PLAN_FIELDS)
        raise InvalidSettingError(f"unknown override(s) {sorted(unknown)}; allowed: {allowed}")
    return {k: v for k, v in overrides.items() if k in _PRESET_FIELDS}


def _generation(preset: Preset, model_id: str, width: int, height: int, overrides: dict):
    extra = {k: v for k, v in overrides.items() if k in _GENERATION_FIELDS}
    try:
        return GenerationSettings(
            model_id=model_id,
            width=width,
            height=height,
            steps=preset.steps,
            scheduler=preset.scheduler,
            precision=preset.precision,
            fps=preset.generation_fps,
            controlnet_every=preset.controlnet_every,
            conditioner=preset.conditioner,
            guidance_scale=preset.guidance_scale,
            **extra,
        )
    except ValidationError as exc:
        raise InvalidSettingError(f"invalid generation setting: {exc.errors()[0]['msg']}") from None


def _output_size(source_w, source_h, preset: Preset, width, height) -> tuple[int, int]:
    if width and height:
        return width + width % 2, height + height % 2
    if width:
        return width + width % 2, max(2, round(width * source_h / source_w / 2) * 2)
    if height:
        return max(2, round(height * source_w / source_h / 2) * 2), height + height % 2
    return fit_size(source_w, source_h, preset.output_long_side, 2)
