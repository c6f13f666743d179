"""Diffusion stage schemas: the batch key (`GenerationSettings`), the per-chunk request and result,
and the engine's configuration, with the bounds users are told about.

Decisions (the why):
- Batch key: every `GenerationSettings` field is a key field (model, size, steps, scheduler,
  precision, fps, and also guidance scale, controlnet_every, control window and conditioning
  scale, because they decide the shape of the work: CFG doubles a forward, the keyframes choose
  which frames reach ControlNet). Only the `ChunkRequest` fields vary within a batch: prompts,
  seeds, noise sharing and mode, first frame, control images and anchors.
- Anchor attention (`anchor`, `anchor_pool`) is a key field too (it adds an anchor pass and widens
  every frame's self-attention), but only when it is on: with `anchor="off"` both fields are left
  out of the settings' serialisation, so batch keys, cache keys and stored plans of requests
  without the anchor are what they were before the fields existed.
- The motion module (`motion_module`) is a key field for the same reason (another model runs:
  UNetMotionModel, and every chunk becomes one context window), and is likewise left out of
  the serialisation while off, so existing keys do not change.
- LoRAs (`loras`, see lora.py) are a key field the same way: fused into the UNet weights for the
  batch, so requests with different sets never share a batch; an empty set is left out of the
  serialisation, so keys without LoRAs are unchanged. A fused LoRA adds no work units.
- The conditioner (`conditioner`: ControlNet or the T2I-Adapter, see t2i_adapter.py) is a key
  field (another model runs, and the adapter's work has another shape), left out of the
  serialisation while it is ControlNet (the default), so existing keys do not change.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from deployments.diffusion.lora import LoraRef, LoraSource, canonical_loras
from deployments.diffusion.work_units import VAE_FACTOR, ModelWeights, WorkUnits, cfg_enabled
from deployments.errors import InvalidSettingError
from deployments.model_loading import ModelSource

# Part of every generated chunk's cache key: bump when the same request would give other frames.
DIFFUSION_CODE_VERSION = "diffusion-1"

SchedulerName = Literal["dpmpp_2m", "unipc", "euler_a", "lcm", "tcd"]
FEW_STEP_SCHEDULERS = ("lcm", "tcd")  # consistency samplers: need a few-step model or LoRA
Precision = Literal["fp16", "bf16", "fp32"]
# Where a job's anchor keyframe takes its look from: frame 0 alone, or the reference image.
AnchorMode = Literal["off", "first_keyframe", "reference"]
ANCHOR_FIELDS = ("anchor", "anchor_pool")
MAX_ANCHOR_POOL = 4
# Where a frame's own noise comes from (see noise.py): its chunk position, or the job's frame
# index in one noise sequence (seamless chunks).
NoiseMode = Literal["per_chunk", "job_windows"]
# What turns the pose maps into the UNet's conditioning (see t2i_adapter.py).
Conditioner = Literal["controlnet", "t2i_adapter"]
MAX_NOISE_WINDOW = 1024

MIN_STEPS, MAX_STEPS = 1, 150
MAX_LCM_STEPS = 50  # LCMScheduler's (and TCDScheduler's) default original_inference_steps
# Structural bounds; what a replica can run is bounded by EngineConfig.max_pixels (VRAM).
MIN_SIDE, MAX_SIDE = 64, 8192
LATENT_CHANNELS = 4
MAX_GUIDANCE_SCALE = 30.0
MAX_CONDITIONING_SCALE = 5.0


class GenerationSettings(BaseModel):
    """The batch key: requests run together only when all of these are equal."""

    model_config = ConfigDict(frozen=True)

    model_id: str = Field(
        min_length=1,
        max_length=200,
        description="Name of the base model + ControlNet weights a replica serves.",
    )
    width: int = Field(default=512, description="Generated frame width (multiple of 8).")
    height: int = Field(default=512, description="Generated frame height (multiple of 8).")
    steps: int = Field(default=20, description=f"Denoising steps ({MIN_STEPS}..{MAX_STEPS}).")
    scheduler: SchedulerName = Field(
        default="dpmpp_2m",
        description="dpmpp_2m (DPM++ 2M), unipc (UniPC), euler_a (Euler ancestral), lcm (LCM), "
        "tcd (TCD); lcm and tcd need a few-step model or LoRA.",
    )
    precision: Precision = Field(
        default="fp16", description="Model dtype on CUDA; a CPU always runs fp32."
    )
    fps: float = Field(default=12.0, gt=0, le=120, description="Generation frame rate.")
    guidance_scale: float = Field(
        default=7.5, description="Classifier-free guidance scale; <= 1 turns CFG off."
    )
    controlnet_every: int = Field(
        default=4,
        description="ControlNet (or the T2I-Adapter) runs on every K-th frame (and the chunk's "
        "last frame); the frames between get interpolated residuals (features). 1 = every "
        "frame.",
    )
    control_guidance_start: float = Field(
        default=0.0,
        description="Fraction of the steps after which the conditioner (ControlNet or "
        "T2I-Adapter) starts to apply.",
    )
    control_guidance_end: float = Field(
        default=1.0,
        description="Fraction of the steps after which the conditioner stops applying.",
    )
    controlnet_conditioning_scale: float = Field(
        default=1.0,
        description="Multiplier of the conditioner's output: the ControlNet residuals, or the "
        "T2I-Adapter features (diffusers' adapter_conditioning_scale).",
    )
    conditioner: Conditioner = Field(
        default="controlnet",
        description="What turns the pose maps into conditioning. 'controlnet': ControlNet on "
        "the keyframes at every step in the control window (twice with CFG). 't2i_adapter': a "
        "T2I-Adapter (openpose) once per keyframe per chunk, its features reused at every step "
        "in the control window and interpolated between keyframes like ControlNet's residuals: "
        "far cheaper (about 0.075 UNet evaluations per keyframe against 0.35 per keyframe and "
        "step for ControlNet, SD 1.5), and looser pose adherence. Needs a configured adapter; "
        "not with the motion module.",
    )
    anchor: AnchorMode = Field(
        default="off",
        description="Anchor attention: every frame's UNet self-attention also attends to the "
        "keys/values of one anchor per job, so identity holds across chunks. The anchor is the "
        "job's anchor keyframe (its frame 0, generated once per job before the chunks: the "
        "anchor-frame preview), VAE-encoded once per chunk and noised to each step with noise "
        "fixed by the seed (one extra UNet row per chunk and step, no ControlNet). "
        "'first_keyframe': the keyframe is frame 0 generated alone. 'reference': the keyframe "
        "itself anchors on the job's reference image. 'off': none (and no extra work).",
    )
    motion_module: bool = Field(
        default=False,
        description="AnimateDiff motion module: the UNet runs as UNetMotionModel with the "
        "replica's motion adapter and each chunk is one context window (its frames attend to "
        "each other along time), for smoother motion within a chunk. Costs about +38% UNet work "
        "per frame at 16 frames per chunk (SD 1.5); needs a configured motion module.",
    )
    anchor_pool: int = Field(
        default=2,
        description=f"The anchor's keys/values are averaged over pool x pool token blocks "
        f"(1..{MAX_ANCHOR_POOL}): the wider attention costs 1/pool^2 of a full-size anchor's.",
    )

    loras: tuple[LoraRef, ...] = Field(
        default=(),
        description="LoRA adapters fused into the UNet weights for this batch (sorted by name; "
        "empty: the base model). Omitted from the serialisation when empty.",
    )

    @model_validator(mode="after")
    def _check(self) -> GenerationSettings:
        check_settings(self)
        return self

    @field_validator("loras")
    @classmethod
    def _canonical_loras(cls, loras: tuple[LoraRef, ...]) -> tuple[LoraRef, ...]:
        return canonical_loras(loras)

    @model_serializer(mode="wrap")
    def _optional_fields_only_when_on(
        self, handler: SerializerFunctionWrapHandler
    ) -> dict[str, Any]:
        """Leave the anchor fields out while the anchor is off, motion_module while off, the
        LoRAs while there are none and the conditioner while it is ControlNet (see the
        module's decisions)."""
        data = handler(self)
        if self.anchor == "off":
            for name in ANCHOR_FIELDS:
                data.pop(name, None)
        if not self.motion_module:
            data.pop("motion_module", None)
        if not self.loras:
            data.pop("loras", None)
        if self.conditioner == "controlnet":
            data.pop("conditioner", None)
        return data

    @property
    def latent_height(self) -> int:
        return self.height // VAE_FACTOR

    @property
    def latent_width(self) -> int:
        return self.width // VAE_FACTOR

    @property
    def cfg(self) -> bool:
        return cfg_enabled(self.guidance_scale)

    def batch_key(self) -> str:
        """A stable id for this key, usable as a Ray Serve multiplexed model id.

        A readable prefix (model, size, steps, scheduler, precision) and a hash of all fields.
        """
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model_id)[:48]
        size = f"{self.width}x{self.height}"
        return f"{model}-{size}-{self.steps}-{self.scheduler}-{self.precision}-{digest}"


def check_settings(settings: GenerationSettings) -> None:
    """Raise InvalidSettingError, in words a user understands, for out-of-range settings."""
    for name in ("width", "height"):
        side = getattr(settings, name)
        if side % VAE_FACTOR or not MIN_SIDE <= side <= MAX_SIDE:
            raise InvalidSettingError(
                f"{name} must be a multiple of {VAE_FACTOR} between {MIN_SIDE} and {MAX_SIDE}, "
                f"got {side}"
            )
    if not MIN_STEPS <= settings.steps <= MAX_STEPS:
        raise InvalidSettingError(
            f"steps must be between {MIN_STEPS} and {MAX_STEPS}, got {settings.steps}"
        )
    if settings.scheduler in FEW_STEP_SCHEDULERS and settings.steps > MAX_LCM_STEPS:
        raise InvalidSettingError(
            f"the {settings.scheduler} scheduler supports at most {MAX_LCM_STEPS} steps, "
            f"got {settings.steps}"
        )
    if not 0.0 <= settings.guidance_scale <= MAX_GUIDANCE_SCALE:
        raise InvalidSettingError(
            f"guidance_scale must be between 0 and {MAX_GUIDANCE_SCALE}, "
            f"got {settings.guidance_scale}"
        )
    if settings.controlnet_every < 1:
        raise InvalidSettingError(
            f"controlnet_every must be 1 or more, got {settings.controlnet_every}"
        )
    start, end = settings.control_guidance_start, settings.control_guidance_end
    if not 0.0 <= start < end <= 1.0:
        raise InvalidSettingError(
            "control_guidance_start and control_guidance_end must satisfy "
            f"0 <= start < end <= 1, got start={start}, end={end}"
        )
    if not 0.0 <= settings.controlnet_conditioning_scale <= MAX_CONDITIONING_SCALE:
        raise InvalidSettingError(
            f"controlnet_conditioning_scale must be between 0 and {MAX_CONDITIONING_SCALE}, "
            f"got {settings.controlnet_conditioning_scale}"
        )
    if settings.conditioner == "t2i_adapter" and settings.motion_module:
        raise InvalidSettingError(
            "the T2I-Adapter cannot run with the motion module (diffusers' UNetMotionModel "
            "takes no adapter features): turn the motion module off or use conditioner "
            "'controlnet'"
        )
    if not 1 <= settings.anchor_pool <= MAX_ANCHOR_POOL:
        raise InvalidSettingError(
            f"anchor_pool must be between 1 and {MAX_ANCHOR_POOL}, got {settings.anchor_pool}"
        )


class AnchorInput(BaseModel):
    """The image a chunk's anchor is made from, the same for every chunk of a job, so every
    chunk (in any batch, on any replica) computes the same anchor keys/values: the job's anchor
    keyframe (its frame 0 generated once, alone; see `keyframe_settings`), or, for the
    keyframe's own generation with anchor 'reference', the user's reference image. The chunk
    VAE-encodes it and, at each step, noises it to that step's timestep with one noise drawn
    from `seed` (no trajectory, no pose map, no ControlNet)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    seed: int = Field(ge=0, lt=2**63, description="The job's seed: the anchor's noise.")
    image: np.ndarray = Field(
        description="The anchor image at the generation size, uint8 RGB (height, width, 3)."
    )


def keyframe_settings(settings: GenerationSettings) -> GenerationSettings:
    """The settings of a job's anchor keyframe: its frame 0, generated once and alone before
    the chunks, which then anchor on it. With a reference image the keyframe itself anchors on
    the reference (so the reference's look reaches every chunk through it); otherwise it is
    plain frame 0 (no anchor: nothing to anchor on yet)."""
    if settings.anchor == "reference":
        return settings
    return settings.model_copy(update={"anchor": "off"})


class ChunkRequest(BaseModel):
    """One chunk of a job's frames: its own prompts, seed and pose maps; settings = batch key."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    job_id: str = Field(description="The job this chunk belongs to.")
    chunk_index: int = Field(ge=0, description="Position of the chunk in its job.")
    prompt: str = Field(description="What the frames should show.")
    negative_prompt: str = Field(default="", description="What to steer away from (with CFG).")
    seed: int = Field(
        ge=0,
        lt=2**63,
        description="The job's seed: the same for all chunks, so their shared noise is the same.",
    )
    noise_sharing: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of the initial noise common to all frames (1 = identical noise, the "
        "most temporally stable; 0 = each frame's own noise only).",
    )
    noise: NoiseMode = Field(
        default="per_chunk",
        description="Each frame's own noise (the 1 - noise_sharing part, and the step noise of "
        "ancestral schedulers): 'per_chunk' draws it per (seed, chunk, frame in chunk), "
        "independent frame to frame; 'job_windows' reads it from the job's one noise sequence at "
        "the frame's index in the job (first_frame + i), drifting across windows of "
        "noise_window frames, so a frame gets the same noise in any chunk that generates it.",
    )
    noise_window: int = Field(
        default=16,
        ge=1,
        le=MAX_NOISE_WINDOW,
        description="job_windows: frames from one knot of the noise sequence to the next.",
    )
    first_frame: int = Field(
        default=0,
        ge=0,
        description="Index in the job's generated frames of this request's first frame "
        "(job_windows noise is indexed by it; with an overlap it is before the chunk's span).",
    )
    control_images: np.ndarray = Field(
        description="Pose maps for the conditioner: uint8 RGB, shape (frames, height, width, 3)."
    )
    settings: GenerationSettings = Field(description="The batch key fields.")
    anchor: AnchorInput | None = Field(
        default=None,
        description="The job's anchor; required when settings.anchor is on, refused when off.",
    )

    @property
    def frames(self) -> int:
        return int(self.control_images.shape[0])


class ChunkResult(BaseModel):
    """Frames of one chunk with what they cost."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    job_id: str = Field(description="The request's job.")
    chunk_index: int = Field(description="The request's chunk index.")
    frames: np.ndarray = Field(
        description="uint8 RGB (frames, height, width, 3); float32 in [0, 1] on request."
    )
    work_units: WorkUnits = Field(description="Work counted in the loop for this chunk's frames.")
    model_weights: ModelWeights = Field(
        default_factory=ModelWeights,
        description="The FLOP formulas the work units were weighed with (the engine's loaded "
        "models'): the cost model predicts with these, never re-deriving them from rounded units.",
    )
    wall_seconds: float = Field(description="Wall time of the whole batch call.")
    device_seconds: float = Field(
        description="This chunk's share (by work units) of the batch's model compute time."
    )
    load_seconds: float = Field(
        default=0.0,
        description="This chunk's share (by work units) of the model load time its batch paid "
        "(cold start), else 0: the shares of a batch sum to the load time once.",
    )
    device: str = Field(description="Device that ran the models, e.g. 'cuda:0' or 'cpu'.")
    precision: Precision = Field(description="Precision actually used.")
    batch_requests: int = Field(description="Requests in the batch this chunk ran in.")
    batch_frames: int = Field(description="Frames in the batch this chunk ran in.")
    notes: list[str] = Field(default_factory=list, description="E.g. precision overrides.")


class EngineConfig(BaseModel):
    """One diffusion engine: which weights, where, and how much goes through one forward."""

    model_id: str = Field(
        min_length=1, description="The name requests use for these weights (GenerationSettings)."
    )
    base: ModelSource = Field(description="SD 1.x base model (UNet, VAE, text encoder, ...).")
    controlnet: ModelSource = Field(description="ControlNet (e.g. OpenPose) weights.")
    motion_module: ModelSource | None = Field(
        default=None,
        description="AnimateDiff motion adapter (diffusers MotionAdapter) for requests with "
        "settings.motion_module; None = not configured (such requests are refused).",
    )
    t2i_adapter: ModelSource | None = Field(
        default=None,
        description="T2I-Adapter (diffusers T2IAdapter, openpose) for requests with "
        "settings.conditioner 't2i_adapter'; None = not configured (such requests are refused).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="'auto' takes CUDA when available, else the CPU."
    )
    precision: Precision = Field(
        default="fp16",
        description="dtype the weights are loaded in on CUDA; a batch asking for another "
        "precision casts the models (fp32 from fp16 weights is only an upcast).",
    )
    max_frames_per_forward: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Frames per UNet/ControlNet/VAE forward (the tensor holds twice as many with "
        "CFG); bounds activation memory.",
    )
    max_frames_per_request: int = Field(
        default=64, ge=1, le=4096, description="Largest chunk a request may carry."
    )
    max_pixels: int = Field(
        default=1024 * 1024,
        ge=64 * 64,
        description="Largest frame (width x height) this engine generates; bounds VRAM.",
    )
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "motionserve" / "models",
        description="Where s3:// model sources are downloaded (once), and where the models' "
        "fitted FLOP formulas are kept (flops-*.json, one per architecture).",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint for s3:// sources (MinIO, moto); None = AWS."
    )
    loras: dict[str, LoraSource] = Field(
        default_factory=dict,
        description="LoRAs this engine may fuse, by the name requests use (GenerationSettings."
        "loras); each file is read, checked against the UNet and hashed on first use.",
    )
    max_loaded_loras: int = Field(
        default=8,
        ge=1,
        le=64,
        description="LoRA adapters kept loaded (unfused) in the UNet between batches; the least "
        "recently used one is dropped beyond this.",
    )
