"""Settings: every environment variable motionserve reads, declared once with a description.

`Settings()` reads them (prefix ``MOTIONSERVE_``); `env_var_table()` renders the registry for the
README so the documentation cannot drift from the code.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.video import InputLimits


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "motionserve"


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
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Custom S3 endpoint (MinIO, a moto server in tests). Unset uses AWS.",
    )
    s3_region: str = Field(default="us-east-1", description="Region for the S3 client.")
    max_input_bytes: int = Field(
        default=InputLimits().max_bytes, description="Largest accepted upload, in bytes."
    )
    max_duration_s: float = Field(
        default=InputLimits().max_duration_s, description="Longest accepted video, in seconds."
    )
    max_pixels: int = Field(
        default=InputLimits().max_pixels,
        description="Largest accepted frame area (width x height) of an input video.",
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
