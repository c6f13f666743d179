"""HTTP against a real `motionserve serve`: jobs, cache, tenants, bad input, S3, a replica lost.

The server is the e2e package's shared one (tests/ordering.py); restarts of a server are in
test_shutdown.py, on a server of its own."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import time

import httpx
import pytest

from deployments.consistency import ConsistencySettings, measure_video
from tests.conftest import FAST_OVERRIDES

TERMINAL = {"done", "failed", "cancelled"}


def job_request(seed: int = 5, preset: str = "draft", **overrides) -> str:
    return json.dumps(
        {
            "prompt": "a robot dancing",
            "styles": ["smooth", "exaggerate=1.2"],
            "preset": preset,
            "seed": seed,
            "overrides": {**FAST_OVERRIDES, **overrides},
        }
    )


def submit(
    client: httpx.Client, video, seed: int = 5, preset: str = "draft", **overrides
) -> httpx.Response:
    with open(video, "rb") as handle:
        return client.post(
            "/v1/jobs",
            files={"video": ("clip.mp4", handle, "video/mp4")},
            data={"request": job_request(seed, preset, **overrides)},
        )


def wait(client: httpx.Client, job_id: str, until=lambda s: s["state"] in TERMINAL, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if until(status):
            return status
        time.sleep(0.25)  # polling the HTTP API is how a client waits; no event to block on
    raise TimeoutError(f"job {job_id}: {status}")


def ffprobe(path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format",
         "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_edit_over_http_then_repeat_from_cache(server, short_clip, tmp_path):
    with server.client() as client:
        accepted = submit(client, short_clip)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        status = wait(client, job_id)
        assert status["state"] == "done", status
        result = client.get(f"/v1/jobs/{job_id}/result")
        assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
        out = tmp_path / "result.mp4"
        out.write_bytes(result.content)

        info = ffprobe(out)
        video = next(s for s in info["streams"] if s["codec_type"] == "video")
        assert (video["width"], video["height"], video["r_frame_rate"]) == (256, 144, "25/1")
        assert int(video["nb_read_frames"]) == 50
        assert float(info["format"]["duration"]) == pytest.approx(2.0, abs=0.05)
        report = status["report"]
        assert report["plan"]["work_units"]["unet_evals"] == 24 * 4 * 2
        assert {r["stage"] for r in status["ledger"]} >= {"pose", "diffusion", "encode", "join"}
        # The Video deployment measured the delivered bytes (figures equal to a local
        # measurement of the download), and billed no stage for it.
        section = report["consistency"]
        local = measure_video(out, ConsistencySettings(**section["settings"]))
        assert section["output"] == local.model_dump(mode="json")
        assert section["output"]["boundaries"] == 1 and not section["cache_hit"]
        assert "consistency" not in {r["stage"] for r in status["ledger"]}

        again = wait(client, submit(client, short_clip).json()["job_id"])
        assert again["state"] == "done"
        plan = again["report"]["plan"]
        assert plan["gpu_seconds"] == 0 and plan["work_units"]["unet_evals"] == 0
        assert plan["work_units"]["controlnet_evals"] == 0
        assert not any(r["stage"] == "diffusion" for r in again["ledger"])
        repeat = client.get(f"/v1/jobs/{again['job_id']}/result").content
        assert repeat == out.read_bytes()
        assert again["report"]["consistency"]["cache_hit"]


def test_standard_asks_the_motion_deployment_for_its_chunk_rates(server, short_clip, tmp_path):
    """Motion keyframe density through Serve: the strides come from the Motion deployment
    before any diffusion, and the job counts what its report predicts from them."""
    with server.client() as client:
        accepted = submit(client, short_clip, preset="standard", steps=2, chunk_frames=8)
        assert accepted.status_code == 202, accepted.text
        status = wait(client, accepted.json()["job_id"])
        assert status["state"] == "done", status
        report = status["report"]
        strides = report["keyframe_density"]["strides"]
        assert len(strides) == 3 and set(strides) <= {1, 2}
        generated = sum(len(range(0, 8, s)) + (s > 1 and c == 2) for c, s in enumerate(strides))
        assert report["plan"]["generated_frames"] == generated + 1  # + the anchor keyframe
        assert report["plan"]["work_units"] == report["plan"]["predicted_work_units"]
        out = tmp_path / "standard.mp4"
        out.write_bytes(client.get(f"/v1/jobs/{status['job_id']}/result").content)
        video = next(s for s in ffprobe(out)["streams"] if s["codec_type"] == "video")
        assert (video["r_frame_rate"], int(video["nb_read_frames"])) == ("25/1", 50)


def test_tenants_are_isolated(server, short_clip):
    with server.client("acme") as acme, server.client("globex") as globex:
        job_id = submit(acme, short_clip).json()["job_id"]
        for method, path in [
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/result"),
            ("DELETE", f"/v1/jobs/{job_id}"),
        ]:
            response = globex.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["code"] == "job_not_found"
        assert wait(acme, job_id)["state"] == "done"
    with server.client(tenant=None) as anonymous:
        assert anonymous.get(f"/v1/jobs/{job_id}").status_code == 401
    with httpx.Client(base_url=server.url, headers={"X-API-Key": "guess"}) as wrong:
        response = wrong.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "content,status,code",
    [
        (b"", 400, "empty_input"),
        (b"definitely not a video " * 200, 415, "not_a_video"),
        (b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 4000, 422, "corrupt_video"),
    ],
)
def test_bad_upload_is_refused_and_the_server_keeps_serving(
    server, short_clip, tmp_path, content, status, code
):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    with server.client() as client:
        response = submit(client, bad)
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
        good = submit(client, short_clip, seed=11)
        assert good.status_code == 202
        assert wait(client, good.json()["job_id"])["state"] == "done"


def test_invalid_requests_get_clear_errors(server, short_clip):
    with server.client() as client, open(short_clip, "rb") as handle:
        response = client.post(
            "/v1/jobs",
            files={"video": ("c.mp4", handle, "video/mp4")},
            data={"request": json.dumps({"prompt": "x", "styles": ["moonwalk"]})},
        )
        assert response.status_code == 422 and "exaggerate" in response.json()["error"]["message"]
        handle.seek(0)
        response = client.post(
            "/v1/jobs",
            files={"video": ("c.mp4", handle, "video/mp4")},
            data={"request": json.dumps({"prompt": "x", "preset": "naive"})},
        )
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_preset"
        response = client.post("/v1/jobs", content=b"raw", headers={"content-type": "video/mp4"})
        assert response.status_code == 415
        assert client.get("/v1/jobs/" + "0" * 32).status_code == 404


def test_s3_input_from_an_allowed_bucket_only(server, short_clip, moto_s3):
    moto_s3.client().upload_file(str(short_clip), moto_s3.bucket, "inputs/short.mp4")
    body = json.loads(job_request(seed=21))
    with server.client() as client:
        response = client.post(
            "/v1/jobs", json={**body, "input": f"s3://{moto_s3.bucket}/inputs/short.mp4"}
        )
        assert response.status_code == 202, response.text
        assert wait(client, response.json()["job_id"])["state"] == "done"
        response = client.post("/v1/jobs", json={**body, "input": "s3://someone-else/v.mp4"})
        assert response.status_code == 403
        response = client.post("/v1/jobs", json={**body, "input": "https://example.com/v.mp4"})
        assert response.status_code == 403


def test_burst_beyond_the_limit_gets_503_and_loses_nothing(server, short_clip):
    def post(seed: int) -> httpx.Response:
        with server.client() as client:
            return submit(client, short_clip, seed=100 + seed)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    accepted = [r for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code == 503]
    assert len(accepted) + len(refused) == 8, [r.text for r in responses]
    assert refused, "8 jobs at once on a limit of 3 must be refused in part"
    assert all(int(r.headers["retry-after"]) > 0 for r in refused)
    with server.client() as client:
        for response in accepted:
            assert wait(client, response.json()["job_id"])["state"] == "done"


def test_cancel_stops_the_job_and_frees_its_input(server, short_clip, moto_s3):
    with server.client() as client:
        job_id = submit(client, short_clip, seed=91, chunk_frames=2, steps=12).json()["job_id"]
        wait(client, job_id, until=lambda s: s["state"] == "running")
        response = client.delete(f"/v1/jobs/{job_id}")
        assert response.status_code == 200 and response.json()["state"] == "cancelled"
        assert client.get(f"/v1/jobs/{job_id}/result").status_code == 409
        status = client.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "cancelled"
    listed = moto_s3.client().list_objects_v2(Bucket=moto_s3.bucket, Prefix="")
    inputs = [o["Key"] for o in listed.get("Contents", []) if job_id in o["Key"]]
    assert not any(key.endswith("/input") for key in inputs), inputs


def test_a_submit_and_cancel_loop_leaves_no_work_behind(server, short_clip):
    """Cancelled jobs stop costing: 20 jobs submitted and cancelled while their chunks are in
    the diffusion stage leave nothing for the replica to run, so a small job right after runs
    as fast as on the idle server. (Before cancellation reached the replica, a job behind such
    a loop made no progress for minutes.) The queue itself emptying within 5 s of a cancel is
    checked at the replica in tests/serve/test_diffusion_cancel.py."""
    slow = {"chunk_frames": 2, "steps": 12}  # many chunks, long batches: work to pile up

    def small_job_seconds(client: httpx.Client, seed: int) -> float:
        started = time.monotonic()
        job_id = submit(client, short_clip, seed=seed).json()["job_id"]
        status = wait(client, job_id)
        assert status["state"] == "done", status["error"]
        return time.monotonic() - started

    with server.client() as client:
        idle_s = small_job_seconds(client, seed=300)
        for seed in range(301, 321):
            response = submit(client, short_clip, seed=seed, **slow)
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            wait(client, job_id, until=lambda s: s["state"] != "queued")
            cancelled = client.delete(f"/v1/jobs/{job_id}")
            assert cancelled.json()["state"] == "cancelled", cancelled.text
        after_s = small_job_seconds(client, seed=322)
    print(f"small job: {idle_s:.1f} s idle, {after_s:.1f} s after 20 cancelled jobs")
    # A ratio within one run; the slack absorbs a shared machine's noise, not a queue of 20
    # jobs' chunks (minutes).
    assert after_s <= 2 * idle_s + 5, (idle_s, after_s)


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


def test_prometheus_metrics_are_exported(server):
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    wanted = {
        "ray_motionserve_jobs_total": {"state": "done"},
        "ray_motionserve_work_units_total": {},
        "ray_motionserve_cpu_seconds_total": {},
        "ray_motionserve_dollars_total": {"pricing": "spot"},
        "ray_motionserve_cache_hits_total": {"stage": "segment"},
        "ray_motionserve_stage_seconds_count": {"stage": "diffusion"},
        "ray_motionserve_batch_size_count": {},
        "ray_motionserve_jobs_active": {},
        "ray_motionserve_jobs_rejected_total": {},
    }
    deadline = time.monotonic() + 120
    while True:
        text = httpx.get(url, timeout=10).text
        missing = [name for name in wanted if name not in text]
        if not missing:
            break
        assert time.monotonic() < deadline, f"metrics never exported: {missing}"
        time.sleep(1)  # Ray's agent exports on an interval; poll until the samples appear
    assert metric_total(text, "ray_motionserve_jobs_total", state="done") >= 5
    assert metric_total(text, "ray_motionserve_work_units_total") > 0
    # Everything ran on CPU: no GPU second is billed, so the GPU counter has no sample yet.
    assert metric_total(text, "ray_motionserve_gpu_seconds_total") == 0
    assert metric_total(text, "ray_motionserve_cache_hits_total", stage="segment") >= 2
    assert metric_total(text, "ray_motionserve_batch_size_count") >= 1
    assert metric_total(text, "ray_motionserve_jobs_rejected_total") >= 1


def test_a_diffusion_replica_killed_mid_job_does_not_fail_the_job(server, short_clip):
    # As a spot GPU node lost under a running job: Serve replaces the replica and re-sends the
    # requests it held (a chunk whose result is lost anyway is run again by the orchestrator,
    # see tests/unit/test_orchestrator.py); the job finishes in its first attempt.
    (victim,) = server.replica_pids("Diffusion")
    with server.client() as client:
        job_id = submit(client, short_clip, seed=88, chunk_frames=2, steps=12).json()["job_id"]
        # After the first checkpoint the next chunks (4 in flight) are in the diffusion stage.
        wait(client, job_id, until=lambda s: len(s["checkpointed_chunks"]) >= 1)
        os.kill(victim, signal.SIGKILL)
        status = wait(client, job_id)
    assert status["state"] == "done" and status["attempts"] == 1, status["error"]
    assert server.replica_pids("Diffusion") not in ([], [victim])  # a new replica served it
    plan = status["report"]["plan"]
    assert plan["work_units"] == plan["predicted_work_units"]  # every chunk billed once


def reference_images(folder) -> dict[str, tuple[bytes, int, str]]:
    """Bad reference images -> (bytes, status, code) the API must answer with."""
    import io
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    def encoded(image, fmt: str, **kw) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kw)
        return buffer.getvalue()

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    frames = [Image.fromarray(np.full((80, 80, 3), v, np.uint8)) for v in (0, 128, 255)]
    return {
        "random": (np.random.default_rng(3).bytes(5000), 415, "not_an_image"),
        "one pixel": (encoded(Image.new("RGB", (1, 1)), "PNG"), 422, "invalid_setting"),
        "20000x20000 header": (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b""),
            413,
            "limit_exceeded",
        ),
        "animated gif": (
            encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
            415,
            "not_an_image",
        ),
    }


def test_reference_images_bad_ones_refused_good_one_anchors_the_job(
    server, short_clip, moto_s3, tmp_path
):
    import numpy as np
    from PIL import Image

    s3 = moto_s3.client()

    def stored_keys() -> set[str]:
        listed = s3.list_objects_v2(Bucket=moto_s3.bucket, Prefix="")
        return {o["Key"] for o in listed.get("Contents", []) if "/jobs/" in o["Key"]}

    def post(client, path: str, reference: bytes, seed: int = 41) -> httpx.Response:
        with open(short_clip, "rb") as handle:
            return client.post(
                path,
                files={
                    "video": ("clip.mp4", handle, "video/mp4"),
                    "reference": ("ref.png", reference, "image/png"),
                },
                data={"request": job_request(seed, chunk_frames=8)},
            )

    body = json.loads(job_request(seed=41))
    s3.upload_file(str(short_clip), moto_s3.bucket, "inputs/ref-clip.mp4")
    video_uri = f"s3://{moto_s3.bucket}/inputs/ref-clip.mp4"
    with server.client() as client:
        before = stored_keys()
        for name, (content, status, code) in reference_images(tmp_path).items():
            for path in ("/v1/jobs", "/v1/previews"):
                response = post(client, path, content)
                assert response.status_code == status, (name, path, response.text)
                assert response.json()["error"]["code"] == code, (name, response.text)
            key = f"refs/{name.replace(' ', '-')}"
            s3.put_object(Bucket=moto_s3.bucket, Key=key, Body=content)
            reference = f"s3://{moto_s3.bucket}/{key}"
            response = client.post(
                "/v1/jobs", json={**body, "input": video_uri, "reference": reference}
            )
            assert response.status_code == status, (name, "s3", response.text)
        foreign = {**body, "input": video_uri, "reference": "s3://someone-else/ref.png"}
        response = client.post("/v1/jobs", json=foreign)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "forbidden_input"
        assert not stored_keys() - before  # nothing half-written

        pixels = np.random.default_rng(5).integers(0, 256, (100, 80, 3), dtype=np.uint8)
        good = tmp_path / "good.png"
        Image.fromarray(pixels).save(good)
        response = post(client, "/v1/jobs", good.read_bytes())
        assert response.status_code == 202, response.text
        status = wait(client, response.json()["job_id"])
        assert status["state"] == "done", status
        plan = status["report"]["plan"]
        # the reference once (its keyframe), the keyframe once per chunk of 8 frames
        assert plan["work_units"]["vae_encodes"] == 1 + 3
        assert plan["work_units"] == plan["predicted_work_units"]
        assert any("reference" in line for line in status["report"]["plan_explained"])
        repeat = post(client, "/v1/jobs", good.read_bytes())
        again = wait(client, repeat.json()["job_id"])
        assert again["state"] == "done"
        assert again["report"]["plan"]["work_units"]["unet_evals"] == 0  # a full cache hit
        preview = post(client, "/v1/previews", good.read_bytes())
        assert preview.status_code == 202, preview.text
