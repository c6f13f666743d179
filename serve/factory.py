"""Builds the stage objects an app needs from its `AppArgs` (Ray-free).

Shared by the Serve deployments (serve/app.py) and the in-process path (`motionserve edit`), so
both load the same models from the same places.
"""

from __future__ import annotations

import fcntl
import shutil
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


def ensure_tiny_models(cache_dir: Path) -> Path:
    """Build the tiny random-weight SD + ControlNet once per machine (replicas share it)."""
    target = cache_dir / "tiny-models" / "sd15-controlnet"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one replica builds, the others wait and reuse it
        if not (target / "model_index.json").exists():
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            tiny_models.build_tiny_sd_controlnet(partial)
            partial.rename(target)
    return target


def ensure_tiny_motion_adapter(cache_dir: Path) -> Path:
    """Build the tiny random-weight motion adapter once per machine (replicas share it)."""
    target = cache_dir / "tiny-models" / "motion-adapter"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            tiny_models.build_tiny_motion_adapter(partial)
            partial.rename(target)
    return target


def ensure_tiny_t2i_adapter(cache_dir: Path) -> Path:
    """Build the tiny random-weight T2I-Adapter once per machine (replicas share it)."""
    target = cache_dir / "tiny-models" / "t2i-adapter"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            tiny_models.build_tiny_t2i_adapter(partial)
            partial.rename(target)
    return target


def t2i_adapter_source(args: AppArgs) -> model_loading.ModelSource | None:
    """The app's T2I-Adapter source (None when not configured); 'tiny' is built once."""
    if args.t2i_adapter is None:
        return None
    if args.t2i_adapter == "tiny":
        return model_loading.ModelSource(uri=str(ensure_tiny_t2i_adapter(Settings().cache_dir)))
    return model_loading.ModelSource(uri=args.t2i_adapter)


def motion_module_source(args: AppArgs) -> model_loading.ModelSource | None:
    """The app's motion adapter source (None when not configured); 'tiny' is built once."""
    if args.motion_module is None:
        return None
    if args.motion_module == "tiny":
        return model_loading.ModelSource(uri=str(ensure_tiny_motion_adapter(Settings().cache_dir)))
    return model_loading.ModelSource(uri=args.motion_module)


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
