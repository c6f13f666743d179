"""Diffusion stage: SD 1.5 + ControlNet on chunks of frames, with counted work units.

The denoising loop is written here on diffusers' modules (UNet2DConditionModel, ControlNetModel,
AutoencoderKL, schedulers) rather than a pipeline class, so that the GPU savings are exact and
counted as they happen. With `controlnet_every=1` it computes what diffusers'
StableDiffusionControlNetPipeline computes (a test holds it to that).

Decisions (the why):
- Keyframe ControlNet. ControlNet runs on every K-th frame of a chunk *and on the chunk's last
  frame*, so every other frame lies between two keyframes and its residuals (each down-block
  residual and the mid-block residual) are linearly interpolated at every step; nothing is
  extrapolated or held. The extra keyframe costs at most one ControlNet evaluation (two with
  CFG) per chunk per step. A keyframe's residuals are exactly its own evaluation (lerp weight 0).
- Outside `control_guidance_start/end` ControlNet is not evaluated at all (the pipeline
  evaluates it and multiplies by 0; adding zero residuals changes nothing, so skipping it is
  exact and saves the work).
- Classifier-free guidance runs only when guidance_scale > 1; then UNet and ControlNet see each
  frame twice (unconditional and conditional halves), and both are counted twice.
- Batch key: every `GenerationSettings` field is a key field (model, size, steps, scheduler,
  precision, fps, and also guidance scale, controlnet_every, control window and conditioning
  scale, because they decide the shape of the work: CFG doubles a forward, the keyframes choose
  which frames reach ControlNet). Only the `ChunkRequest` fields vary within a batch: prompts,
  seeds, noise sharing and control images.
- Temporal consistency: the initial noise is one tensor drawn from the request's seed (the job's
  seed, the same for all its chunks) and broadcast to all frames, optionally mixed with
  per-frame noise: sqrt(s) * shared + sqrt(1 - s) * per_frame, s = noise_sharing, which keeps
  unit variance. Per-frame noise, and the step noise of ancestral/LCM schedulers, come from one
  generator per frame keyed by (seed, chunk index, frame index), so a frame's result does not
  depend on what else shares its batch.
- Precision: fp16/bf16 on CUDA; a CPU always runs fp32 (and the result says so).
- Text encoding (one per distinct prompt per batch, about 2% of one UNet evaluation at SD 1.5
  size) is not counted in work units.

This module imports torch lazily, so `serve/cost.py` can use the work-unit formula (pure Python)
without loading torch.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import inspect
import json
import math
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.errors import InvalidSettingError
from deployments.model_loading import ModelSource

if TYPE_CHECKING:
    import torch

DIFFUSION_CODE_VERSION = "diffusion-1"

SchedulerName = Literal["dpmpp_2m", "unipc", "euler_a", "lcm"]
Precision = Literal["fp16", "bf16", "fp32"]

MIN_STEPS, MAX_STEPS = 1, 150
MAX_LCM_STEPS = 50  # LCMScheduler's default original_inference_steps
# Structural bounds; what a replica can run is bounded by EngineConfig.max_pixels (VRAM).
MIN_SIDE, MAX_SIDE = 64, 8192
VAE_FACTOR = 8  # SD's VAE downsamples each side by 8
LATENT_CHANNELS = 4
REFERENCE_LATENT_AREA = 64 * 64  # 512x512 pixels: one work unit per UNet evaluation
MAX_GUIDANCE_SCALE = 30.0
MAX_CONDITIONING_SCALE = 5.0


# --- Settings and requests ----------------------------------------------------------------------


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
        description="dpmpp_2m (DPM++ 2M), unipc (UniPC), euler_a (Euler ancestral), lcm (LCM).",
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
        description="ControlNet runs on every K-th frame (and the chunk's last frame); the "
        "frames between get interpolated residuals. 1 = every frame.",
    )
    control_guidance_start: float = Field(
        default=0.0, description="Fraction of the steps after which ControlNet starts to apply."
    )
    control_guidance_end: float = Field(
        default=1.0, description="Fraction of the steps after which ControlNet stops applying."
    )
    controlnet_conditioning_scale: float = Field(
        default=1.0, description="Multiplier of the ControlNet residuals."
    )

    @model_validator(mode="after")
    def _check(self) -> GenerationSettings:
        check_settings(self)
        return self

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
    if settings.scheduler == "lcm" and settings.steps > MAX_LCM_STEPS:
        raise InvalidSettingError(
            f"the lcm scheduler supports at most {MAX_LCM_STEPS} steps, got {settings.steps}"
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
        "most temporally stable; 0 = independent noise per frame).",
    )
    control_images: np.ndarray = Field(
        description="Pose maps for ControlNet: uint8 RGB, shape (frames, height, width, 3)."
    )
    settings: GenerationSettings = Field(description="The batch key fields.")

    @property
    def frames(self) -> int:
        return int(self.control_images.shape[0])


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


# --- The work-unit formula (pure; the loop below counts the same things as it runs) -------------


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


def measure_model_weights(unet: Any, controlnet: Any, vae: Any) -> ModelWeights:
    """`ModelWeights` of loaded (or meta) models: parameter ratio, and VAE/UNet FLOP ratio.

    FLOPs are counted with torch's FlopCounterMode on meta-device copies built from the models'
    configs at 512x512, so nothing is computed and no memory is used.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def parameters(module: Any) -> int:
        return sum(p.numel() for p in module.parameters())

    def flops(run: Any) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            run()
        return counter.get_total_flops()

    with torch.device("meta"):
        unet_meta = type(unet).from_config(unet.config)
        vae_meta = type(vae).from_config(vae.config)
        side = int(math.sqrt(REFERENCE_LATENT_AREA))
        latents = torch.zeros(1, unet.config.in_channels, side, side)
        text = torch.zeros(1, 77, unet.config.cross_attention_dim)
        unet_flops = flops(lambda: unet_meta(latents, 10, encoder_hidden_states=text))
        vae_flops = flops(lambda: vae_meta.decode(latents[:, : vae.config.latent_channels]))
    unet_parameters, controlnet_parameters = parameters(unet), parameters(controlnet)
    return ModelWeights(
        controlnet_weight=controlnet_parameters / unet_parameters,
        vae_weight=vae_flops / unet_flops,
        unet_parameters=unet_parameters,
        controlnet_parameters=controlnet_parameters,
    )


# --- Results and engine config ------------------------------------------------------------------


class ChunkResult(BaseModel):
    """Frames of one chunk with what they cost."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    job_id: str = Field(description="The request's job.")
    chunk_index: int = Field(description="The request's chunk index.")
    frames: np.ndarray = Field(
        description="uint8 RGB (frames, height, width, 3); float32 in [0, 1] on request."
    )
    work_units: WorkUnits = Field(description="Work counted in the loop for this chunk's frames.")
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
        description="Where s3:// model sources are downloaded (once).",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint for s3:// sources (MinIO, moto); None = AWS."
    )


def resolve_precision(requested: Precision, device_type: str) -> tuple[Any, Precision, str | None]:
    """(torch dtype, precision used, note) for a request on a device type."""
    import torch

    if device_type != "cuda":
        note = None if requested == "fp32" else f"{requested} requested; the CPU runs fp32"
        return torch.float32, "fp32", note
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        return torch.float16, "fp16", "bf16 is not supported by this GPU; ran fp16"
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    return dtypes[requested], requested, None


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from parts, stable across processes and platforms."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _frame_seeds(request: ChunkRequest, purpose: str) -> list[int]:
    return [
        derive_seed(request.seed, request.chunk_index, frame, purpose)
        for frame in range(request.frames)
    ]


def initial_latents(request: ChunkRequest) -> torch.Tensor:
    """Unscaled initial noise (frames, 4, h/8, w/8) of a request, float32 on CPU.

    One tensor from the seed shared by all frames, mixed with per-frame noise by
    `noise_sharing`; it depends on the request alone, never on its batch.
    """
    import torch

    settings = request.settings
    shape = (1, LATENT_CHANNELS, settings.latent_height, settings.latent_width)
    shared = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed))
    sharing = request.noise_sharing
    if sharing == 1.0:
        return shared.expand(request.frames, -1, -1, -1).clone()
    own = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        for seed in _frame_seeds(request, "init")
    ]
    return math.sqrt(sharing) * shared + math.sqrt(1.0 - sharing) * torch.cat(own)


def step_generators(request: ChunkRequest) -> list[torch.Generator]:
    """One CPU generator per frame for the step noise of ancestral and LCM schedulers."""
    import torch

    return [torch.Generator().manual_seed(seed) for seed in _frame_seeds(request, "step")]


def build_scheduler(name: SchedulerName, config: dict[str, Any]) -> Any:
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        LCMScheduler,
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
    }
    return classes[name].from_config(config)


# --- The engine ---------------------------------------------------------------------------------


def keyframe_blend(frames: int, every: int) -> list[tuple[int, int, float]]:
    """For each frame: (left keyframe slot, right keyframe slot, weight of the right one).

    A keyframe blends with itself at weight 0, so it gets exactly its own residuals (lerp
    at weight 1 would round: a + (b - a) is not always b).
    """
    keys = keyframe_indices(frames, every)
    blend = []
    for frame in range(frames):
        slot = bisect.bisect_right(keys, frame) - 1
        left = keys[slot]
        if left == frame:
            blend.append((slot, slot, 0.0))
        else:
            right = keys[slot + 1]
            blend.append((slot, slot + 1, (frame - left) / (right - left)))
    return blend


class _Layout:
    """Where each frame of a batch comes from and which keyframes its residuals blend."""

    def __init__(self, requests: Sequence[ChunkRequest], every: int):
        owner, keyframes, left, right, weight = [], [], [], [], []
        start = 0
        for index, request in enumerate(requests):
            first = len(keyframes)
            keyframes.extend(start + k for k in keyframe_indices(request.frames, every))
            for a, b, w in keyframe_blend(request.frames, every):
                left.append(first + a)
                right.append(first + b)
                weight.append(w)
            owner.extend([index] * request.frames)
            start += request.frames
        self.owner = np.asarray(owner)
        self.keyframes = keyframes
        self.keyframe_owner = self.owner[keyframes]
        self.left, self.right, self.weight = left, right, weight
        self.frames = start


class DiffusionEngine:
    """SD + ControlNet on batches of chunk requests that share one batch key (Ray-free).

    Lifecycle: `load()` (or lazily on the first `generate`), `generate(requests)`, `unload()`.
    Thread-safe: calls are serialised by a lock, so a server may call from worker threads.
    """

    def __init__(self, config: EngineConfig, *, s3_client: Any = None):
        self.config = config
        self._s3_client = s3_client
        self._lock = threading.RLock()
        self._modules: Any = None  # SDComponents while loaded
        self._device: Any = None
        self._dtype: Any = None
        self._weights: ModelWeights | None = None
        self.last_load_seconds = 0.0

    # - lifecycle -

    @property
    def is_loaded(self) -> bool:
        return self._modules is not None

    @property
    def device(self) -> str | None:
        return str(self._device) if self._device is not None else None

    @property
    def model_weights(self) -> ModelWeights:
        """Measured weights of the loaded models (loads them if needed)."""
        with self._lock:
            self.load()
            assert self._weights is not None
            return self._weights

    def load(self) -> float:
        """Load the models onto the device; returns the seconds it took (0 when loaded)."""
        from deployments.model_loading import load_sd_components

        with self._lock:
            if self.is_loaded:
                return 0.0
            started = time.perf_counter()
            device = self._resolve_device()
            dtype, _, _ = resolve_precision(self.config.precision, device.type)
            modules = load_sd_components(
                self.config.base,
                self.config.controlnet,
                dtype=dtype,
                cache_dir=self.config.cache_dir,
                s3_client=self._s3_client,
                s3_endpoint_url=self.config.s3_endpoint_url,
            )
            if modules.unet.config.time_cond_proj_dim is not None:
                raise ValueError(
                    "UNets with a guidance embedding (LCM-distilled) are not supported; "
                    "use an SD 1.x UNet (LCM-LoRA works with the lcm scheduler)"
                )
            for name in ("unet", "controlnet", "vae", "text_encoder"):
                getattr(modules, name).to(device)
            self._weights = measure_model_weights(modules.unet, modules.controlnet, modules.vae)
            self._modules, self._device, self._dtype = modules, device, dtype
            self.last_load_seconds = time.perf_counter() - started
            return self.last_load_seconds

    def unload(self) -> None:
        """Drop the models and free their memory; the next `generate` loads them again."""
        with self._lock:
            if not self.is_loaded:
                return
            was_cuda = self._device.type == "cuda"
            self._modules = None
            gc.collect()
            if was_cuda:
                import torch

                torch.cuda.empty_cache()

    def _resolve_device(self) -> Any:
        import torch

        wanted = self.config.device
        if wanted == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was configured but CUDA is not available")
        if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _ensure_dtype(self, dtype: Any) -> None:
        if dtype == self._dtype:
            return
        for name in ("unet", "controlnet", "vae", "text_encoder"):
            getattr(self._modules, name).to(dtype=dtype)
        self._dtype = dtype

    # - inputs -

    def check_inputs(self, requests: Sequence[ChunkRequest]) -> None:
        """Raise ValueError for a malformed batch, InvalidSettingError for bad user input."""
        if not requests:
            raise ValueError("generate needs at least one request")
        key = requests[0].settings.batch_key()
        for request in requests:
            if request.settings.batch_key() != key:
                raise ValueError(
                    "all requests of a batch must share one batch key: "
                    f"{request.settings.batch_key()} != {key}"
                )
        settings = requests[0].settings
        if settings.model_id != self.config.model_id:
            raise InvalidSettingError(
                f"model '{settings.model_id}' is not served here (this engine serves "
                f"'{self.config.model_id}')"
            )
        if settings.width * settings.height > self.config.max_pixels:
            raise InvalidSettingError(
                f"{settings.width}x{settings.height} frames exceed this engine's limit of "
                f"{self.config.max_pixels} pixels per frame"
            )
        for request in requests:
            self._check_control_images(request)

    def _check_control_images(self, request: ChunkRequest) -> None:
        images, settings = request.control_images, request.settings
        where = f"job {request.job_id} chunk {request.chunk_index}"
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise InvalidSettingError(
                f"{where}: control images must be a uint8 array of shape (frames, height, width, 3)"
            )
        frames, height, width, channels = images.shape
        if channels != 3:
            raise InvalidSettingError(
                f"{where}: control images must be RGB, got {channels} channels"
            )
        if (height, width) != (settings.height, settings.width):
            raise InvalidSettingError(
                f"{where}: control images are {width}x{height} but the settings ask for "
                f"{settings.width}x{settings.height}"
            )
        if not 1 <= frames <= self.config.max_frames_per_request:
            raise InvalidSettingError(
                f"{where}: a chunk must have 1 to {self.config.max_frames_per_request} frames, "
                f"got {frames}"
            )

    # - generation -

    def generate(
        self,
        requests: Sequence[ChunkRequest],
        *,
        frames_dtype: Literal["uint8", "float32"] = "uint8",
    ) -> list[ChunkResult]:
        """Run a batch of same-key requests; one result per request, in order.

        All frames of all requests go through the models together, in forwards of at most
        `max_frames_per_forward` frames. `frames_dtype='float32'` returns images in [0, 1]
        before quantisation (for exactness tests and float post-processing).
        """
        import torch

        started = time.perf_counter()
        with self._lock:
            self.check_inputs(requests)
            load_seconds = self.load()
            settings = requests[0].settings
            dtype, precision, note = resolve_precision(settings.precision, self._device.type)
            self._ensure_dtype(dtype)
            layout = _Layout(requests, settings.controlnet_every)
            truncations = [self.truncation_notes(r) for r in requests]  # needs the tokenizer
            counts = np.zeros((len(requests), 3), dtype=np.int64)  # unet, controlnet, vae
            with torch.inference_mode():
                self._synchronize()
                compute_started = time.perf_counter()
                images = self._run(requests, settings, layout, counts)
                self._synchronize()
                compute_seconds = time.perf_counter() - compute_started
                frames = self._to_numpy(images, frames_dtype)
        wall_seconds = time.perf_counter() - started
        results = self._results(
            requests,
            frames,
            counts,
            wall_seconds=wall_seconds,
            compute_seconds=compute_seconds,
            load_seconds=load_seconds,
            precision=precision,
            notes=[note] if note else [],
        )
        for notes, result in zip(truncations, results, strict=True):
            result.notes.extend(notes)
        return results

    def truncation_notes(self, request: ChunkRequest) -> list[str]:
        """CLIP reads at most 77 tokens: longer prompts are cut, and the result says so.
        Call with the engine loaded and locked (it reads the tokenizer)."""
        tokenizer = self._modules.tokenizer
        limit = tokenizer.model_max_length
        notes = []
        for name, text in (
            ("prompt", request.prompt),
            ("negative prompt", request.negative_prompt),
        ):
            given = len(tokenizer(text, truncation=False).input_ids)
            if given > limit:
                notes.append(f"{name} truncated to {limit} tokens ({given} given)")
        return notes

    def _synchronize(self) -> None:
        if self._device.type == "cuda":
            import torch

            torch.cuda.synchronize(self._device)

    def _run(
        self,
        requests: Sequence[ChunkRequest],
        settings: GenerationSettings,
        layout: _Layout,
        counts: np.ndarray,
    ) -> torch.Tensor:
        """Encode prompts, denoise all frames, decode; returns float images in [0, 1], NCHW."""
        import torch

        modules, device, dtype = self._modules, self._device, self._dtype
        cond, uncond = self._encode_prompts(requests, settings.cfg)
        control = torch.cat(
            [torch.from_numpy(r.control_images).permute(0, 3, 1, 2).contiguous() for r in requests]
        )
        control = (control.to(torch.float32) / 255.0).to(device=device, dtype=dtype)

        scheduler = build_scheduler(settings.scheduler, modules.scheduler_config)
        scheduler.set_timesteps(settings.steps, device=device)
        timesteps = scheduler.timesteps
        latents = torch.cat([initial_latents(r) for r in requests])
        latents = latents.to(device=device, dtype=dtype) * scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(scheduler, requests)
        active = controlnet_active_steps(
            len(timesteps), settings.control_guidance_start, settings.control_guidance_end
        )
        for index, timestep in enumerate(timesteps):
            model_input = scheduler.scale_model_input(latents, timestep)
            residuals = None
            if active[index]:
                residuals = self._keyframe_residuals(
                    model_input, timestep, cond, uncond, control, layout, settings, counts
                )
            noise = self._predict_noise(
                model_input, timestep, cond, uncond, residuals, layout, settings, counts
            )
            latents = scheduler.step(noise, timestep, latents, **step_kwargs, return_dict=False)[0]
        return self._decode(latents, layout, counts)

    def _encode_prompts(
        self, requests: Sequence[ChunkRequest], cfg: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-frame text embeddings (conditional, and unconditional with CFG)."""
        import torch

        texts = [r.prompt for r in requests] + (
            [r.negative_prompt for r in requests] if cfg else []
        )
        unique = list(dict.fromkeys(texts))
        tokenizer = self._modules.tokenizer
        tokens = tokenizer(
            unique,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        encoded = self._modules.text_encoder(tokens.input_ids.to(self._device))[0]
        by_text = {text: encoded[i] for i, text in enumerate(unique)}

        def per_frame(prompts: list[str]) -> torch.Tensor:
            pairs = zip(prompts, requests, strict=True)
            rows = [by_text[prompt].expand(r.frames, -1, -1) for prompt, r in pairs]
            return torch.cat(rows).to(self._dtype)

        cond = per_frame([r.prompt for r in requests])
        uncond = per_frame([r.negative_prompt for r in requests]) if cfg else None
        return cond, uncond

    @staticmethod
    def _step_kwargs(scheduler: Any, requests: Sequence[ChunkRequest]) -> dict[str, Any]:
        """Per-frame generators for schedulers that draw noise in their step."""
        if "generator" not in inspect.signature(scheduler.step).parameters:
            return {}
        generators = [g for r in requests for g in step_generators(r)]
        return {"generator": generators}

    def _forward_slices(self, count: int) -> list[slice]:
        size = self.config.max_frames_per_forward
        return [slice(a, min(a + size, count)) for a in range(0, count, size)]

    @staticmethod
    def _count(counts: np.ndarray, column: int, owners: np.ndarray, passes: int) -> None:
        np.add.at(counts[:, column], owners, passes)

    def _keyframe_residuals(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        control: torch.Tensor,
        layout: _Layout,
        settings: GenerationSettings,
        counts: np.ndarray,
    ) -> list[list[torch.Tensor]]:
        """ControlNet residuals of the keyframes: one list per CFG half ([uncond,] cond), each
        holding the down-block residuals then the mid-block residual, (keyframes, ...)."""
        import torch

        cfg = uncond is not None
        halves: list[list[list[torch.Tensor]]] = [[] for _ in range(2 if cfg else 1)]
        keys = torch.as_tensor(layout.keyframes, device=model_input.device)
        for part in self._forward_slices(len(layout.keyframes)):
            frames = keys[part]
            x, images = model_input[frames], control[frames]
            text = cond[frames]
            if cfg:
                x, images = torch.cat([x, x]), torch.cat([images, images])
                text = torch.cat([uncond[frames], text])
            down, mid = self._modules.controlnet(
                x,
                timestep,
                encoder_hidden_states=text,
                controlnet_cond=images,
                conditioning_scale=settings.controlnet_conditioning_scale,
                guess_mode=False,
                return_dict=False,
            )
            self._count(counts, 1, layout.keyframe_owner[part], 2 if cfg else 1)
            outputs = [*down, mid]
            split = [output.chunk(len(halves)) for output in outputs]
            for half in range(len(halves)):
                halves[half].append([levels[half] for levels in split])
        return [[torch.cat(level) for level in zip(*parts, strict=True)] for parts in halves]

    def _interpolated_residuals(
        self, residuals: list[list[torch.Tensor]], layout: _Layout, part: slice
    ) -> list[torch.Tensor]:
        """Residuals of frames `part`, blended from their two keyframes, CFG halves stacked."""
        import torch

        device = residuals[0][0].device
        left = torch.as_tensor(layout.left[part], device=device)
        right = torch.as_tensor(layout.right[part], device=device)
        weight = torch.as_tensor(layout.weight[part], device=device, dtype=residuals[0][0].dtype)
        blended = []
        for level in range(len(residuals[0])):
            per_half = []
            for half in residuals:
                w = weight.view(-1, *([1] * (half[level].dim() - 1)))
                per_half.append(torch.lerp(half[level][left], half[level][right], w))
            blended.append(torch.cat(per_half))
        return blended

    def _predict_noise(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        residuals: list[list[torch.Tensor]] | None,
        layout: _Layout,
        settings: GenerationSettings,
        counts: np.ndarray,
    ) -> torch.Tensor:
        import torch

        cfg = uncond is not None
        noise = torch.empty_like(model_input)
        for part in self._forward_slices(layout.frames):
            x, text = model_input[part], cond[part]
            if cfg:
                x, text = torch.cat([x, x]), torch.cat([uncond[part], text])
            extra = {}
            if residuals is not None:
                blended = self._interpolated_residuals(residuals, layout, part)
                extra = {
                    "down_block_additional_residuals": blended[:-1],
                    "mid_block_additional_residual": blended[-1],
                }
            out = self._modules.unet(
                x, timestep, encoder_hidden_states=text, return_dict=False, **extra
            )[0]
            self._count(counts, 0, layout.owner[part], 2 if cfg else 1)
            if cfg:
                unconditional, conditional = out.chunk(2)
                out = unconditional + settings.guidance_scale * (conditional - unconditional)
            noise[part] = out
        return noise

    def _decode(self, latents: torch.Tensor, layout: _Layout, counts: np.ndarray) -> torch.Tensor:
        import torch

        vae = self._modules.vae
        images = []
        for part in self._forward_slices(layout.frames):
            decoded = vae.decode(latents[part] / vae.config.scaling_factor, return_dict=False)[0]
            self._count(counts, 2, layout.owner[part], 1)
            images.append((decoded * 0.5 + 0.5).clamp(0, 1))
        return torch.cat(images)

    @staticmethod
    def _to_numpy(images: torch.Tensor, frames_dtype: str) -> np.ndarray:
        array = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if frames_dtype == "float32":
            return array
        return np.rint(array * 255.0).astype(np.uint8)

    def _results(
        self,
        requests: Sequence[ChunkRequest],
        frames: np.ndarray,
        counts: np.ndarray,
        *,
        wall_seconds: float,
        compute_seconds: float,
        load_seconds: float,
        precision: Precision,
        notes: list[str],
    ) -> list[ChunkResult]:
        settings = requests[0].settings
        weights = self._weights
        units = [
            weigh_work(
                int(unet),
                int(control),
                int(vae),
                width=settings.width,
                height=settings.height,
                controlnet_weight=weights.controlnet_weight,
                vae_weight=weights.vae_weight,
            )
            for unet, control, vae in counts
        ]
        total = sum(u.total for u in units) or 1.0
        results, start = [], 0
        for request, work in zip(requests, units, strict=True):
            results.append(
                ChunkResult(
                    job_id=request.job_id,
                    chunk_index=request.chunk_index,
                    frames=frames[start : start + request.frames],
                    work_units=work,
                    wall_seconds=wall_seconds,
                    device_seconds=compute_seconds * work.total / total,
                    load_seconds=load_seconds * work.total / total,
                    device=str(self._device),
                    precision=precision,
                    batch_requests=len(requests),
                    batch_frames=int(frames.shape[0]),
                    notes=list(notes),
                )
            )
            start += request.frames
        return results
