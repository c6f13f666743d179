"""Cancelled requests leave a running diffusion batch at the next step (engine `cancelled`).

Tiny random-weight models on CPU fp32, as in test_diffusion.py (whose helpers this module
reuses; the fixtures are in conftest.py).
"""

import numpy as np
import pytest

from deployments import diffusion as d
from tests.unit.test_diffusion import (
    BATCH_TOLERANCE,
    ForwardCounter,
    pose_maps,
    request,
    settings,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def three_requests(key: d.GenerationSettings) -> list[d.ChunkRequest]:
    return [
        request(3, job_id="a", seed=11, noise_sharing=0.7, settings=key),
        request(4, job_id="b", seed=12, control_images=pose_maps(4, seed=3), settings=key),
        request(2, job_id="c", seed=13, control_images=pose_maps(2, seed=5), settings=key),
    ]


# dpmpp_2m and unipc keep per-sample history in the scheduler; euler_a and lcm draw step noise
# from per-frame generators: both must be cut to the rows that stay.
@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "unipc", "euler_a", "lcm"])
def test_cancelled_row_leaves_at_the_next_step_and_the_others_are_unchanged(engine, scheduler):
    key = settings(scheduler=scheduler, controlnet_every=2, steps=4)
    batch = three_requests(key)
    full = engine.generate(batch, frames_dtype="float32")
    asked: list[int] = []

    def cancelled(step: int) -> set[int]:
        asked.append(step)
        return {1} if step >= 2 else set()  # b's caller went away during step 1

    part = engine.generate(batch, frames_dtype="float32", cancelled=cancelled)
    assert asked == [0, 1, 2, 3, 4]  # before each step and before decoding
    dropped = part[1]
    assert dropped.frames.shape == (0, key.height, key.width, 3)
    assert "cancelled_at_step 2" in dropped.notes
    # b ran steps 0 and 1 only: 4 frames x 2 steps x 2 (CFG), no decode
    assert dropped.work_units.unet_evals == 4 * 2 * 2
    assert dropped.work_units.vae_decodes == 0
    assert 0 < dropped.device_seconds
    for index in (0, 2):
        kept, reference = part[index], full[index]
        assert kept.frames.shape == reference.frames.shape
        assert float(np.abs(kept.frames - reference.frames).max()) <= BATCH_TOLERANCE
        predicted = d.predict_chunk_units(key, batch[index].frames, engine.model_weights)
        assert kept.work_units == reference.work_units == predicted
        assert not any(note.startswith("cancelled") for note in kept.notes)


def test_batch_stops_when_every_request_is_cancelled(engine):
    key = settings(steps=4)
    batch = [request(3, settings=key), request(2, job_id="b", seed=9, settings=key)]
    counter = ForwardCounter(engine._modules.unet)
    vae = ForwardCounter(engine._modules.vae.decoder)
    try:
        results = engine.generate(batch, cancelled=lambda step: {0, 1} if step >= 1 else set())
    finally:
        counter.remove()
        vae.remove()
    assert counter.rows == 5 * 2  # one step of 5 frames with CFG, then nothing
    assert vae.calls == 0
    assert [r.frames.shape[0] for r in results] == [0, 0]
    assert all("cancelled_at_step 1" in r.notes for r in results)
    assert [r.work_units.unet_evals for r in results] == [3 * 2, 2 * 2]


def test_cancel_before_decoding_skips_the_decode(engine):
    key = settings(steps=2)
    batch = [request(3, settings=key), request(2, job_id="b", seed=9, settings=key)]
    full = engine.generate(batch)
    results = engine.generate(batch, cancelled=lambda step: {0} if step == 2 else set())
    assert results[0].frames.shape[0] == 0
    assert results[0].work_units.vae_decodes == 0
    assert results[0].work_units.unet_evals == full[0].work_units.unet_evals
    assert np.abs(results[1].frames.astype(int) - full[1].frames.astype(int)).max() <= 1
    assert results[1].work_units == full[1].work_units
