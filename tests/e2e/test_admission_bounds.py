"""A real `motionserve serve`: a burst never gets more jobs in flight than `max_active_jobs`
(3 here), and output bounds are enforced at submission while a 1 fps job makes a valid MP4."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx

from tests.e2e.test_http_jobs import ffprobe, job_request, submit, wait

LIMIT = 3  # max_active_jobs of the e2e server (tests/e2e/conftest.py)


def test_a_burst_of_12_never_exceeds_the_limit(server, short_clip):
    peak, done = [0], threading.Event()

    def watch_readiness():
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not done.is_set():
                active = client.get("/readyz").json()["active_jobs"]
                peak[0] = max(peak[0], active)
                done.wait(0.05)  # the polling interval of a client watching /readyz

    def post(seed: int) -> httpx.Response:
        with server.client() as client:
            return submit(client, short_clip, seed=1900 + seed)

    watcher = threading.Thread(target=watch_readiness)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(post, range(12)))
        accepted = [r for r in responses if r.status_code == 202]
        refused = [r for r in responses if r.status_code == 503]
        assert len(accepted) + len(refused) == 12, [r.text for r in responses]
        assert 1 <= len(accepted) <= LIMIT
        assert all(int(r.headers["retry-after"]) > 0 for r in refused)
        with server.client() as client:
            for response in accepted:
                assert wait(client, response.json()["job_id"])["state"] == "done"
    finally:
        done.set()
        watcher.join()
    assert peak[0] <= LIMIT
    with server.client() as client:
        assert client.get("/readyz").json()["active_jobs"] == 0


def test_output_bounds_are_enforced_at_submission_and_1_fps_works(server, short_clip, tmp_path):
    with server.client() as client:
        with open(short_clip, "rb") as handle:
            refused = client.post(
                "/v1/jobs",
                files={"video": ("clip.mp4", handle, "video/mp4")},
                data={"request": json.dumps({"prompt": "x", "output": {"fps": 0.5}})},
            )
        assert refused.status_code == 422
        assert "from 1 to 60" in refused.json()["error"]["message"]
        estimate = client.post(
            "/v1/estimate",
            json={"duration_s": 10, "width": 340, "height": 256,
                  "request": {"prompt": "x", "output": {"fps": 1e-10}}},
        )  # fmt: skip
        assert estimate.status_code == 422 and "from 1 to 60" in estimate.text

        with open(short_clip, "rb") as handle:
            body = json.loads(job_request(seed=1919))
            body["output"] = {"fps": 1}
            accepted = client.post(
                "/v1/jobs",
                files={"video": ("clip.mp4", handle, "video/mp4")},
                data={"request": json.dumps(body)},
            )
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        assert wait(client, job_id)["state"] == "done"
        result = tmp_path / "result.mp4"
        result.write_bytes(client.get(f"/v1/jobs/{job_id}/result").content)
    (video,) = [s for s in ffprobe(result)["streams"] if s["codec_type"] == "video"]
    assert video["codec_name"] == "h264" and video["r_frame_rate"] == "1/1"
    assert int(video["nb_read_frames"]) == 2  # 2 s of input at 1 fps
