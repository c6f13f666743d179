"""The consistency metric (deployments/consistency.py) on synthetic clips, its cache, and the
`motionserve consistency` command (in process through `cli.main`, tests/cli.py)."""

from __future__ import annotations

import json
from fractions import Fraction

import cv2
import numpy as np
import pytest

from deployments import consistency as metric
from deployments.consistency import ConsistencySettings, measure_frames, measure_video, seam_changes
from deployments.interpolate import FrameRetimer
from deployments.video import EncodeSettings, encode_mp4
from serve import cli
from serve.config import AppArgs
from serve.factory import stage_context
from serve.pipeline import Plan
from serve.presets import PRESETS
from serve.stages import consistency_of_file

WIDTH, HEIGHT, SPEED = 192, 112, 2  # a textured picture panning SPEED px per frame


def texture(seed: int, frames: int) -> np.ndarray:
    """Smooth random colour texture wide enough to pan across for `frames` frames."""
    rng = np.random.default_rng(seed)
    width = WIDTH + SPEED * frames
    coarse = rng.integers(0, 256, (HEIGHT // 4, width // 4 + 1, 3), dtype=np.uint8)
    fine = cv2.resize(coarse, ((width // 4 + 1) * 4, HEIGHT), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(fine, (0, 0), 1.5)


def clip(frames: int = 64, cut_every: int | None = None, flicker: float = 0.0) -> np.ndarray:
    """A smooth pan; with `cut_every`, a new picture every that many frames (a hard cut, as
    when a chunk does not continue the one before); with `flicker`, per-pixel noise of that
    standard deviation (grey levels) added to every frame independently."""
    rng = np.random.default_rng(99)
    pictures: dict[int, np.ndarray] = {}
    out = []
    for i in range(frames):
        scene = i // cut_every if cut_every else 0
        if scene not in pictures:
            pictures[scene] = texture(scene + 1, frames)
        frame = pictures[scene][:, SPEED * i : SPEED * i + WIDTH].astype(np.float32)
        if flicker:
            frame += rng.normal(0.0, flicker, frame.shape)
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(out)


def encoded(tmp_path, name: str, frames: np.ndarray, fps: float = 12.0):
    path = tmp_path / f"{name}.mp4"
    encode_mp4(frames, path, EncodeSettings(fps=fps, crf=12))
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("consistency")
    return {
        "smooth": encoded(folder, "smooth", clip()),
        "cut": encoded(folder, "cut", clip(cut_every=16)),
    }


def test_smooth_clip_has_no_seam_and_hard_cuts_every_chunk_do(clips):
    smooth = measure_video(clips["smooth"], ConsistencySettings(chunk_frames=16))
    cut = measure_video(clips["cut"], ConsistencySettings(chunk_frames=16))
    assert smooth.frames == cut.frames == 64 and smooth.fps == 12
    assert smooth.boundaries == cut.boundaries == 3  # after frames 15, 31, 47
    assert smooth.seam_ratio == pytest.approx(1.0, abs=0.05)
    assert cut.seam_ratio > 1.8
    # The flow explains a pan (a small residual); it cannot explain a new picture.
    assert smooth.warp_error < 0.1 * smooth.frame_change
    assert cut.warp_error > 5 * smooth.warp_error


def test_warp_error_rises_with_flicker(tmp_path):
    errors = [
        measure_video(encoded(tmp_path, f"f{amount}", clip(32, flicker=amount))).warp_error
        for amount in (0.0, 3.0, 10.0)
    ]
    assert errors[0] < errors[1] < errors[2]
    assert errors[2] > 5 * errors[0]


def test_chunk_boundaries_are_placed_by_time_after_interpolation():
    """Generated at 12 fps in chunks of 16, delivered at 25 fps by the interpolation stage: the
    seams sit at generated-frame times, not every 16 output frames."""
    smooth, cut = (
        np.stack(list(FrameRetimer(12, 25).run([frames])))
        for frames in (clip(96), clip(96, cut_every=16))
    )
    assert len(cut) == 200
    by_time = ConsistencySettings(chunk_frames=16, generation_fps=12)
    assert measure_frames(smooth, 25, by_time).seam_ratio == pytest.approx(1.0, abs=0.05)
    seams = measure_frames(cut, 25, by_time)
    assert seams.boundaries == 5 and seams.seam_ratio > 1.8
    # Counting 16 delivered frames per chunk misses them.
    assert measure_frames(cut, 25, ConsistencySettings(chunk_frames=16)).seam_ratio < 1.2


def test_seam_changes_weigh_pairs_by_their_time_in_each_interval():
    # Same rate: one pair per generated interval; boundaries after intervals 3 and 7.
    changes = [1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 5.0, 1.0]
    assert seam_changes(changes, Fraction(12), Fraction(12), 4) == (5.0, 1.0, 2)
    # 24 fps from 12: two pairs per interval, their changes add up.
    assert seam_changes([1.0] * 8, Fraction(24), Fraction(12), 2) == (2.0, 2.0, 2)
    # 25 fps from 12: a pair straddling two intervals is shared by time; a uniform change
    # gives every interval the same total (25/12 pairs' worth).
    across, within, count = seam_changes([1.0] * 49, Fraction(25), Fraction(12), 16)
    assert across == pytest.approx(25 / 12) and within == pytest.approx(25 / 12)
    assert count == 1  # 49 pairs span 1.96 s: 23 whole intervals, one boundary after the 16th
    assert seam_changes([], Fraction(25), Fraction(12), 16) == (None, None, 0)


def test_still_and_single_frame_clips():
    still = np.full((20, 64, 64, 3), 128, dtype=np.uint8)
    figures = measure_frames(still, 12, ConsistencySettings(chunk_frames=4))
    assert figures.seam_ratio == 1.0 and figures.warp_error == 0.0 and figures.boundaries == 4
    single = measure_frames(still[:1], 12, ConsistencySettings())
    assert single.frames == 1 and single.warp_error is None and single.seam_ratio is None


def test_figures_are_cached_by_content(clips, tmp_path, monkeypatch):
    ctx = stage_context(AppArgs(storage_uri=str(tmp_path / "store")))
    settings = ConsistencySettings(chunk_frames=16)
    first, hit = consistency_of_file(ctx, clips["cut"], settings)
    assert not hit

    def no_measuring(*args, **kwargs):
        raise AssertionError("a cached video must not be measured again")

    monkeypatch.setattr(metric, "measure_video", no_measuring)
    copy = tmp_path / "same-bytes.mp4"
    copy.write_bytes(clips["cut"].read_bytes())
    again, hit = consistency_of_file(ctx, copy, settings)
    assert hit and again == first
    with pytest.raises(AssertionError):  # other settings are another measurement
        consistency_of_file(ctx, copy, ConsistencySettings(chunk_frames=8))


# --- the command -------------------------------------------------------------------------


def consistency_command(motionserve, cache_dir, *args: str):
    env = {"MOTIONSERVE_CACHE_DIR": str(cache_dir), "MOTIONSERVE_STORAGE_URI": None}
    return motionserve("consistency", *args, env=env)


def test_command_prints_figures_and_caches_them(motionserve, clips, tmp_path):
    args = [str(clips["cut"]), "--source", str(clips["smooth"]), "--json"]
    result = consistency_command(motionserve, tmp_path, *args)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["settings"]["chunk_frames"] == Plan.model_fields["chunk_frames"].default
    assert doc["settings"]["generation_fps"] == PRESETS["standard"].generation_fps
    assert doc["output"]["seam_ratio"] > 1.8 and not doc["output"]["cache_hit"]
    assert doc["source"]["seam_ratio"] == pytest.approx(1.0, abs=0.05)
    assert doc["output"]["warp_error"] > doc["source"]["warp_error"]

    again = json.loads(consistency_command(motionserve, tmp_path, *args).stdout)
    assert again["output"]["cache_hit"] and again["source"]["cache_hit"]
    assert again["output"]["seam_ratio"] == doc["output"]["seam_ratio"]

    text = consistency_command(motionserve, tmp_path, str(clips["cut"]), "--chunk-frames", "8")
    assert text.returncode == 0, text.stderr
    assert "seam ratio" in text.stdout and "(7 boundaries)" in text.stdout


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["NOT_A_VIDEO"], "not a video"),
        (["MISSING"], "No such file"),
        (["SMOOTH", "--chunk-frames", "0"], "chunk_frames"),
        (["SMOOTH", "--generation-fps", "-12"], "generation_fps"),
        (["SMOOTH", "--source", "NOT_A_VIDEO"], "not a video"),
    ],
)
def test_command_bad_input_is_one_line(clips, tmp_path, monkeypatch, capsys, args, phrase):
    monkeypatch.setenv("MOTIONSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MOTIONSERVE_STORAGE_URI", raising=False)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"hello " * 100)
    paths = {"NOT_A_VIDEO": str(junk), "MISSING": str(tmp_path / "gone.mp4"),
             "SMOOTH": str(clips["smooth"])}  # fmt: skip
    assert cli.main(["consistency", *(paths.get(a, a) for a in args)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0], captured.err
    assert lines[0].startswith("motionserve consistency: error: ") and not captured.out
