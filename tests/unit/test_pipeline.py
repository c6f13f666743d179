"""The plan: manifests written before a field was dropped still load."""

from __future__ import annotations

from serve.pipeline import Plan, make_plan


def test_plans_in_old_manifests_still_load():
    plan = make_plan("standard", 1768, 994, model_id="tiny")
    stored = plan.model_dump(mode="json")
    # Fields older releases wrote into the manifest's plan; nothing read them.
    stored["placement"] = {"pose": "cpu", "diffusion": "gpu"}
    stored["pose_map_crf"] = 18
    assert Plan.model_validate(stored) == plan
