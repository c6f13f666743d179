"""Settings: every environment variable motionserve reads, declared once with a description.

`Settings()` reads them (prefix ``MOTIONSERVE_``); `env_var_table()` renders the registry for the
README so the documentation cannot drift from the code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.diffusion.lora import LORA_NAME_PATTERN, LoraSource
from deployments.model_loading import parse_s3_uri
from deployments.video import InputLimits


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "motionserve"


class TenantKey(BaseModel):
    """An API key, stored only as its sha256, and the tenant it belongs to."""

    tenant: str = Field(description="Tenant name; jobs and results are isolated per tenant.")
    key_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="sha256 hex digest of the API key (never the key)."
    )


class Settings(BaseSettings):
    """Process-wide settings, read from ``MOTIONSERVE_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="MOTIONSERVE_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Local cache for downloaded inputs, sample videos, converted weights and "
        "tiny models. Never inside the git checkout.",
    )
    storage_uri: str = Field(
        default="",
        description="Object store for artifacts and job manifests: a local directory path or "
        "s3://bucket/prefix. Empty means <cache_dir>/store.",
    )
    upscaler_dir: Path | None = Field(
        default=None,
        description="Folder of Real-ESRGAN models converted ahead of time (its manifest.json "
        "and .safetensors files, as `motionserve weights fetch` writes them under "
        "<cache_dir>/weights/upscalers); named upscaler models are read from there instead of "
        "being fetched. The container image sets it to the models converted at build time.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Custom S3 endpoint (MinIO, a moto server in tests). Unset uses AWS.",
    )
    s3_region: str = Field(default="us-east-1", description="Region for the S3 client.")
    max_input_bytes: int = Field(
        default=InputLimits().max_bytes,
        description="Largest accepted upload, in bytes (CLI, and the app unless its args set "
        "`limits`).",
    )
    max_duration_s: float = Field(
        default=InputLimits().max_duration_s,
        description="Longest accepted video, in seconds (as above).",
    )
    max_pixels: int = Field(
        default=InputLimits().max_pixels,
        description="Largest accepted frame area (width x height) of an input video (as above).",
    )

    api_keys: list[TenantKey] = Field(
        default_factory=list,
        description="JSON list of {tenant, key_sha256}: API keys (hashed) accepted besides the "
        "app config's; the Helm chart fills it from a Secret.",
    )

    def input_limits(self) -> InputLimits:
        return InputLimits(
            max_bytes=self.max_input_bytes,
            max_duration_s=self.max_duration_s,
            max_pixels=self.max_pixels,
        )

    def resolved_storage_uri(self) -> str:
        return self.storage_uri or str(self.cache_dir / "store")


def env_var_table() -> str:
    """Markdown table of every environment variable, generated from `Settings`."""
    rows = ["| variable | default | description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = str(field.get_default(call_default_factory=True))
        default = default.replace(str(Path.home()), "~")
        rows.append(f"| `MOTIONSERVE_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows)


class AppArgs(BaseModel):
    """Arguments of `serve.app:build_app`: the `args` of the Serve application config.

    Resource placement per deployment (CPUs, GPU fraction, autoscaling, batch size) lives in the
    config's `deployments` section, per hardware tier; these are the application's own settings.
    """

    model_config = {"extra": "forbid"}

    tier: Literal["local", "dev", "mvp", "scale", "burst"] = Field(
        default="local", description="Hardware tier; selects the price table row for reports."
    )
    storage_uri: str = Field(
        default="",
        description="Artifacts and job manifests: a directory or s3://bucket/prefix. Empty uses "
        "MOTIONSERVE_STORAGE_URI, then <cache_dir>/store.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="Custom S3 endpoint (MinIO, moto); unset uses AWS."
    )
    base_model: str = Field(
        default="tiny",
        description="Stable Diffusion 1.5 weights: a diffusers directory, a single-file "
        "checkpoint, an s3:// prefix, a hub id, or 'tiny' for the built-in random-weight models.",
    )
    controlnet_model: str = Field(
        default="tiny", description="OpenPose ControlNet weights; same forms as base_model."
    )
    motion_module: str | None = Field(
        default=None,
        description="AnimateDiff motion adapter (diffusers MotionAdapter) for jobs that ask for "
        "the motion module: a diffusers directory, a single .safetensors file, an s3:// prefix, "
        "a hub id, or 'tiny' for the built-in random-weight adapter. Unset: no motion module "
        "(such jobs are refused with 422).",
    )
    t2i_adapter: str | None = Field(
        default=None,
        description="T2I-Adapter (diffusers T2IAdapter, openpose, made for the base model) for "
        'jobs with `conditioner: "t2i_adapter"`: a diffusers directory, an s3:// prefix of one, '
        "a hub id (e.g. TencentARC/t2iadapter_openpose_sd14v1), or 'tiny' for the built-in "
        "random-weight adapter. Unset: no adapter (such jobs are refused with 422).",
    )
    base_model_few_step: bool = Field(
        default=False,
        description="The base model is itself a few-step model (an LCM, TCD or Hyper-SD "
        "distilled SD 1.5): the `turbo` preset then runs without a few-step LoRA.",
    )
    loras: dict[str, LoraSource] = Field(
        default_factory=dict,
        description='LoRAs requests and presets may name (`overrides: {"loras": [{"name": '
        '..., "scale": 1.0}]}`), by name: their weights (diffusers/PEFT or kohya format, '
        ".safetensors), and whether each is a few-step LoRA. Each is read and checked against "
        "the base model when the app starts; s3:// ones must be in allowed_input_buckets.",
    )
    upscaler_model: str = Field(
        default="realesr-animevideov3-x4",
        description="Real-ESRGAN weights: a converted model name, a path or s3:// URI; 'lanczos' "
        "uses no model.",
    )
    default_preset: Literal["draft", "standard", "high", "turbo"] = Field(
        default="standard", description="Preset used when a request names none."
    )
    limits: InputLimits | None = Field(
        default=None,
        description="Input video limits; unset takes them from MOTIONSERVE_MAX_INPUT_BYTES, "
        "MOTIONSERVE_MAX_DURATION_S and MOTIONSERVE_MAX_PIXELS (their defaults otherwise), the "
        "same limits the command line applies.",
    )
    api_keys: list[TenantKey] = Field(
        default_factory=list,
        description="Accepted API keys (hashed) and their tenants. Empty disables auth (local).",
    )
    allowed_input_buckets: list[str] = Field(
        default_factory=list, description="S3 buckets that s3:// job inputs may come from."
    )
    max_active_jobs: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="Jobs queued or running per ingress replica, submissions still being "
        "probed included (a slot is reserved before the upload is hashed); beyond, POST /v1/jobs "
        "answers 503 with Retry-After (backpressure that loses no accepted job). Each replica "
        "counts its own jobs, so the app-wide limit is this times the Ingress num_replicas (2 "
        "on the scale tier); a replica adopting a dead one's jobs takes only as many as it has "
        "free slots for.",
    )
    max_active_previews: int = Field(
        default=2,
        ge=1,
        le=1024,
        description="Motion previews (POST /v1/previews, CPU only) queued or running per ingress "
        "replica, admissions under way included; beyond, 503 with Retry-After. A pool of its "
        "own: previews never take a job's slot, so they cannot starve jobs, and this bounds "
        "the CPU stage work they add to the jobs' (each preview: one decode + pose, one motion "
        "edit, one render).",
    )
    job_lease_s: float = Field(
        default=30.0,
        ge=1.0,
        le=3600.0,
        description="A running job's lease: its ingress replica renews it every third of this; "
        "a job whose lease lapsed (replica died) is resumed by another replica after this long.",
    )
    max_chunks_in_flight: int = Field(
        default=4, ge=1, le=64, description="Chunks of one job running through the stages at once."
    )

    @model_validator(mode="after")
    def _loras_fit_the_app(self) -> AppArgs:
        import re

        for name, source in self.loras.items():
            if not re.match(LORA_NAME_PATTERN, name):
                raise ValueError(f"LoRA name {name!r} must match {LORA_NAME_PATTERN}")
            if source.uri == "tiny" and self.base_model != "tiny":
                raise ValueError(f"LoRA '{name}': the tiny LoRA fits only base_model 'tiny'")
            if source.uri.startswith("s3://"):
                bucket = parse_s3_uri(source.uri)[0]
                if bucket not in self.allowed_input_buckets:
                    raise ValueError(
                        f"LoRA '{name}': bucket '{bucket}' is not in allowed_input_buckets "
                        f"{self.allowed_input_buckets}"
                    )
        return self

    def input_limits(self) -> InputLimits:
        """The configured limits, else the environment's (one source with the command line)."""
        return self.limits or Settings().input_limits()
