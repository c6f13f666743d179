"""The `motionserve` command: in this process through `serve.cli.main` (tests/cli.py), and
once as the installed console script in a real process (the entry point itself)."""

from __future__ import annotations

import json
import subprocess
import sysconfig
from pathlib import Path

import cv2
import pytest

from deployments.video import DecodeSettings, decode_all
from tests.cli import assert_user_error


def test_the_console_script_runs_main_and_exits_with_its_status(sample_video, tmp_path):
    """The installed `motionserve` executable (pyproject's [project.scripts]) in a process of
    its own: output on stdout, a user error as exit status 2 with one line on stderr."""
    script = Path(sysconfig.get_path("scripts")) / "motionserve"
    assert script.is_file(), f"{script}: the console script is not installed"
    result = subprocess.run([str(script), "probe", str(sample_video)], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["codec"] == "vp9"
    result = subprocess.run([str(script), "probe", str(tmp_path / "nope.mp4")],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert_user_error(result, "no such file")


def test_probe_prints_json(motionserve, sample_video):
    result = motionserve("probe", str(sample_video))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["codec"], info["width"], info["frame_count"]) == ("vp9", 1768, 230)


@pytest.mark.parametrize(
    "content,phrase",
    [(b"", "empty"), (b"hello " * 100, "not a video"), (b"\x00\x00\x00\x18ftypmp42", "truncated")],
)
def test_probe_bad_input_is_one_line(motionserve, tmp_path, content, phrase):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    assert_user_error(motionserve("probe", str(path)), phrase)


def test_pose_then_motion_with_render(motionserve, sample_video, tmp_path):
    poses = tmp_path / "poses.json"
    result = motionserve(
        "pose", str(sample_video), "-o", str(poses), "--fps", "6", "--width", "256"
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(poses.read_text())
    assert doc["format"] == "motionserve.pose/v1" and doc["fps"] == 6
    assert len(doc["frames"]) == 46  # 7.67 s at 6 fps
    present = [f for f in doc["frames"] if f["present"]]
    assert len(present) >= 0.6 * len(doc["frames"])  # two small people; tracking starts late
    assert set(present[0]["keypoints"]) >= {"nose", "left_hip", "right_ankle"}
    assert len(present[0]["landmarks"]) == 33

    edited, maps = tmp_path / "edited.json", tmp_path / "maps.mp4"
    result = motionserve(
        "motion",
        str(poses),
        "--style",
        "smooth",
        "--style",
        "exaggerate=1.3",
        "-o",
        str(edited),
        "--render",
        str(maps),
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads(edited.read_text())["frames"]) == 46
    rendered = decode_all(maps, DecodeSettings(fps=6, width=512))
    assert rendered.shape == (46, 288, 512, 3)
    assert rendered.max() > 200 and (rendered.mean(axis=(1, 2, 3)) < 40).all()  # colour on black


def test_pose_on_images_and_render_to_directory(motionserve, sample_video, tmp_path):
    frames = decode_all(sample_video, DecodeSettings(fps=1, width=384, max_frames=2))
    images = []
    for i, frame in enumerate(frames):
        images.append(tmp_path / f"img{i}.png")
        cv2.imwrite(str(images[-1]), frame[:, :, ::-1])
    poses = tmp_path / "poses.json"
    result = motionserve("pose", *map(str, images), "-o", str(poses))
    assert result.returncode == 0, result.stderr
    assert len(json.loads(poses.read_text())["frames"]) == 2
    out_dir = tmp_path / "maps"
    result = motionserve(
        "motion", str(poses), "-o", str(tmp_path / "e.json"), "--render", str(out_dir)
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["pose_00000.png", "pose_00001.png"]


def test_motion_rejects_bad_style_and_bad_json(motionserve, tmp_path):
    poses = tmp_path / "p.json"
    poses.write_text("{not json")
    assert_user_error(motionserve("motion", str(poses), "-o", str(tmp_path / "o.json")), "not JSON")
    poses.write_text(json.dumps({"format": "motionserve.pose/v1", "frames": "x"}))
    result = motionserve("motion", str(poses), "-o", str(tmp_path / "o.json"))
    assert_user_error(result, "")
    assert not Path(tmp_path / "o.json").exists()


def test_unknown_style_names_the_valid_ones(motionserve, sample_video, tmp_path):
    poses = tmp_path / "p.json"
    motionserve("pose", str(sample_video), "-o", str(poses), "--fps", "2", "--width", "128")
    result = motionserve("motion", str(poses), "--style", "wobble", "-o", str(tmp_path / "o.json"))
    assert_user_error(result, "exaggerate")


def test_missing_file(motionserve, tmp_path):
    assert_user_error(motionserve("probe", str(tmp_path / "nope.mp4")), "no such file")


def test_estimate_predicts_without_running(motionserve, sample_video):
    result = motionserve("estimate", str(sample_video), "--output", "1920x1080@25", "--json")
    assert result.returncode == 0, result.stderr
    estimate = json.loads(result.stdout)
    # 7.67 s at 12 fps, and standard's anchor keyframe (its coherence) generated once
    assert estimate["plan"]["generated_frames"] == 92 + 1
    assert estimate["naive"]["generated_frames"] == 192  # every output frame at 25 fps
    assert estimate["ratio"] >= 20, "naive / standard work units"
    assert any("768x432" in line for line in estimate["plan_explained"])
    bad = motionserve("estimate", str(sample_video), "--output", "1920x1080@fast")
    assert_user_error(bad, "WIDTHxHEIGHT")


def test_interpolate_and_upscale_commands(motionserve, short_clip, tmp_path):
    frames = decode_all(short_clip, DecodeSettings(fps=25, width=320, max_frames=3))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    cv2.imwrite(str(a), frames[0][:, :, ::-1])
    cv2.imwrite(str(b), frames[2][:, :, ::-1])
    mid = tmp_path / "mid.png"
    assert motionserve("interpolate", str(a), str(b), "--t", "0.5", "-o", str(mid)).returncode == 0
    assert cv2.imread(str(mid)).shape == frames[0].shape  # 320x176: height rounded to 8

    retimed = tmp_path / "r.mp4"
    result = motionserve("interpolate", str(short_clip), "--fps", "30", "-o", str(retimed))
    assert result.returncode == 0, result.stderr
    assert len(decode_all(retimed, DecodeSettings(fps=30, width=160))) == 60

    big = tmp_path / "big.png"
    result = motionserve(
        "upscale", str(a), "--size", "1000x562", "--model", "lanczos", "-o", str(big)
    )
    assert result.returncode == 0, result.stderr
    assert cv2.imread(str(big)).shape == (562, 1000, 3)
    assert_user_error(motionserve("upscale", str(a), "-o", str(big)), "--scale or --size")
    assert_user_error(motionserve("interpolate", str(a), "-o", str(mid)), "--fps")


def test_bad_reference_is_one_line_and_writes_nothing(motionserve, short_clip, tmp_path):
    import struct
    import zlib

    random_bytes = tmp_path / "random.png"
    random_bytes.write_bytes(bytes(range(256)) * 8)
    tiny = tmp_path / "tiny.png"
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tiny)
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    idat = b"IDAT"
    huge = tmp_path / "huge.png"
    huge.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
        + struct.pack(">I", 0) + idat + struct.pack(">I", zlib.crc32(idat))
    )  # fmt: skip
    frames = [Image.fromarray(np.full((80, 80, 3), v, np.uint8)) for v in (0, 128, 255)]
    gif = tmp_path / "animated.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    cases = [(random_bytes, "not a PNG, JPEG or WebP"), (tiny, "at least 64 pixels"),
             (huge, "pixels"), (gif, "not a PNG, JPEG or WebP"),
             (tmp_path / "missing.png", "missing.png")]  # fmt: skip
    out = tmp_path / "out.mp4"
    edit = ["edit", str(short_clip), "-o", str(out), "--prompt", "x"]
    # Every bad image through one command, and one bad image through each other command: the
    # three share one check.
    runs = [(edit, image, phrase) for image, phrase in cases] + [
        (["preview", str(short_clip), "-o", str(out)], random_bytes, cases[0][1]),
        (["submit", str(short_clip), "--url", "http://127.0.0.1:9", "--prompt", "x"], gif,
         cases[3][1]),
    ]  # fmt: skip
    for command, image, phrase in runs:
        assert_user_error(motionserve(*command, "--reference", str(image)), phrase)
        assert not out.exists()
