"""Builds the stage objects an app needs from its `AppArgs` (Ray-free).

Shared by the Serve deployments (serve/app.py) and the in-process path (`motionserve edit`), so
both load the same models from the same places.
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Callable
from pathlib import Path

from deployments import diffusion, model_loading, tiny_models, upscale
from serve.cache import ArtifactCache
from serve.config import AppArgs, Settings
from serve.stages import StageContext
from serve.storage import DEFAULT_S3_REGION, open_store


def stage_context(args: AppArgs) -> StageContext:
    settings = Settings()
    uri = args.storage_uri or settings.resolved_storage_uri()
    endpoint = args.s3_endpoint_url or settings.s3_endpoint_url
    store = open_store(uri, s3_endpoint_url=endpoint, region=settings.s3_region)
    return StageContext(ArtifactCache(store), args.input_limits(), s3_endpoint_url=endpoint)


def _ensure_built(target: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """`build(folder)` into `target` once per machine: replicas share it (one builds under a
    file lock, the others wait and reuse it); `marker` is the file a finished build has."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / marker).exists():
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            build(partial)
            partial.rename(target)  # whole or absent: a reader never sees half a model
    return target


def ensure_tiny_models(cache_dir: Path) -> Path:
    """The tiny random-weight SD + ControlNet, built once per machine."""
    target = cache_dir / "tiny-models" / "sd15-controlnet"
    return _ensure_built(target, "model_index.json", tiny_models.build_tiny_sd_controlnet)


def ensure_tiny_motion_adapter(cache_dir: Path) -> Path:
    """The tiny random-weight motion adapter, built once per machine."""
    target = cache_dir / "tiny-models" / "motion-adapter"
    return _ensure_built(target, "config.json", tiny_models.build_tiny_motion_adapter)


def ensure_tiny_t2i_adapter(cache_dir: Path) -> Path:
    """The tiny random-weight T2I-Adapter, built once per machine."""
    target = cache_dir / "tiny-models" / "t2i-adapter"
    return _ensure_built(target, "config.json", tiny_models.build_tiny_t2i_adapter)


def _adapter_source(
    configured: str | None, ensure_tiny: Callable[[Path], Path]
) -> model_loading.ModelSource | None:
    """An app adapter setting as a source (None when not configured); 'tiny' is built once."""
    if configured is None:
        return None
    if configured == "tiny":
        return model_loading.ModelSource(uri=str(ensure_tiny(Settings().cache_dir)))
    return model_loading.ModelSource(uri=configured)


def t2i_adapter_source(args: AppArgs) -> model_loading.ModelSource | None:
    """The app's T2I-Adapter source."""
    return _adapter_source(args.t2i_adapter, ensure_tiny_t2i_adapter)


def motion_module_source(args: AppArgs) -> model_loading.ModelSource | None:
    """The app's motion adapter source."""
    return _adapter_source(args.motion_module, ensure_tiny_motion_adapter)


def engine_config(args: AppArgs, model_id: str) -> diffusion.EngineConfig:
    settings = Settings()
    if args.base_model == "tiny":
        base, control = model_loading.tiny_sd_controlnet_sources(
            ensure_tiny_models(settings.cache_dir)
        )
    else:
        base = model_loading.ModelSource(uri=args.base_model)
        control = model_loading.ModelSource(uri=args.controlnet_model)
    from serve.loras import lora_sources

    return diffusion.EngineConfig(
        model_id=model_id,
        base=base,
        controlnet=control,
        motion_module=motion_module_source(args),
        t2i_adapter=t2i_adapter_source(args),
        loras=lora_sources(args),
        cache_dir=settings.cache_dir / "models",
        s3_endpoint_url=args.s3_endpoint_url or settings.s3_endpoint_url,
    )


def upscale_settings(args: AppArgs) -> upscale.UpscaleSettings:
    from serve.weights import upscaler_weights_source

    settings = Settings()
    weights = upscaler_weights_source(
        args.upscaler_model, settings.cache_dir, settings.upscaler_dir
    )
    return upscale.UpscaleSettings(weights=weights)


def make_upscaler(args: AppArgs) -> upscale.Upscaler:
    endpoint = args.s3_endpoint_url or Settings().s3_endpoint_url
    fetch = model_loading.s3_fetcher(endpoint_url=endpoint, region=DEFAULT_S3_REGION)
    return upscale.Upscaler(upscale_settings(args), fetch=fetch)


def make_engine(args: AppArgs) -> diffusion.DiffusionEngine:
    return diffusion.DiffusionEngine(engine_config(args, args.base_model))
