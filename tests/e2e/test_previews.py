"""The CPU motion preview over HTTP against a real `motionserve serve`: no diffusion at all, an
MP4 an independent reader accepts, the cache the next job hits, the jobs' 4xx, tenancy."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.e2e.test_http_jobs import TERMINAL, ffprobe, job_request, submit, wait


@pytest.fixture(scope="module")
def short_clip(short_clip, tmp_path_factory):
    """The short clip mirrored (same size, length and audio, other content): this module's own
    input on the shared server, so nothing another module computed is a cache hit here; the
    preview below is what fills the cache its job hits."""
    from deployments.video import DecodeSettings, EncodeSettings, decode_all, encode_mp4

    frames = decode_all(short_clip, DecodeSettings(fps=25, width=640))
    path = tmp_path_factory.mktemp("previews") / "mirrored.mp4"
    encode_mp4(frames[:, :, ::-1].copy(), path, EncodeSettings(fps=25, audio_from=str(short_clip)))
    return path


def submit_preview(client: httpx.Client, video, **overrides) -> httpx.Response:
    with open(video, "rb") as handle:
        return client.post(
            "/v1/previews",
            files={"video": ("clip.mp4", handle, "video/mp4")},
            data={"request": job_request(**overrides)},
        )


def wait_preview(client: httpx.Client, preview_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/previews/{preview_id}").json()
        if status["state"] in TERMINAL:
            return status
        time.sleep(0.25)  # polling the HTTP API is how a client waits; no event to block on
    raise TimeoutError(f"preview {preview_id}: {status}")


def test_preview_runs_no_gpu_work_and_fills_the_cache_the_job_hits(server, short_clip, tmp_path):
    with server.client() as client:
        accepted = submit_preview(client, short_clip)
        assert accepted.status_code == 202, accepted.text
        preview_id = accepted.json()["preview_id"]
        status = wait_preview(client, preview_id)
        assert status["state"] == "done", status

        report = status["report"]
        assert report["kind"] == "preview"
        preview = report["preview"]
        assert preview["work_units"]["unet_evals"] == 0 and preview["gpu_seconds"] == 0
        assert {r["stage"] for r in status["ledger"]} == {"decode", "pose", "motion", "preview"}
        assert not any(r["cache_hit"] for r in status["ledger"]), status["ledger"]  # all computed
        assert all(r["gpu_s"] == 0 and r["device"] == "cpu" for r in status["ledger"])
        estimate = report["estimate"]  # the full job: 2 s at 12 fps = 24 generated frames
        assert estimate["plan"]["generated_frames"] == 24
        assert 0 < estimate["plan"]["work_units"] < estimate["naive"]["work_units"]
        assert estimate["plan"]["dollars"]["spot"] > 0

        assert status["anchor_url"] is None  # not asked for
        missing = client.get(f"/v1/previews/{preview_id}/anchor")
        assert missing.status_code == 404, missing.text
        assert missing.json()["error"]["code"] == "anchor_not_requested"

        video = client.get(status["video_url"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        out = tmp_path / "preview.mp4"
        out.write_bytes(video.content)
        stream = next(s for s in ffprobe(out)["streams"] if s["codec_type"] == "video")
        # generation: 128 x 72 at 12 fps (FAST_OVERRIDES, draft); side by side: 2 x 128 wide
        assert (stream["width"], stream["height"]) == (2 * 128, 72)
        assert stream["r_frame_rate"] == "12/1" and int(stream["nb_read_frames"]) == 24

        job = submit(client, short_clip)
        assert job.status_code == 202, job.text
        done = wait(client, job.json()["job_id"])
        assert done["state"] == "done", done
        hits = {s["stage"]: (s["calls"], s["cache_hits"]) for s in done["report"]["plan"]["stages"]}
        assert hits["decode"] == hits["pose"] == hits["motion"] == (1, 1), hits
        assert done["report"]["plan"]["work_units"]["unet_evals"] > 0

        # each kind only under its own routes; another tenant sees neither
        job_id = job.json()["job_id"]
        assert client.get(f"/v1/jobs/{preview_id}").status_code == 404
        assert client.get(f"/v1/previews/{job_id}").status_code == 404
        assert client.get(f"/v1/previews/{job_id}/video").status_code == 404
    with server.client("globex") as other:
        for path in (f"/v1/previews/{preview_id}", f"/v1/previews/{preview_id}/video"):
            response = other.get(path)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "preview_not_found"
        assert other.delete(f"/v1/previews/{preview_id}").status_code == 404


def post_preview(client: httpx.Client, video, body: dict) -> httpx.Response:
    with open(video, "rb") as handle:
        return client.post(
            "/v1/previews",
            files={"video": ("clip.mp4", handle, "video/mp4")},
            data={"request": json.dumps(body)},
        )


def test_anchor_frame_preview_is_generated_once_and_the_job_takes_it(server, short_clip):
    import io

    from PIL import Image

    anchored = json.loads(job_request(seed=11, anchor="first_keyframe"))
    with server.client() as client:
        # No anchor attention, no anchor keyframe: refused before anything runs.
        plain = {**json.loads(job_request(seed=11)), "frames": "anchor"}
        refused = post_preview(client, short_clip, plain)
        assert refused.status_code == 422, refused.text
        assert "anchor attention" in refused.json()["error"]["message"]

        accepted = post_preview(client, short_clip, {**anchored, "frames": "anchor"})
        assert accepted.status_code == 202, accepted.text
        status = wait_preview(client, accepted.json()["preview_id"])
        assert status["state"] == "done", status
        preview = status["report"]["preview"]
        assert preview["generated_frames"] == 1  # one GPU frame: the keyframe
        assert preview["work_units"]["unet_evals"] > 0
        assert preview["work_units"] == preview["predicted_work_units"]
        generated = [r for r in status["ledger"] if r["stage"] == "diffusion"]
        assert len(generated) == 1 and generated[0]["chunk"] is None
        assert not generated[0]["cache_hit"] and generated[0]["frames"] == 1
        assert any("anchor keyframe" in note for note in generated[0]["notes"])
        png = client.get(status["anchor_url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (128, 72)  # the generation size

        # The job with the same settings takes the keyframe from the cache: billed once.
        with open(short_clip, "rb") as handle:
            job = client.post(
                "/v1/jobs",
                files={"video": ("clip.mp4", handle, "video/mp4")},
                data={"request": json.dumps(anchored)},
            )
        assert job.status_code == 202, job.text
        done = wait(client, job.json()["job_id"])
        assert done["state"] == "done", done
        keyframe = [r for r in done["ledger"] if r["stage"] == "diffusion" and r["chunk"] is None]
        assert len(keyframe) == 1 and keyframe[0]["cache_hit"], keyframe
        plan = done["report"]["plan"]
        billed, predicted = plan["work_units"], plan["predicted_work_units"]
        for name, paid_by_preview in preview["work_units"].items():  # every count and unit
            assert billed[name] == pytest.approx(predicted[name] - paid_by_preview), name


def _bad_bodies(short_clip, moto_s3):
    """(name, httpx keyword arguments) of requests both POST routes must refuse."""
    good = json.loads(job_request())
    clip = short_clip.read_bytes()
    upload = lambda content, request=good: {  # noqa: E731
        "files": {"video": ("clip.mp4", content, "video/mp4")},
        "data": {"request": request if isinstance(request, str) else json.dumps(request)},
    }
    return [
        ("empty upload", upload(b"")),
        ("not a video", upload(b"hello " * 100)),
        ("truncated", upload(clip[: len(clip) // 3])),
        ("missing video", {"data": {"request": json.dumps(good)}, "files": {"x": ("a", b"1")}}),
        ("unknown style", upload(clip, {**good, "styles": ["moonwalk"]})),
        ("naive preset", upload(clip, {**good, "preset": "naive"})),
        ("bad json field", upload(clip, "{")),
        ("not multipart nor json", {"content": b"raw", "headers": {"content-type": "text/plain"}}),
        ("invalid json", {"content": b"{", "headers": {"content-type": "application/json"}}),
        ("no input", {"json": good}),
        ("http input", {"json": {**good, "input": "https://example.com/a.mp4"}}),
        ("other bucket", {"json": {**good, "input": "s3://someone-else/a.mp4"}}),
        ("missing object", {"json": {**good, "input": f"s3://{moto_s3.bucket}/nope.mp4"}}),
    ]


def test_bad_preview_inputs_get_the_same_4xx_as_jobs(server, short_clip, moto_s3):
    with server.client() as client:
        for name, kwargs in _bad_bodies(short_clip, moto_s3):
            answers = {}
            for path in ("/v1/jobs", "/v1/previews"):
                response = client.post(path, **kwargs)
                answers[path] = (response.status_code, response.json()["error"]["code"])
            assert answers["/v1/jobs"] == answers["/v1/previews"], (name, answers)
            assert 400 <= answers["/v1/jobs"][0] < 500, (name, answers)


def test_preview_of_an_s3_input(server, short_clip, moto_s3):
    key = "inputs/preview-clip.mp4"
    moto_s3.client().upload_file(str(short_clip), moto_s3.bucket, key)
    body = {**json.loads(job_request()), "input": f"s3://{moto_s3.bucket}/{key}"}
    with server.client() as client:
        accepted = client.post("/v1/previews", json=body)
        assert accepted.status_code == 202, accepted.text
        status = wait_preview(client, accepted.json()["preview_id"])
    assert status["state"] == "done", status
    assert status["report"]["preview"]["gpu_seconds"] == 0


@pytest.mark.parametrize("path", ["/v1/previews/" + "0" * 32, "/v1/previews/not-an-id/video"])
def test_unknown_previews_are_404(server, path):
    with server.client() as client:
        response = client.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "preview_not_found"
