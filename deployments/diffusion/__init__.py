"""Diffusion stage: SD 1.5 + ControlNet on chunks of frames, with counted work units.

One definition each, in the submodule of its responsibility; this package namespace is the
public API (`from deployments import diffusion; diffusion.X`) and re-exports them:
- `settings`: the batch key, chunk requests and results, the engine config and the bounds;
- `work_units`: the pure-Python work-unit formula (no torch: the cost model imports it directly);
- `keyframes`: which frames ControlNet sees and how the others blend its residuals;
- `noise`: seeds, initial noise and schedulers;
- `lora`: LoRA sources, their checks, and fusing a batch's set into the UNet;
- `anchor`: anchor attention (the processor, the anchors' keys/values, the first-keyframe anchor);
- `t2i_adapter`: T2I-Adapter conditioning (features once per keyframe per chunk), its weight;
- `engine`: `DiffusionEngine`, the denoising loop (the loader lives in `model_loading`).
Importing the package loads no torch; the engine imports it when it runs.
"""

from deployments.diffusion.engine import DiffusionEngine, measure_model_weights, resolve_precision
from deployments.diffusion.keyframes import BatchLayout, keyframe_blend
from deployments.diffusion.lora import LoraRef, LoraSource
from deployments.diffusion.noise import (
    build_scheduler,
    derive_seed,
    initial_latents,
    job_window_noise,
    own_noise_acts,
    step_generators,
)
from deployments.diffusion.settings import (
    DIFFUSION_CODE_VERSION,
    FEW_STEP_SCHEDULERS,
    LATENT_CHANNELS,
    MAX_CONDITIONING_SCALE,
    MAX_GUIDANCE_SCALE,
    MAX_LCM_STEPS,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    MIN_STEPS,
    AnchorInput,
    AnchorMode,
    ChunkRequest,
    ChunkResult,
    Conditioner,
    EngineConfig,
    GenerationSettings,
    NoiseMode,
    Precision,
    SchedulerName,
    check_settings,
    keyframe_settings,
)
from deployments.diffusion.work_units import (
    REFERENCE_LATENT_AREA,
    SD15_ADAPTER_FLOPS,
    SD15_MODEL_WEIGHTS,
    VAE_FACTOR,
    FlopFormula,
    ModelWeights,
    WorkUnits,
    cfg_enabled,
    controlnet_active_steps,
    keyframe_indices,
    level_tokens,
    predict_chunk_units,
    predict_work_units,
    weigh_work,
)

__all__ = [
    "keyframe_settings",
    "DIFFUSION_CODE_VERSION",
    "FEW_STEP_SCHEDULERS",
    "LATENT_CHANNELS",
    "MAX_CONDITIONING_SCALE",
    "MAX_GUIDANCE_SCALE",
    "MAX_LCM_STEPS",
    "MAX_SIDE",
    "MAX_STEPS",
    "MIN_SIDE",
    "MIN_STEPS",
    "REFERENCE_LATENT_AREA",
    "SD15_ADAPTER_FLOPS",
    "SD15_MODEL_WEIGHTS",
    "VAE_FACTOR",
    "AnchorInput",
    "AnchorMode",
    "BatchLayout",
    "ChunkRequest",
    "ChunkResult",
    "Conditioner",
    "DiffusionEngine",
    "EngineConfig",
    "GenerationSettings",
    "LoraRef",
    "LoraSource",
    "FlopFormula",
    "ModelWeights",
    "NoiseMode",
    "Precision",
    "SchedulerName",
    "WorkUnits",
    "build_scheduler",
    "cfg_enabled",
    "check_settings",
    "controlnet_active_steps",
    "derive_seed",
    "initial_latents",
    "job_window_noise",
    "own_noise_acts",
    "keyframe_blend",
    "keyframe_indices",
    "level_tokens",
    "measure_model_weights",
    "predict_chunk_units",
    "predict_work_units",
    "resolve_precision",
    "step_generators",
    "weigh_work",
]
