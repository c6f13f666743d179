"""The chunk model keeps the generation cache keys of before it existed."""

from __future__ import annotations

from serve.chunks import ChunkSpec
from serve.pipeline import make_plan
from serve.stages import generation_key, job_keys, keyframe_key


def test_generation_key_is_the_one_the_untyped_request_gave():
    plan = make_plan("draft", 640, 360, model_id="tiny", styles=["smooth"])
    spec = ChunkSpec(job_id="j", chunk_index=2, prompt="a dancer", negative_prompt="blur", seed=7)
    key = generation_key(job_keys("f" * 64, plan), plan, (0, 16), spec.key_fields())
    # computed with the dict {"prompt", "negative_prompt", "seed"} the orchestrator passed before
    assert key == "122d188aca6766ed3c43cf8537052bcf4d5b7c5d152cb24523a9ef129ce2053f"
    other_job = spec.model_copy(update={"job_id": "k", "chunk_index": 5})
    assert generation_key(job_keys("f" * 64, plan), plan, (0, 16), other_job.key_fields()) == key


def test_anchored_chunks_carry_the_jobs_anchor_and_other_keys():
    import numpy as np
    import pytest

    from serve.chunks import chunk_request
    from serve.stages import Frames

    plain = make_plan("draft", 640, 360, model_id="tiny")
    anchored = make_plan("draft", 640, 360, model_id="tiny", overrides={"anchor": "first_keyframe"})
    spec = ChunkSpec(job_id="j", chunk_index=3, prompt="a dancer", seed=7)
    g = anchored.generation
    maps = np.zeros((4, g.height, g.width, 3), np.uint8)
    first = np.full((g.height, g.width, 3), 9, np.uint8)
    request = chunk_request(spec, Frames(maps, anchor_map=first), anchored)
    assert request.anchor.seed == 7 and np.array_equal(request.anchor.image, first)
    assert chunk_request(spec, Frames(maps), plain).anchor is None
    with pytest.raises(RuntimeError, match="without its image"):
        chunk_request(spec, Frames(maps), anchored)
    keys = job_keys("f" * 64, plain)
    assert job_keys("f" * 64, anchored) == keys  # pose and motion are shared
    keyframe = keyframe_key(keys, anchored, spec.key_fields())
    on = generation_key(keys, anchored, (0, 16), spec.key_fields(), keyframe)
    assert on != generation_key(keys, plain, (0, 16), spec.key_fields())
    # The keyframe is frame 0 alone without an anchor (nothing to anchor on yet): the key of
    # an unanchored 1-frame chunk 0; the chunks' keys follow the keyframe's.
    assert keyframe == generation_key(keys, plain, (0, 1), spec.key_fields())
    assert on != generation_key(keys, anchored, (0, 16), spec.key_fields(), "other keyframe")


def test_reference_is_in_the_generation_key_only_where_it_acts():
    import numpy as np
    import pytest

    from deployments.errors import InvalidSettingError
    from serve.chunks import chunk_request
    from serve.stages import Frames

    spec = ChunkSpec(job_id="j", chunk_index=2, prompt="a dancer", negative_prompt="blur", seed=7)
    plain = make_plan("draft", 640, 360, model_id="tiny", styles=["smooth"])
    referenced = make_plan(
        "draft", 640, 360, model_id="tiny", styles=["smooth"], overrides={"anchor": "reference"}
    )
    golden = "122d188aca6766ed3c43cf8537052bcf4d5b7c5d152cb24523a9ef129ce2053f"
    # A reference with its anchor off (or elsewhere) is left out: the keys of before.
    off = job_keys("f" * 64, plain, "a" * 64, "jobs/x/reference")
    assert off.reference is None
    assert generation_key(off, plain, (0, 16), spec.key_fields()) == golden
    a = generation_key(job_keys("f" * 64, referenced, "a" * 64, "r"), referenced, (0, 16),
                       spec.key_fields())  # fmt: skip
    b = generation_key(job_keys("f" * 64, referenced, "b" * 64, "r"), referenced, (0, 16),
                       spec.key_fields())  # fmt: skip
    same_bytes_elsewhere = job_keys("f" * 64, referenced, "a" * 64, "s3://other/place")
    assert len({a, b, golden}) == 3
    assert generation_key(same_bytes_elsewhere, referenced, (0, 16), spec.key_fields()) == a
    # decode, pose and motion never depend on it
    shared = job_keys("f" * 64, referenced, "a" * 64, "r")
    assert shared.motion == off.motion and shared.pose == off.pose
    with pytest.raises(InvalidSettingError, match="needs a reference image"):
        job_keys("f" * 64, referenced)
    g = referenced.generation
    picture = np.full((g.height, g.width, 3), 5, np.uint8)
    maps = np.zeros((4, g.height, g.width, 3), np.uint8)
    request = chunk_request(spec, Frames(maps, anchor_map=picture), referenced)
    assert np.array_equal(request.anchor.image, picture)
    # With a reference the keyframe itself anchors on it, so its key holds the reference too.
    assert keyframe_key(shared, referenced, spec.key_fields()) != keyframe_key(
        job_keys("f" * 64, referenced, "b" * 64, "r"), referenced, spec.key_fields()
    )
