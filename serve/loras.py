"""The app's LoRAs on the request side: a request's `loras` override (names and scales) becomes
the plan's `LoraRef`s (with each file's content digest), the `turbo` preset's few-step rule, and
the check of every configured LoRA when the app starts (Ray-free; torch only for that check).

Where the weights are: `AppArgs.loras` (name -> `LoraSource`); 'tiny' is the built-in random
LoRA for the tiny base model (`ensure_tiny_lora`). The engine reads the same files
(`serve.factory.engine_config`) and refuses a file whose digest is not the planned one.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.diffusion.lora import (
    MAX_LORA_SCALE,
    MIN_LORA_SCALE,
    LoraRef,
    LoraSource,
    check_lora_fits,
    lora_digest,
    read_lora_state,
    resolve_lora_file,
)
from deployments.errors import InvalidSettingError
from serve.config import AppArgs, Settings

TINY_LORA_SEED = 1


class LoraChoice(BaseModel):
    """One entry of a request's `loras` override."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="A LoRA named in the app config (AppArgs.loras).")
    scale: float = Field(
        default=1.0,
        ge=MIN_LORA_SCALE,
        le=MAX_LORA_SCALE,
        description="Multiplier of the LoRA's delta fused into the UNet weights.",
    )


def ensure_tiny_lora(cache_dir: Path) -> Path:
    """The tiny random LoRA for the tiny base model, built once per machine."""
    import fcntl
    import shutil

    from deployments import tiny_models
    from serve.factory import ensure_tiny_models

    target = cache_dir / "tiny-models" / f"lora-seed{TINY_LORA_SEED}"
    weights = target / "pytorch_lora_weights.safetensors"
    if weights.is_file():
        return target
    model = ensure_tiny_models(cache_dir)
    with open(target.parent / ".lora-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not weights.is_file():
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            tiny_models.build_tiny_lora(model, partial, seed=TINY_LORA_SEED)
            partial.rename(target)
    return target


def lora_sources(args: AppArgs) -> dict[str, LoraSource]:
    """The app's LoRAs with 'tiny' replaced by the built tiny LoRA's directory."""
    sources = {}
    for name, source in args.loras.items():
        if source.uri == "tiny":
            path = ensure_tiny_lora(Settings().cache_dir)
            source = source.model_copy(update={"uri": str(path)})
        sources[name] = source
    return sources


@functools.lru_cache(maxsize=256)
def _file_digest(name: str, source: LoraSource, path: str, size: int, mtime_ns: int) -> str:
    return lora_digest(name, source, Path(path))


def _digest(args: AppArgs, name: str, source: LoraSource) -> str:
    settings = Settings()
    path = resolve_lora_file(
        name,
        source,
        settings.cache_dir / "models",
        s3_endpoint_url=args.s3_endpoint_url or settings.s3_endpoint_url,
    )
    if path is None:
        return lora_digest(name, source, None)
    stat = path.stat()  # hashed again only when the file changed
    return _file_digest(name, source, str(path), stat.st_size, stat.st_mtime_ns)


def resolve_loras(args: AppArgs, requested: Any) -> list[LoraRef]:
    """A request's `loras` override -> the plan's LoRA set; InvalidSettingError (422) for an
    unknown name (listing the configured ones) or a malformed entry."""
    if requested is None:
        return []
    if not isinstance(requested, list):
        raise InvalidSettingError('loras must be a list of {"name": ..., "scale": ...}')
    try:
        choices = [LoraChoice.model_validate(item) for item in requested]
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ()))
        raise InvalidSettingError(f"invalid loras entry: {where}: {error['msg']}") from None
    sources = lora_sources(args)
    unknown = sorted({c.name for c in choices} - set(sources))
    if unknown:
        configured = sorted(sources) or "none: the app config's `loras` is empty"
        raise InvalidSettingError(f"unknown LoRA(s) {unknown}; configured: {configured}")
    return [
        LoraRef(name=c.name, digest=_digest(args, c.name, sources[c.name]), scale=c.scale)
        for c in choices
    ]


def few_step_loras(args: AppArgs, overrides: dict[str, Any], few_step_preset: bool) -> None:
    """Resolve `overrides['loras']` in place into LoraRef dicts. For a few-step preset
    (`turbo`) without a few-step LoRA in the request, add the app's first few-step LoRA at
    scale 1; refuse when there is none and the base model is not few-step itself."""
    refs = resolve_loras(args, overrides.get("loras"))
    sources = lora_sources(args) if (few_step_preset or refs) else {}
    if few_step_preset and not args.base_model_few_step:
        if not any(sources[ref.name].few_step for ref in refs):
            configured = sorted(name for name, source in sources.items() if source.few_step)
            if not configured:
                raise InvalidSettingError(
                    "preset 'turbo' needs a few-step model: it denoises in 6 LCM steps without "
                    "classifier-free guidance, and 6 steps of a plain SD 1.5 produce mush. "
                    "Configure a few-step LoRA (app config `loras`, e.g. LCM-LoRA, with "
                    "few_step: true) or, if the base model is itself distilled, set "
                    "base_model_few_step: true"
                )
            name = configured[0]
            refs.append(LoraRef(name=name, digest=_digest(args, name, sources[name]), scale=1.0))
    if refs:
        overrides["loras"] = [ref.model_dump() for ref in refs]
    else:
        overrides.pop("loras", None)


def check_app_loras(args: AppArgs) -> None:
    """Read every configured LoRA and check it against the base model's UNet (built on the meta
    device from its config: no weights, no GPU) when that config is at hand (the tiny model or
    a local diffusers directory; otherwise the engine checks at first use). Raises
    InvalidSettingError naming the LoRA and what is wrong."""
    if not args.loras:
        return
    settings = Settings()
    unet = _meta_unet(args)
    for name, source in lora_sources(args).items():
        path = resolve_lora_file(
            name,
            source,
            settings.cache_dir / "models",
            s3_endpoint_url=args.s3_endpoint_url or settings.s3_endpoint_url,
        )
        if path is None:
            continue  # a hub LoRA: read (and checked) by the engine, which can reach the hub
        state, _ = read_lora_state(name, source, path)
        if unet is not None:
            check_lora_fits(name, state, unet)


def _meta_unet(args: AppArgs) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    if args.base_model == "tiny":
        from serve.factory import ensure_tiny_models

        location = ensure_tiny_models(Settings().cache_dir)
    elif Path(args.base_model).expanduser().is_dir():
        location = Path(args.base_model).expanduser()
    else:
        return None
    config = UNet2DConditionModel.load_config(str(location), subfolder="unet")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)
