"""The chunk model keeps the generation cache keys of before it existed."""

from __future__ import annotations

from serve.chunks import ChunkSpec
from serve.pipeline import make_plan
from serve.stages import generation_key, job_keys


def test_generation_key_is_the_one_the_untyped_request_gave():
    plan = make_plan("draft", 640, 360, model_id="tiny", styles=["smooth"])
    spec = ChunkSpec(job_id="j", chunk_index=2, prompt="a dancer", negative_prompt="blur", seed=7)
    key = generation_key(job_keys("f" * 64, plan), plan, (0, 16), spec.key_fields())
    # computed with the dict {"prompt", "negative_prompt", "seed"} the orchestrator passed before
    assert key == "122d188aca6766ed3c43cf8537052bcf4d5b7c5d152cb24523a9ef129ce2053f"
    other_job = spec.model_copy(update={"job_id": "k", "chunk_index": 5})
    assert generation_key(job_keys("f" * 64, plan), plan, (0, 16), other_job.key_fields()) == key
