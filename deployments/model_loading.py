"""Where diffusion weights come from, and loading them into diffusers modules.

A `ModelSource` names one of:
- a diffusers-format directory (``model_index.json``/``config.json`` plus subfolders),
- a single-file checkpoint (``.safetensors``/``.ckpt``/...), loaded with diffusers'
  ``from_single_file``; offline it needs ``config``, a diffusers-format directory holding the
  component configs,
- an ``s3://bucket/prefix`` (a folder of either of the above, or one checkpoint object),
  downloaded once into a local cache directory and then read like a local path,
- a hub id such as ``org/name``, passed through to ``from_pretrained`` for users who have a hub.

The base model (UNet, VAE, text encoder, tokenizer, scheduler config) and the ControlNet are
separate sources: one base model serves with different ControlNets, and ControlNets mostly ship
as single files. The tiny test models go through this same code (`tiny_sd_controlnet_sources`).

This module is Ray-free and never imports `serve`; S3 access uses boto3 directly, with an
injectable client (tests pass one for a moto server).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SourceKind = Literal["directory", "single_file", "s3", "hub"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_DOWNLOAD_MARKER = ".motionserve-download.json"


class ModelSource(BaseModel):
    """One set of weights: a local directory or file, an s3:// URI, or a hub id."""

    model_config = ConfigDict(frozen=True)

    uri: str = Field(
        min_length=1,
        description="A diffusers directory, a single-file checkpoint (.safetensors/.ckpt/.pt/"
        ".pth/.bin), an s3://bucket/prefix of either, or a hub id such as 'org/name'.",
    )
    subfolder: str | None = Field(
        default=None,
        description="Subfolder inside the source holding this model, e.g. 'controlnet' when a "
        "ControlNet is saved beside a base model.",
    )
    config: str | None = Field(
        default=None,
        description="For a single-file checkpoint: a diffusers-format directory (or hub id) "
        "with the component configs. Without it diffusers guesses the configs from the hub.",
    )

    def kind(self) -> SourceKind:
        """How the source is read; raises FileNotFoundError for a local path that is missing."""
        return classify_uri(self.uri)


def classify_uri(uri: str) -> SourceKind:
    """'s3', 'directory', 'single_file' or 'hub' for a source URI."""
    if uri.startswith("s3://"):
        return "s3"
    path = Path(uri).expanduser()
    if path.is_dir():
        return "directory"
    if path.is_file():
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            return "single_file"
        raise ValueError(
            f"{uri} is a file but not a checkpoint: expected one of "
            + ", ".join(SINGLE_FILE_SUFFIXES)
        )
    looks_local = uri.startswith(("/", "./", "../", "~")) or uri.count("/") > 1
    if looks_local or not _HUB_ID.match(uri):
        raise FileNotFoundError(f"model source {uri} does not exist")
    return "hub"


# --- S3 -----------------------------------------------------------------------------------------


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """('bucket', 'prefix') of an s3://bucket/prefix URI; the prefix may be empty."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri}")
    return bucket, prefix


def s3_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client: the usual credential chain, standard retries, and path-style URLs on
    a custom endpoint (MinIO and moto serve only those)."""
    import boto3
    from botocore.config import Config

    addressing = {"addressing_style": "path"} if endpoint_url else {}
    config = Config(signature_version="s3v4", s3=addressing, retries={"mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def fetch_s3_file(
    uri: str,
    destination: str | Path,
    *,
    client: Any = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> Path:
    """Download the one object at ``s3://bucket/key`` to `destination` (its folder must exist).

    The one way motionserve reads a single S3 object (job inputs, upscaler weights); `client`
    defaults to `s3_client(endpoint_url, region)`.
    """
    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"not an s3://bucket/key URI of one object: {uri}")
    (client or s3_client(endpoint_url, region)).download_file(bucket, key, str(destination))
    return Path(destination)


def s3_fetcher(
    client: Any = None, *, endpoint_url: str | None = None, region: str | None = None
) -> Callable[[str, Path], Path]:
    """`fetch_s3_file` with its client settings bound: a ``fetch(uri, destination)``."""
    return functools.partial(fetch_s3_file, client=client, endpoint_url=endpoint_url, region=region)


def _s3_objects(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """The objects that make up the source: the one object named `prefix`, or a folder."""
    paginator = client.get_paginator("list_objects_v2")
    objects = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        objects.extend(page.get("Contents", []))
    exact = [item for item in objects if item["Key"] == prefix]
    if exact and prefix.lower().endswith(SINGLE_FILE_SUFFIXES):
        return exact
    folder = prefix.rstrip("/") + "/" if prefix else ""
    return [item for item in objects if item["Key"].startswith(folder) and item["Key"] != folder]


def download_s3_source(
    uri: str,
    cache_dir: str | Path,
    *,
    client: Any = None,
    endpoint_url: str | None = None,
) -> Path:
    """Download an s3:// model source once into `cache_dir`; return its local path.

    The first call lists and downloads the objects into a temp folder and renames it into
    place, with a marker listing what was fetched; later calls (any process) find the marker and
    make no S3 request at all. Weights under a prefix are treated as immutable: publish new
    weights under a new prefix, or delete the cached folder.
    """
    bucket, prefix = parse_s3_uri(uri)
    digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", prefix.strip("/").rsplit("/", 1)[-1]) or "root"
    target = Path(cache_dir) / "s3" / f"{tail}-{digest}"
    marker = target / _DOWNLOAD_MARKER
    if marker.is_file():
        return target / json.loads(marker.read_text())["root"]
    if client is None:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint_url)
    objects = _s3_objects(client, bucket, prefix)
    if not objects:
        raise FileNotFoundError(f"no objects under {uri}")
    single_file = len(objects) == 1 and objects[0]["Key"] == prefix
    root = Path(prefix).name if single_file else "model"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        for item in objects:
            relative = root if single_file else item["Key"][len(prefix.rstrip("/")) + 1 :]
            destination = staging / (relative if single_file else f"model/{relative}")
            destination.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(destination))
        listing = [{"key": o["Key"], "size": o["Size"], "etag": o.get("ETag")} for o in objects]
        (staging / _DOWNLOAD_MARKER).write_text(
            json.dumps({"uri": uri, "root": root, "objects": listing}, indent=2)
        )
        try:
            os.replace(staging, target)
        except OSError:
            if not marker.is_file():  # not another process finishing first: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / root


def resolve_source(
    source: ModelSource,
    cache_dir: str | Path,
    *,
    s3_client: Any = None,
    s3_endpoint_url: str | None = None,
) -> tuple[SourceKind, str]:
    """(kind, location) ready for diffusers: s3 sources become local paths first."""
    kind = source.kind()
    if kind != "s3":
        location = str(Path(source.uri).expanduser()) if kind != "hub" else source.uri
        return kind, location
    local = download_s3_source(
        source.uri, cache_dir, client=s3_client, endpoint_url=s3_endpoint_url
    )
    return classify_uri(str(local)), str(local)


# --- Loading ------------------------------------------------------------------------------------


@dataclass
class SDComponents:
    """The modules the diffusion loop runs on, on CPU in the dtype they were loaded with."""

    unet: Any
    controlnet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    load_seconds: float
    base_kind: SourceKind
    controlnet_kind: SourceKind


def _join(subfolder: str | None, name: str) -> str:
    return f"{subfolder.strip('/')}/{name}" if subfolder else name


def _load_base_from_pretrained(location: str, subfolder: str | None, dtype: Any) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a progress bar per load floods service logs

    # Any scheduler class reads scheduler_config.json as a plain dict; the engine builds its own.
    scheduler_config = DDIMScheduler.load_config(location, subfolder=_join(subfolder, "scheduler"))
    return {
        "unet": UNet2DConditionModel.from_pretrained(
            location, subfolder=_join(subfolder, "unet"), dtype=dtype
        ),
        "vae": AutoencoderKL.from_pretrained(
            location, subfolder=_join(subfolder, "vae"), dtype=dtype
        ),
        "text_encoder": CLIPTextModel.from_pretrained(
            location, subfolder=_join(subfolder, "text_encoder"), dtype=dtype
        ),
        "tokenizer": CLIPTokenizer.from_pretrained(
            location, subfolder=_join(subfolder, "tokenizer")
        ),
        "scheduler_config": dict(scheduler_config),
    }


def _load_base_from_single_file(location: str, config: str | None, dtype: Any) -> dict:
    from diffusers import StableDiffusionPipeline

    options: dict[str, Any] = {"dtype": dtype, "load_safety_checker": False}
    if config is not None:
        options["config"] = config
    pipeline = StableDiffusionPipeline.from_single_file(location, **options)
    return {
        "unet": pipeline.unet,
        "vae": pipeline.vae,
        "text_encoder": pipeline.text_encoder,
        "tokenizer": pipeline.tokenizer,
        "scheduler_config": dict(pipeline.scheduler.config),
    }


def _load_controlnet(kind: SourceKind, location: str, source: ModelSource, dtype: Any) -> Any:
    from diffusers import ControlNetModel

    if kind == "single_file":
        options: dict[str, Any] = {"dtype": dtype}
        if source.config is not None:
            options["config"] = source.config
            if source.subfolder:
                options["subfolder"] = source.subfolder
        return ControlNetModel.from_single_file(location, **options)
    return ControlNetModel.from_pretrained(location, subfolder=source.subfolder, dtype=dtype)


def load_sd_components(
    base: ModelSource,
    controlnet: ModelSource,
    *,
    dtype: Any,
    cache_dir: str | Path,
    s3_client: Any = None,
    s3_endpoint_url: str | None = None,
) -> SDComponents:
    """Load an SD 1.x base model and a ControlNet from their sources, on CPU in `dtype`."""
    started = time.perf_counter()
    s3 = {"s3_client": s3_client, "s3_endpoint_url": s3_endpoint_url}
    base_kind, base_location = resolve_source(base, cache_dir, **s3)
    if base_kind == "single_file":
        modules = _load_base_from_single_file(base_location, base.config, dtype)
    else:
        modules = _load_base_from_pretrained(base_location, base.subfolder, dtype)
    control_kind, control_location = resolve_source(controlnet, cache_dir, **s3)
    modules["controlnet"] = _load_controlnet(control_kind, control_location, controlnet, dtype)
    for name in ("unet", "vae", "text_encoder", "controlnet"):
        modules[name].eval().requires_grad_(False)
    return SDComponents(
        **modules,
        load_seconds=time.perf_counter() - started,
        base_kind=base_kind,
        controlnet_kind=control_kind,
    )


def load_motion_adapter(
    source: ModelSource,
    *,
    dtype: Any,
    cache_dir: str | Path,
    s3_client: Any = None,
    s3_endpoint_url: str | None = None,
) -> Any:
    """Load an AnimateDiff motion adapter (diffusers `MotionAdapter`) from its source, on CPU in
    `dtype`: a diffusers directory, a single file (with `config`, a directory holding the
    adapter's config.json, when offline), an s3:// prefix or object of either, or a hub id.

    Raises InvalidWeightsError, one line naming the source, when there is no motion adapter
    there (missing, not a checkpoint, unreadable, or another model's weights)."""
    from diffusers import MotionAdapter

    def load(kind: SourceKind, location: str) -> Any:
        if kind == "single_file":
            options: dict[str, Any] = {"dtype": dtype}
            if source.config is not None:
                options["config"] = source.config
            return MotionAdapter.from_single_file(location, **options)
        return MotionAdapter.from_pretrained(location, subfolder=source.subfolder, dtype=dtype)

    return _load_extra_model(
        source, "motion module", "AnimateDiff motion adapter", load,
        cache_dir=cache_dir, s3_client=s3_client, s3_endpoint_url=s3_endpoint_url,
    )  # fmt: skip


def load_t2i_adapter(
    source: ModelSource,
    *,
    dtype: Any,
    cache_dir: str | Path,
    s3_client: Any = None,
    s3_endpoint_url: str | None = None,
) -> Any:
    """Load a T2I-Adapter (diffusers `T2IAdapter`, e.g. TencentARC's openpose adapter) from
    its source, on CPU in `dtype`: a diffusers directory (config.json + weights), an s3://
    prefix of one, or a hub id. diffusers reads T2I-Adapters only in its own format, so a
    single checkpoint file is refused (convert it with diffusers' conversion script first).

    Raises InvalidWeightsError, one line naming the source, when there is no T2I-Adapter there
    (missing, a single file, unreadable, or another model's weights)."""
    from diffusers import T2IAdapter

    def load(kind: SourceKind, location: str) -> Any:
        if kind == "single_file":
            raise ValueError("a single checkpoint file; give a diffusers directory")
        # diffusers would build a randomly initialised adapter from another model's folder
        # (it ignores the config keys it does not know and only warns about the weights)
        found = T2IAdapter.load_config(location, subfolder=source.subfolder).get("_class_name")
        if found != "T2IAdapter":
            raise ValueError(f"its config.json describes a {found}, not a T2IAdapter")
        return T2IAdapter.from_pretrained(location, subfolder=source.subfolder, dtype=dtype)

    return _load_extra_model(
        source, "T2I-Adapter", "T2I-Adapter", load,
        cache_dir=cache_dir, s3_client=s3_client, s3_endpoint_url=s3_endpoint_url,
    )  # fmt: skip


def _load_extra_model(
    source: ModelSource,
    name: str,
    family: str,
    load: Callable[[SourceKind, str], Any],
    *,
    cache_dir: str | Path,
    s3_client: Any,
    s3_endpoint_url: str | None,
) -> Any:
    """Resolve `source` and `load(kind, location)` it, in eval mode without gradients; every
    failure is one InvalidWeightsError line naming the source (`name`: what the app calls the
    model; `family`: what the weights should be)."""
    from deployments.errors import InvalidWeightsError

    try:
        kind, location = resolve_source(
            source, cache_dir, s3_client=s3_client, s3_endpoint_url=s3_endpoint_url
        )
    except (FileNotFoundError, ValueError) as exc:
        raise InvalidWeightsError(f"{name} {source.uri}: {exc}") from None
    try:
        model = load(kind, location)
    except Exception as exc:  # diffusers, safetensors, json and torch raise many kinds here
        text = str(exc).strip()
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise InvalidWeightsError(
            f"{name} {source.uri} is not a loadable {family}: {first}"
        ) from exc
    return model.eval().requires_grad_(False)


def tiny_sd_controlnet_sources(directory: str | Path) -> tuple[ModelSource, ModelSource]:
    """(base, controlnet) sources of a directory built by `build_tiny_sd_controlnet`."""
    directory = str(directory)
    return ModelSource(uri=directory), ModelSource(uri=directory, subfolder="controlnet")
