"""A gracefully stopped ingress replica hands its running jobs over (IngressServer.__del__)."""

from __future__ import annotations

import json
import time

import httpx

from serve.jobs import JobStore
from serve.local_app import free_port, load_config, local_app
from serve.schemas import JobState
from serve.storage import LocalStore
from tests.conftest import FAST_OVERRIDES


def test_a_stopped_ingress_releases_its_jobs_leases(tmp_path, short_clip):
    from ray import serve as ray_serve

    config = load_config(port=free_port())
    store_root = tmp_path / "store"
    config["applications"][0]["args"].update(storage_uri=str(store_root), job_lease_s=300)
    request = {"prompt": "a robot", "preset": "draft", "seed": 3,
               "overrides": {**FAST_OVERRIDES, "chunk_frames": 2, "steps": 12}}  # fmt: skip
    with local_app(config, quiet=True) as url, httpx.Client(base_url=url, timeout=60) as client:
        with open(short_clip, "rb") as video:
            accepted = client.post("/v1/jobs", files={"video": ("c.mp4", video, "video/mp4")},
                                   data={"request": json.dumps(request)})  # fmt: skip
        job_id = accepted.json()["job_id"]
        deadline = time.monotonic() + 240
        while not client.get(f"/v1/jobs/{job_id}").json()["checkpointed_chunks"]:
            assert time.monotonic() < deadline, "the job never checkpointed a chunk"
            time.sleep(0.25)  # polling the HTTP API, as a client does
        ray_serve.delete("motionserve")  # graceful: Serve calls the replicas' __del__
    jobs = JobStore(LocalStore(store_root))
    manifest = jobs.get("local", job_id)
    assert manifest.state == JobState.RUNNING  # handed over, not ended
    claim_keys = list(jobs.store.list(f"{jobs.folder('local', job_id)}/claims/"))
    latest = json.loads(jobs.store.get_bytes(claim_keys[-1]))
    assert latest["released"] is True and latest["renewed_at"] == 0.0  # adoptable at once
