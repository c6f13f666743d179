"""Shared fixtures: the real sample video, synthetic clips and an S3 (moto) server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from serve.samples import sample_video_path
from serve.storage import S3Store


def _cache_dir() -> Path:
    # Outside the checkout and shared across runs, so the sample wheel is downloaded once.
    return Path(os.environ.get("MOTIONSERVE_CACHE_DIR", Path.home() / ".cache" / "motionserve"))


@pytest.fixture(scope="session")
def sample_video() -> Path:
    """The real sports2d demo clip (VP9, 1768x994, 30 fps, 7.7 s, AAC audio)."""
    return sample_video_path(_cache_dir())


# --- S3 through a real moto server on loopback (storage, cache and e2e tests) ---------------


@dataclass(frozen=True)
class MotoS3:
    """A running moto S3 server with one bucket; fake credentials are in the environment."""

    endpoint_url: str
    bucket: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def store(self, **options) -> S3Store:
        """An S3Store under a fresh random prefix, so tests never see each other's keys."""
        return S3Store(
            self.bucket, f"test-{uuid.uuid4().hex[:12]}", endpoint_url=self.endpoint_url, **options
        )


_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    # No profile or config file of the machine may point boto3 at a real account.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """A moto S3 server on 127.0.0.1 (free port) with the bucket ``motionserve-test``."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        for name, value in _FAKE_AWS_ENV.items():
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            moto = MotoS3(endpoint_url=f"http://{host}:{port}", bucket="motionserve-test")
            moto.client().create_bucket(Bucket=moto.bucket)
            yield moto
        finally:
            server.stop()


# --- Tiny random-weight SD 1.5 + ControlNet (diffusion tests) -------------------------------

# No hub is reachable; diffusers/transformers must never try one (read at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class TinySD:
    """The tiny SD + ControlNet diffusers directory and how long building it took."""

    path: Path
    build_seconds: float


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> TinySD:
    """Tiny SD 1.5 + ControlNet built once per test session (deployments.tiny_models)."""
    import time

    from deployments.tiny_models import build_tiny_sd_controlnet

    started = time.perf_counter()
    path = build_tiny_sd_controlnet(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)
    return TinySD(path=path, build_seconds=time.perf_counter() - started)


# --- A short real clip for pipeline tests ------------------------------------------------------


@pytest.fixture(scope="session")
def short_clip(sample_video, tmp_path_factory) -> Path:
    """2 s of the real sample (25 fps, 640x360, with its audio): fast to run end to end."""
    from deployments.video import DecodeSettings, EncodeSettings, decode_all, encode_mp4

    frames = decode_all(sample_video, DecodeSettings(fps=25, width=640, max_frames=50))
    path = tmp_path_factory.mktemp("clips") / "short.mp4"
    encode_mp4(frames, path, EncodeSettings(fps=25, audio_from=str(sample_video)))
    return path


# Generation at 128 px, output at 256 px, 4 steps: every lever of the pipeline runs, in seconds.
FAST_OVERRIDES = {"generation_long_side": 128, "output_long_side": 256, "steps": 4}


# --- The `motionserve` command in this process (tests/cli.py) ----------------------------------


@pytest.fixture
def motionserve(capfd):
    """Runs `motionserve ARGS` through `serve.cli.main` in this process; returns a CliResult
    (returncode, stdout, stderr), like a finished subprocess."""
    from tests.cli import motionserve_fixture

    return motionserve_fixture(capfd)


def pytest_collection_modifyitems(items):
    """The modules on the shared e2e server run together, after those that start servers of
    their own (tests/ordering.py)."""
    from tests.ordering import order_packages

    order_packages(items)
