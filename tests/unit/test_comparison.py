"""source | edited skeleton | generated, on the result's timeline (deployments/comparison.py).

Each input video's frame k is a flat grey whose level says k, so the output's panels tell which
frame of which input landed on which output frame. Read back with ffprobe and PyAV.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from deployments import video
from deployments.comparison import compose_comparison, panel_size


def flat_video(path, frames: int, fps: float, width: int, height: int, step: int, halves=False):
    """Frame k: grey level 40 + step * k (the right half only when `halves`, the left black)."""
    levels = 40 + step * np.arange(frames)
    rgb = np.zeros((frames, height, width, 3), dtype=np.uint8)
    if halves:
        rgb[:, :, width // 2 :] = levels[:, None, None, None]
    else:
        rgb[:] = levels[:, None, None, None]
    video.encode_mp4(rgb, path, video.EncodeSettings(fps=fps, crf=0))
    return path


def ffprobe_video(path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_streams",
         "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)["streams"][0]


def level(frame: np.ndarray, index: int, width: int) -> float:
    """Mean grey of panel `index`'s lower right quarter (away from the label)."""
    panel = frame[:, index * width : (index + 1) * width]
    height = panel.shape[0]
    return float(panel[height // 2 :, width // 2 :].mean())


@pytest.fixture
def inputs(tmp_path):
    source = flat_video(tmp_path / "source.mp4", 20, 10, 320, 180, 10)  # 2 s at 10 fps
    # The preview: 1 s at 12 fps, generation size 64x36 side by side; shorter than the result
    # (as after a faster retime), so its last frame is held for the last output frames.
    preview = flat_video(tmp_path / "preview.mp4", 12, 12, 128, 36, 15, halves=True)
    result = flat_video(tmp_path / "result.mp4", 30, 25, 128, 72, 6)  # 1.2 s at 25 fps
    return source, preview, result


def test_three_panels_on_the_results_timeline(tmp_path, inputs):
    source, preview, result = inputs
    out = tmp_path / "side_by_side.mp4"
    written = compose_comparison(source, preview, result, out, max_height=48, crf=0)
    width, height = panel_size(128, 72, 48)
    assert (width, height) == (86, 48) and written.frames == 30 and written.fps == 25
    stream = ffprobe_video(out)
    assert (stream["width"], stream["height"]) == (3 * width, height)
    assert int(stream["nb_read_frames"]) == int(ffprobe_video(result)["nb_read_frames"]) == 30
    assert stream["avg_frame_rate"] == stream["r_frame_rate"] == "25/1"
    frames = video.decode_all(out, video.DecodeSettings(fps=25, width=3 * width, height=height))
    assert len(frames) == 30
    # each input's frames as decoded (after one encode): which of them does each panel show?
    src, prev, res = (levels(path, right=path == preview) for path in (source, preview, result))
    assert len(src) == 20 and len(prev) == 12 and len(res) == 30
    # a second encode darkens by ~2% (limited-range YUV); frame 0 shows frame 0 of each input
    gain = [
        level(frames[0], panel, width) / inputs[0] for panel, inputs in enumerate((src, prev, res))
    ]
    for i, frame in enumerate(frames):
        t = i / 25
        expected = (
            min(int(t * 10 + 1e-9), 19),  # the source's frame at the output frame's time
            min(int(t * 12 + 1e-9), 11),  # the preview's (edited half), its last one held
            i,  # the result's own, frame for frame
        )
        found = tuple(
            int(np.argmin(np.abs(np.array(inputs) * gain[panel] - level(frame, panel, width))))
            for panel, inputs in enumerate((src, prev, res))
        )
        assert found == expected, (i, found, expected)


def levels(path, right: bool) -> list[float]:
    info = video.probe(path)
    settings = video.DecodeSettings(fps=info.fps, width=info.width, height=info.height)
    frames = video.decode_all(path, settings, info=info)
    return [float(f[:, f.shape[1] // 2 :].mean() if right else f.mean()) for f in frames]


def test_panel_size_keeps_the_aspect_with_even_sides():
    assert panel_size(1024, 576) == (640, 360)
    assert panel_size(128, 72, 480) == (128, 72)  # never enlarged
    assert panel_size(1080, 1920, 360) == (202, 360)
