"""The diffusion engine: SD 1.5 + ControlNet on batches of chunks, counting work units as it runs.

The denoising loop is written here on diffusers' modules (UNet2DConditionModel, ControlNetModel,
AutoencoderKL, schedulers) rather than a pipeline class, so that the GPU savings are exact and
counted as they happen. With `controlnet_every=1` it computes what diffusers'
StableDiffusionControlNetPipeline computes (a test holds it to that).

Decisions (the why):
- Precision: fp16/bf16 on CUDA; a CPU always runs fp32 (and the result says so).
- Anchor attention (settings.anchor on): see `anchor.py`; each request's anchor runs in its own
  forward before the frames at every step, and its work is counted on that request.
- Motion module (settings.motion_module on): see `motion_module.py`; the UNet forwards of the
  frames pack whole chunks of one length, each chunk (and CFG half) one context window. With
  the module off the loop runs exactly as it did before the module existed.
- LoRAs (settings.loras): see `lora.py`; the batch's set is fused into the UNet weights before
  the loop (read, hashed and checked against the UNet on first use, on the CPU side of the
  batch), so the loop runs a plain UNet and counts the same work units.
- T2I-Adapter (settings.conditioner 't2i_adapter'): see `t2i_adapter.py`; the keyframes'
  features are computed once, at the first step in the control window, and interpolated into
  every frame's UNet forward like ControlNet's residuals. With ControlNet the loop runs exactly
  as it did before the adapter existed.
"""

from __future__ import annotations

import gc
import inspect
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from deployments.diffusion.anchor import (
    AnchorBank,
    ImageAnchor,
    anchor_attention,
)
from deployments.diffusion.flops import measure_formulas, measure_motion_formulas
from deployments.diffusion.keyframes import BatchLayout
from deployments.diffusion.lora import (
    LoraRef,
    UNetLoras,
    check_lora_fits,
    lora_digest,
    read_lora_state,
    resolve_lora_file,
)
from deployments.diffusion.motion_module import (
    build_motion_unet,
    motion_forward,
    motion_window_limit,
    window_groups,
)
from deployments.diffusion.noise import build_scheduler, initial_latents, step_generators
from deployments.diffusion.rows import CancelledRows, LiveRows, keep_scheduler_rows, no_rows
from deployments.diffusion.settings import (
    ChunkRequest,
    ChunkResult,
    EngineConfig,
    GenerationSettings,
    Precision,
)
from deployments.diffusion.t2i_adapter import (
    AdapterFeatures,
    check_adapter_fits,
    keyframe_features,
    measure_adapter_formula,
)
from deployments.diffusion.work_units import (
    ModelWeights,
    controlnet_active_steps,
    weigh_work,
)
from deployments.errors import InvalidSettingError

# torch is imported where it is used: importing the package for its schemas (the API
# process) must not load it.
if TYPE_CHECKING:
    from pathlib import Path

    import torch


ADAPTER_COLUMN = 7  # of the per-request counts: T2I-Adapter evaluations


def measure_model_weights(
    unet: Any, controlnet: Any, vae: Any, cache_dir: Path | None = None
) -> ModelWeights:
    """`ModelWeights` of loaded (or meta) models: each model's FLOP formula over latent shapes
    (`flops.py`: fitted from FLOP counts on meta-device copies built from the configs, so
    nothing is computed and no memory is used; once per architecture, kept in `cache_dir`)
    and parameter counts."""

    def parameters(module: Any) -> int:
        return sum(p.numel() for p in module.parameters())

    return ModelWeights(
        **measure_formulas(unet, controlnet, vae, cache_dir),
        unet_parameters=parameters(unet),
        controlnet_parameters=parameters(controlnet),
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


class DiffusionEngine:
    """SD + ControlNet on batches of chunk requests that share one batch key (Ray-free).

    Lifecycle: `load()` (or lazily on the first `generate`), `generate(requests)`, `unload()`.
    Thread-safe: calls are serialised by a lock, so a server may call from worker threads.
    """

    def __init__(
        self, config: EngineConfig, *, s3_client: Any = None, components: Any = None
    ) -> None:
        """`components`: already-built modules (an `SDComponents`, e.g. random SD 1.5-size
        weights for GPU calibration); `load()` then moves them to the device instead of
        reading `config.base` and `config.controlnet` (each batch casts them to its precision),
        and `unload()` leaves them to their owner."""
        self.config = config
        self._s3_client = s3_client
        self._components = components
        self._lock = threading.RLock()
        self._modules: Any = None  # SDComponents while loaded
        self._device: Any = None
        self._dtype: Any = None
        self._weights: ModelWeights | None = None
        self._motion: Any = None  # UNetMotionModel sharing the UNet's weights, when configured
        self._adapter: Any = None  # the T2I-Adapter, when configured
        self._loras: UNetLoras | None = None  # the UNet's adapters while loaded
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
        from deployments.model_loading import (
            load_motion_adapter,
            load_sd_components,
            load_t2i_adapter,
        )

        with self._lock:
            if self.is_loaded:
                return 0.0
            started = time.perf_counter()
            device = self._resolve_device()
            dtype, _, _ = resolve_precision(self.config.precision, device.type)
            modules = self._components or load_sd_components(
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
            adapter = None
            if self.config.motion_module is not None:
                adapter = load_motion_adapter(
                    self.config.motion_module,
                    dtype=dtype,
                    cache_dir=self.config.cache_dir,
                    s3_client=self._s3_client,
                    s3_endpoint_url=self.config.s3_endpoint_url,
                )
            t2i_adapter = None
            if self.config.t2i_adapter is not None:
                t2i_adapter = load_t2i_adapter(
                    self.config.t2i_adapter,
                    dtype=dtype,
                    cache_dir=self.config.cache_dir,
                    s3_client=self._s3_client,
                    s3_endpoint_url=self.config.s3_endpoint_url,
                )
                check_adapter_fits(t2i_adapter, modules.unet)
                t2i_adapter.to(device)
            for name in ("unet", "controlnet", "vae", "text_encoder"):
                getattr(modules, name).to(device)
            if self._components is not None:  # built in their own dtype: cast at generate
                dtype = modules.unet.dtype
            weights = measure_model_weights(
                modules.unet, modules.controlnet, modules.vae, self.config.cache_dir
            )
            if adapter is not None:
                self._motion = build_motion_unet(modules.unet, adapter)
                motion, attention = measure_motion_formulas(
                    modules.unet, adapter.config, weights.unet, self.config.cache_dir
                )
                weights = weights.model_copy(
                    update={"motion_module": motion, "motion_attention": attention}
                )
            if t2i_adapter is not None:
                if t2i_adapter.dtype != dtype:  # given components, in their own dtype
                    t2i_adapter.to(dtype=dtype)
                formula = measure_adapter_formula(t2i_adapter, modules.unet, self.config.cache_dir)
                weights = weights.model_copy(update={"adapter": formula})
            self._weights = weights
            self._adapter = t2i_adapter
            self._modules, self._device, self._dtype = modules, device, dtype
            self._loras = UNetLoras(modules.unet, self.config.max_loaded_loras)
            self.last_load_seconds = time.perf_counter() - started
            return self.last_load_seconds

    def unload(self) -> None:
        """Drop the models and free their memory; the next `generate` loads them again."""
        with self._lock:
            if not self.is_loaded:
                return
            was_cuda = self._device.type == "cuda"
            self._modules = self._motion = self._loras = self._adapter = None
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
        if self._motion is not None:  # the UNet's parameters are cast already (shared)
            self._motion.to(dtype=dtype)
        if self._adapter is not None:
            self._adapter.to(dtype=dtype)
        self._dtype = dtype

    # - LoRAs -

    def apply_loras(self, loras: Sequence[LoraRef]) -> None:
        """Fuse exactly `loras` into the UNet (none: the base weights, bit-exact); loads the
        models if needed. Raises InvalidSettingError for a LoRA that is not configured, whose
        bytes differ from the digest it was planned with, or that does not fit this UNet."""
        with self._lock:
            self.load()
            assert self._loras is not None
            self._loras.apply(loras, self._lora_state)

    @property
    def lora_loads(self) -> int:
        """LoRA files loaded into the UNet since the models were loaded."""
        return self._loras.loads if self._loras is not None else 0

    def _lora_state(self, ref: LoraRef) -> tuple[dict[str, Any], dict[str, float] | None]:
        source = self.config.loras.get(ref.name)
        if source is None:
            raise InvalidSettingError(
                f"LoRA '{ref.name}' is not configured on this engine (configured: "
                f"{sorted(self.config.loras)})"
            )
        path = resolve_lora_file(
            ref.name,
            source,
            self.config.cache_dir,
            s3_client=self._s3_client,
            s3_endpoint_url=self.config.s3_endpoint_url,
        )
        digest = lora_digest(ref.name, source, path)
        if digest != ref.digest:
            raise InvalidSettingError(
                f"LoRA '{ref.name}' has changed since the job was planned (weights {digest}, "
                f"planned with {ref.digest}): submit the job again"
            )
        state, alphas = read_lora_state(ref.name, source, path)
        check_lora_fits(ref.name, state, self._modules.unet)
        return state, alphas

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
        if settings.motion_module and self.config.motion_module is None:
            raise InvalidSettingError(
                "the motion module was asked for but this engine has none configured "
                "(EngineConfig.motion_module / the app's motion_module)"
            )
        if settings.conditioner == "t2i_adapter" and self.config.t2i_adapter is None:
            raise InvalidSettingError(
                "the T2I-Adapter conditioner was asked for but this engine has none configured "
                "(EngineConfig.t2i_adapter / the app's t2i_adapter)"
            )
        if settings.width * settings.height > self.config.max_pixels:
            raise InvalidSettingError(
                f"{settings.width}x{settings.height} frames exceed this engine's limit of "
                f"{self.config.max_pixels} pixels per frame"
            )
        unknown = [ref.name for ref in settings.loras if ref.name not in self.config.loras]
        if unknown:
            raise InvalidSettingError(
                f"LoRA(s) {unknown} are not configured on this engine (configured: "
                f"{sorted(self.config.loras)})"
            )
        for request in requests:
            self._check_control_images(request)
            self._check_anchor(request)

    def _check_anchor(self, request: ChunkRequest) -> None:
        settings, anchor = request.settings, request.anchor
        where = f"job {request.job_id} chunk {request.chunk_index}"
        if settings.anchor == "off":
            if anchor is not None:
                raise InvalidSettingError(
                    f"{where}: an anchor was given but settings.anchor is off"
                )
            return
        if anchor is None:
            raise InvalidSettingError(
                f"{where}: settings.anchor is '{settings.anchor}' but the request has no anchor"
            )
        expected = (settings.height, settings.width, 3)
        image = anchor.image
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != expected:
            raise InvalidSettingError(
                f"{where}: the anchor image must be a uint8 array of shape {expected}"
            )

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
        cancelled: CancelledRows | None = None,
    ) -> list[ChunkResult]:
        """Run a batch of same-key requests; one result per request, in order.

        All frames of all requests go through the models together, in forwards of at most
        `max_frames_per_forward` frames. `frames_dtype='float32'` returns images in [0, 1]
        before quantisation (for exactness tests and float post-processing).

        `cancelled` (see CancelledRows) drops requests between steps: a dropped request's
        result has no frames, `cancelled_at_step` in its notes, and the work units and device
        seconds of the steps it ran; the other rows compute what they would have computed.
        """
        import torch

        started = time.perf_counter()
        with self._lock:
            self.check_inputs(requests)
            load_seconds = self.load()
            settings = requests[0].settings
            dtype, precision, note = resolve_precision(settings.precision, self._device.type)
            self._ensure_dtype(dtype)
            self._check_windows(requests)
            self.apply_loras(settings.loras)
            truncations = [self.truncation_notes(r) for r in requests]  # needs the tokenizer
            # unet, controlnet, vae, anchor attention, vae encodes, motion module, motion
            # attention (evaluations x window frames), T2I-Adapter
            counts = np.zeros((len(requests), 8), dtype=np.int64)
            dropped: dict[int, int] = {}  # request index -> step it was dropped before
            with torch.inference_mode():
                self._synchronize()
                compute_started = time.perf_counter()
                images = self._run(requests, settings, counts, cancelled or no_rows, dropped)
                self._synchronize()
                compute_seconds = time.perf_counter() - compute_started
                if images is None:  # every request was dropped
                    side = (0, settings.height, settings.width, 3)
                    frames = np.zeros(side, np.uint8 if frames_dtype == "uint8" else np.float32)
                else:
                    frames = self._to_numpy(images, frames_dtype)
        wall_seconds = time.perf_counter() - started
        results = self._results(
            requests,
            frames,
            counts,
            dropped,
            wall_seconds=wall_seconds,
            compute_seconds=compute_seconds,
            load_seconds=load_seconds,
            precision=precision,
            notes=[note] if note else [],
        )
        for notes, result in zip(truncations, results, strict=True):
            result.notes.extend(notes)
        return results

    def _check_windows(self, requests: Sequence[ChunkRequest]) -> None:
        """With the motion module a chunk is one window: no longer than its positions."""
        if not requests[0].settings.motion_module:
            return
        limit = motion_window_limit(self._motion)
        for request in requests:
            if request.frames > limit:
                raise InvalidSettingError(
                    f"job {request.job_id} chunk {request.chunk_index}: {request.frames} frames "
                    f"exceed the motion module's context window of {limit} frames (use "
                    "smaller chunks)"
                )

    def _unet(self, settings: GenerationSettings) -> Any:
        """The model the UNet forwards run on: the motion model when the batch asks for it."""
        return self._motion if settings.motion_module else self._modules.unet

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
        counts: np.ndarray,
        cancelled: CancelledRows,
        dropped: dict[int, int],
    ) -> torch.Tensor | None:
        """Encode prompts, denoise all frames, decode; returns float images in [0, 1], NCHW, of
        the requests not dropped (None when all were). Fills `dropped` as rows leave."""
        cond, uncond = self._encode_prompts(requests, settings.cfg)
        anchors = self._anchors(requests, settings, cond, uncond, counts)
        bank = None
        if anchors:
            bank = AnchorBank(settings.latent_height, settings.latent_width, settings.anchor_pool)
        with anchor_attention(self._unet(settings), bank) if bank else nullcontext():
            return self._denoise(
                requests, settings, counts, cancelled, dropped, cond, uncond, anchors, bank
            )

    def _denoise(
        self,
        requests: Sequence[ChunkRequest],
        settings: GenerationSettings,
        counts: np.ndarray,
        cancelled: CancelledRows,
        dropped: dict[int, int],
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        anchors: list[ImageAnchor],
        bank: AnchorBank | None,
    ) -> torch.Tensor | None:
        """The denoising loop and the decode (`_run`), the anchors stepped beside the frames."""
        import torch

        modules, device, dtype = self._modules, self._device, self._dtype
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
        rows = LiveRows(requests, settings.controlnet_every)
        features: AdapterFeatures | None = None  # the T2I-Adapter's, once per batch
        for index, timestep in enumerate(timesteps):
            keep = rows.drop(cancelled(index), index, dropped)
            if keep is not None:
                if not rows.live:
                    return None  # nobody waits: the rest of the batch is not computed
                before = latents.shape[0]
                keep = torch.as_tensor(keep, device=device)
                latents, cond, control = latents[keep], cond[keep], control[keep]
                uncond = uncond[keep] if uncond is not None else None
                keep_scheduler_rows(scheduler, step_kwargs, keep, before)
                anchors = [anchor for anchor in anchors if anchor.owner in rows.live]
            layout = rows.layout
            if bank is not None:
                self._anchor_pass(anchors, bank, timestep, counts, settings.motion_module)
            model_input = scheduler.scale_model_input(latents, timestep)
            residuals = None
            if active[index] and settings.conditioner == "t2i_adapter":
                if features is None:
                    features = keyframe_features(
                        self._adapter, control, layout, settings.controlnet_conditioning_scale,
                        self._forward_slices, counts, ADAPTER_COLUMN,
                    )  # fmt: skip
                residuals = features.halves(layout, uncond is not None)
            elif active[index]:
                residuals = self._keyframe_residuals(
                    model_input, timestep, cond, uncond, control, layout, settings, counts
                )
            noise = self._predict_noise(
                model_input, timestep, cond, uncond, residuals, layout, settings, counts, bank,
                anchors,
            )  # fmt: skip
            latents = scheduler.step(noise, timestep, latents, **step_kwargs, return_dict=False)[0]
        keep = rows.drop(cancelled(len(timesteps)), len(timesteps), dropped)
        if keep is not None:
            if not rows.live:
                return None
            latents = latents[torch.as_tensor(keep, device=device)]
        return self._decode(latents, rows.layout, counts)

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

    def _anchors(
        self,
        requests: Sequence[ChunkRequest],
        settings: GenerationSettings,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        counts: np.ndarray,
    ) -> list[ImageAnchor]:
        """One anchor per request (none with the anchor off), with its request's text
        embeddings; each anchor image's VAE encode is counted here."""
        if settings.anchor == "off":
            return []
        scheduler = build_scheduler(settings.scheduler, self._modules.scheduler_config)
        anchors: list[ImageAnchor] = []
        start = 0
        for index, request in enumerate(requests):
            first = slice(start, start + 1)
            texts = (cond[first], uncond[first] if uncond is not None else None)
            anchors.append(
                ImageAnchor(
                    index, request, scheduler, self._modules.vae, *texts, self._device, self._dtype
                )
            )
            counts[index, 4] += 1
            start += request.frames
        return anchors

    def _anchor_pass(
        self,
        anchors: list[ImageAnchor],
        bank: AnchorBank,
        timestep: torch.Tensor,
        counts: np.ndarray,
        motion_module: bool = False,
    ) -> None:
        """Each anchor's UNet row at this step (the bank writing its keys/values), alone in its
        forward so its keys/values do not depend on the batch. Its output is not needed: an
        image anchor has no trajectory to step. With the motion module it runs through the
        motion model as a window of one frame."""
        import torch

        bank.start_step()
        for anchor in anchors:
            x, text = anchor.model_input(timestep), anchor.cond
            passes = 1
            if anchor.uncond is not None:
                x, text, passes = torch.cat([x, x]), torch.cat([anchor.uncond, text]), 2
            if motion_module:
                motion_forward(self._motion, x, timestep, text, 1)
                counts[anchor.owner, 5] += passes
                counts[anchor.owner, 6] += passes
            else:
                self._modules.unet(x, timestep, encoder_hidden_states=text, return_dict=False)
            counts[anchor.owner, 0] += passes
        bank.finish_writing()

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
        layout: BatchLayout,
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
        self, residuals: list[list[torch.Tensor]], layout: BatchLayout, part: slice
    ) -> list[torch.Tensor]:
        """Residuals of frames `part`, blended from their two keyframes, CFG halves stacked."""
        import torch

        device = residuals[0][0].device
        left = torch.as_tensor(np.asarray(layout.left)[part], device=device)
        right = torch.as_tensor(np.asarray(layout.right)[part], device=device)
        weight = np.asarray(layout.weight, dtype=np.float64)[part]
        weight = torch.as_tensor(weight, device=device, dtype=residuals[0][0].dtype)
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
        layout: BatchLayout,
        settings: GenerationSettings,
        counts: np.ndarray,
        bank: AnchorBank | None = None,
        anchors: Sequence[ImageAnchor] = (),
    ) -> torch.Tensor:
        import torch

        cfg = uncond is not None
        noise = torch.empty_like(model_input)
        slot_of = {anchor.owner: slot for slot, anchor in enumerate(anchors)}
        if settings.motion_module:
            return self._predict_noise_windows(
                model_input, timestep, cond, uncond, residuals, layout, settings, counts, bank,
                slot_of, noise,
            )  # fmt: skip
        for part in self._forward_slices(layout.frames):
            if bank is not None:
                # Bank rows: anchor `slot`'s forward wrote [uncond, cond] at 2 slot, 2 slot + 1.
                slots = torch.as_tensor([slot_of[o] for o in layout.owner[part].tolist()])
                rows = torch.cat([2 * slots, 2 * slots + 1]) if cfg else slots
                bank.rows = rows.to(model_input.device)
                self._count(counts, 3, layout.owner[part], 2 if cfg else 1)
            x, text = model_input[part], cond[part]
            if cfg:
                x, text = torch.cat([x, x]), torch.cat([uncond[part], text])
            extra = {}
            if residuals is not None:
                blended = self._interpolated_residuals(residuals, layout, part)
                if settings.conditioner == "t2i_adapter":  # a fresh list: the UNet pops it
                    extra = {"down_intrablock_additional_residuals": blended}
                else:
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

    def _predict_noise_windows(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        residuals: list[list[torch.Tensor]] | None,
        layout: BatchLayout,
        settings: GenerationSettings,
        counts: np.ndarray,
        bank: AnchorBank | None,
        slot_of: dict[int, int],
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """`_predict_noise` through the motion model: whole chunks of one length per forward,
        each chunk (and each CFG half of it) one context window."""
        import torch

        cfg = uncond is not None
        passes = 2 if cfg else 1
        owners = layout.owner
        chunks = [np.flatnonzero(owners == owner) for owner in dict.fromkeys(owners.tolist())]
        groups = window_groups([len(c) for c in chunks], self.config.max_frames_per_forward)
        for group in groups:
            part = np.concatenate([chunks[i] for i in group])
            window = len(chunks[group[0]])
            if bank is not None:
                slots = torch.as_tensor([slot_of[o] for o in owners[part].tolist()])
                rows = torch.cat([2 * slots, 2 * slots + 1]) if cfg else slots
                bank.rows = rows.to(model_input.device)
                self._count(counts, 3, owners[part], passes)
            index = torch.as_tensor(part, device=model_input.device)
            x, text = model_input[index], cond[index]
            if cfg:  # [uncond chunks..., cond chunks...]: whole windows in each half
                x, text = torch.cat([x, x]), torch.cat([uncond[index], text])
            blended = None
            if residuals is not None:
                blended = self._interpolated_residuals(residuals, layout, part)
            out = motion_forward(self._motion, x, timestep, text, window, blended)
            self._count(counts, 0, owners[part], passes)
            self._count(counts, 5, owners[part], passes)
            self._count(counts, 6, owners[part], passes * window)
            if cfg:
                unconditional, conditional = out.chunk(2)
                out = unconditional + settings.guidance_scale * (conditional - unconditional)
            noise[index] = out
        return noise

    def _decode(
        self, latents: torch.Tensor, layout: BatchLayout, counts: np.ndarray
    ) -> torch.Tensor:
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
        dropped: dict[int, int],
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
                weights=weights,
                anchor_attention_evals=int(anchor),
                anchor_pool=settings.anchor_pool,
                vae_encodes=int(encodes),
                motion_module_evals=int(motion),
                motion_attention_evals=int(motion_attention),
                adapter_evals=int(adapter),
            )
            for unet, control, vae, anchor, encodes, motion, motion_attention, adapter in counts
        ]
        total = sum(u.total for u in units) or 1.0
        results, start = [], 0
        for index, (request, work) in enumerate(zip(requests, units, strict=True)):
            # `frames` holds the requests that ran to the end, in order; a dropped one has none
            count = 0 if index in dropped else request.frames
            extra = [f"cancelled_at_step {dropped[index]}"] if index in dropped else []
            results.append(
                ChunkResult(
                    job_id=request.job_id,
                    chunk_index=request.chunk_index,
                    frames=frames[start : start + count],
                    work_units=work,
                    model_weights=weights,
                    wall_seconds=wall_seconds,
                    device_seconds=compute_seconds * work.total / total,
                    load_seconds=load_seconds * work.total / total,
                    device=str(self._device),
                    precision=precision,
                    batch_requests=len(requests),
                    batch_frames=sum(r.frames for r in requests),
                    notes=list(notes) + extra,
                )
            )
            start += count
        return results
