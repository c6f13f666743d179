"""Orchestration over the in-process stages: chained keys, cache hits that read no frames,
chunk spans, and bad input that leaves nothing behind."""

from __future__ import annotations

import asyncio

import av
import pytest

from deployments import errors
from serve.config import AppArgs
from serve.jobs import JobRequest
from serve.orchestrator import chunk_spans, edit_video
from serve.pipeline import Plan, make_plan
from serve.stages import job_keys
from serve.storage import LocalStore
from tests.conftest import FAST_OVERRIDES


def request(styles=("smooth",)) -> JobRequest:
    return JobRequest(prompt="a dancer", styles=list(styles), preset="draft", seed=1,
                      overrides=FAST_OVERRIDES)  # fmt: skip


def test_repeat_with_same_video_and_style_reads_no_frames(short_clip, tmp_path, monkeypatch):
    args = AppArgs(storage_uri=str(tmp_path / "store"), upscaler_model="lanczos")
    first = asyncio.run(edit_video(short_clip, tmp_path / "a.mp4", request(), args))
    assert first["plan"]["work_units"]["unet_evals"] > 0

    def no_video_reading(*args, **kwargs):
        raise AssertionError("a cache hit must not open the video")

    monkeypatch.setattr(av, "open", no_video_reading)
    second = asyncio.run(edit_video(short_clip, tmp_path / "b.mp4", request(), args))
    hits = {s["stage"]: (s["calls"], s["cache_hits"]) for s in second["plan"]["stages"]}
    assert hits["pose"] == (1, 1) and hits["motion"] == (1, 1)
    assert hits["segment"][0] == hits["segment"][1] > 0
    assert "diffusion" not in hits and "render" not in hits


def test_keys_chain_and_change_with_settings():
    base = make_plan("draft", 640, 360, model_id="tiny", styles=["smooth"])
    mirrored = base.model_copy(update={"styles": ["mirror"]})
    slower = base.model_copy(update={"decode": base.decode.model_copy(update={"fps": 8})})
    a, b, c = (job_keys("f" * 64, plan) for plan in (base, mirrored, slower))
    assert (a.source, a.decode, a.pose) == (b.source, b.decode, b.pose)
    assert a.motion != b.motion
    assert c.decode != a.decode and c.pose != a.pose and c.motion != a.motion


def test_chunk_spans_cover_every_frame_once():
    assert chunk_spans(40, 16) == [(0, 16), (16, 32), (32, 40)]
    assert chunk_spans(16, 16) == [(0, 16)]
    assert chunk_spans(0, 16) == []


def test_bad_input_leaves_nothing_in_storage(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 5000)
    store = tmp_path / "store"
    args = AppArgs(storage_uri=str(store), upscaler_model="lanczos")
    with pytest.raises(errors.CorruptVideoError):
        asyncio.run(edit_video(corrupt, tmp_path / "out.mp4", request(), args))
    assert list(LocalStore(store).list("")) == []
    assert not (tmp_path / "out.mp4").exists()


def test_invalid_style_is_rejected_by_the_plan():
    with pytest.raises(errors.InvalidSettingError, match="exaggerate"):
        Plan(styles=["wobble"])
