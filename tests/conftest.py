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
