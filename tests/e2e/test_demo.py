"""`make demo` runs `motionserve demo`: the sample clip through a local Ray Serve app over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.e2e.conftest import REPO
from tests.e2e.test_http_jobs import ffprobe


def test_demo_edits_the_sample_through_local_serve_and_prints_the_cost(tmp_path, sample_video):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "serve.cli", "demo", "--output-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "app up in" in out and "/v1/jobs" in out  # it went through Serve's HTTP API
    assert "cost report" in out and "naive" in out
    streams = ffprobe(tmp_path / "edited.mp4")["streams"]
    video = next(s for s in streams if s["codec_type"] == "video")
    assert video["codec_name"] == "h264" and video["avg_frame_rate"] == "25/1"
    source = next(s for s in ffprobe(sample_video)["streams"] if s["codec_type"] == "video")
    assert abs(float(video["duration"]) - float(source["duration"])) < 0.2
    assert any(s["codec_type"] == "audio" for s in streams)  # the source's audio carried over
    # side_by_side.mp4: source | edited skeleton | generated, on the result's timeline
    assert "/v1/previews" in out  # the skeleton panel is the service's own motion preview
    compare = next(s for s in ffprobe(tmp_path / "side_by_side.mp4")["streams"]
                   if s["codec_type"] == "video")  # fmt: skip
    assert compare["codec_name"] == "h264" and compare["avg_frame_rate"] == "25/1"
    assert compare["nb_read_frames"] == video["nb_read_frames"]  # one row per result frame
    width, height = compare["width"], compare["height"]
    assert width % 3 == 0 and height <= video["height"]
    assert abs(width / 3 / height - video["width"] / video["height"]) < 0.02  # 3 panels
    printed = {}  # both paths are printed
    for line in out.splitlines():
        name, _, rest = line.partition(": ")
        if name in ("output", "side by side"):
            printed[name] = rest.split()[0]
    assert printed == {
        "output": str((tmp_path / "edited.mp4").resolve()),
        "side by side": str((tmp_path / "side_by_side.mp4").resolve()),
    }
