"""Video stage: probe, timestamp-exact decode, rotation, fit, encode, and bad input."""

from __future__ import annotations

import json
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from deployments import errors
from deployments.video import (
    DecodeSettings,
    EncodeSettings,
    InputLimits,
    concat_mp4,
    decode_all,
    decode_chunks,
    decoded_frame_count,
    encode_mp4,
    probe,
)
from tests.media import barcode_frame, make_clip, read_barcode


def ffprobe(path: Path) -> dict:
    """The independent reader: Debian's ffprobe, not our PyAV code."""
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def expected_picks(source_times: list[float], fps: float, count: int) -> list[int]:
    """Index of the source frame on screen at each output time k/fps (sample and hold)."""
    times = np.asarray(source_times) - source_times[0]
    return [int(np.searchsorted(times, k / fps + 1e-9, side="right") - 1) for k in range(count)]


# ------------------------------------------------------------------------------------- probe


def test_probe_real_sample(sample_video):
    info = probe(sample_video)
    assert (info.codec, info.width, info.height) == ("vp9", 1768, 994)
    assert info.fps == pytest.approx(30.0, abs=0.01)
    assert info.frame_count == 230
    assert info.duration_s == pytest.approx(230 / 30, abs=0.01)
    assert info.has_audio and info.audio_codec == "aac"
    assert not info.variable_frame_rate and info.rotation == 0


def test_probe_detects_variable_frame_rate(tmp_path):
    times = np.cumsum([0] + [1 / 30, 1 / 15, 1 / 60, 1 / 24] * 6).tolist()
    info = probe(make_clip(tmp_path / "vfr.mp4", times_s=times))
    assert info.variable_frame_rate
    assert info.min_frame_interval_s == pytest.approx(1 / 60, abs=1e-3)
    assert info.max_frame_interval_s == pytest.approx(1 / 15, abs=1e-3)


def test_ntsc_rate_in_millisecond_timebase_is_not_variable(tmp_path):
    # WebM stores 1 ms timestamps, so 29.97 fps shows 33/34 ms intervals: rounding, not VFR.
    clip = make_clip(
        tmp_path / "ntsc.webm",
        fps=30000 / 1001,
        frames=40,
        codec="libvpx-vp9",
        container="webm",
        time_base=Fraction(1, 1000),
    )
    info = probe(clip)
    assert not info.variable_frame_rate
    assert info.fps == pytest.approx(29.97, abs=0.05)


# ------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("source_fps", [30000 / 1001, 60000 / 1001, 25.0])
def test_decode_picks_frames_by_timestamp(tmp_path, source_fps):
    frames = round(3 * source_fps)
    clip = make_clip(tmp_path / "cfr.mp4", fps=source_fps, frames=frames)
    out = decode_all(clip, DecodeSettings(fps=12, width=320, height=240))
    times = [i / source_fps for i in range(frames)]
    assert len(out) == decoded_frame_count(frames / source_fps, 12)
    assert [read_barcode(f) for f in out] == expected_picks(times, 12, len(out))


def test_decode_variable_frame_rate_source(tmp_path):
    rng = np.random.default_rng(0)
    times = np.cumsum(np.r_[0, rng.uniform(0.01, 0.12, 59)]).tolist()
    clip = make_clip(tmp_path / "vfr.mp4", times_s=times)
    out = decode_all(clip, DecodeSettings(fps=25, width=320, height=240))
    assert [read_barcode(f) for f in out] == expected_picks(times, 25, len(out))


def test_decode_upsampling_repeats_frames(tmp_path):
    clip = make_clip(tmp_path / "slow.mp4", fps=10, frames=10)
    out = decode_all(clip, DecodeSettings(fps=25, width=320, height=240))
    assert len(out) == 25
    assert [read_barcode(f) for f in out] == expected_picks([i / 10 for i in range(10)], 25, 25)


def test_decode_yields_bounded_chunks(sample_video):
    chunks = list(decode_chunks(sample_video, DecodeSettings(fps=12, width=512, chunk_frames=16)))
    sizes = [len(c.frames) for c in chunks]
    assert sizes[:-1] == [16] * (len(sizes) - 1) and 0 < sizes[-1] <= 16
    assert sum(sizes) == decoded_frame_count(230 / 30, 12)
    assert chunks[0].frames.shape[1:] == (288, 512, 3)  # 1768x994 -> 512 wide, height /8
    assert chunks[1].start == 16
    assert chunks[1].times_s[0] == pytest.approx(16 / 12)


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_decode_applies_rotation_like_ffmpeg(tmp_path, rotation):
    clip = make_clip(tmp_path / "rot.mp4", frames=3, rotation=rotation)
    info = probe(clip)
    assert info.rotation == rotation % 360
    size = (240, 320) if rotation % 180 else (320, 240)
    assert (info.width, info.height) == size
    ours = decode_all(clip, DecodeSettings(fps=30, width=size[0], height=size[1]))[0]
    png = tmp_path / "ffmpeg.png"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", str(clip), "-frames:v", "1", str(png)], check=True
    )
    import cv2

    theirs = cv2.imread(str(png))[:, :, ::-1]
    assert theirs.shape == ours.shape
    assert np.abs(theirs.astype(int) - ours.astype(int)).mean() < 2.0


def test_fit_letterbox_pads_and_crop_fills(tmp_path):
    clip = make_clip(tmp_path / "wide.mp4", frames=32, width=320, height=160)
    boxed = decode_all(clip, DecodeSettings(fps=30, width=256, height=256, fit="letterbox"))[31]
    assert boxed.shape == (256, 256, 3)
    assert boxed[:60].max() == 0 and boxed[-60:].max() == 0  # black bars top and bottom
    assert boxed[64:192].max() > 200
    cropped = decode_all(clip, DecodeSettings(fps=30, width=256, height=256, fit="crop"))[31]
    assert cropped.shape == (256, 256, 3)
    assert cropped[:5].max() > 200  # frame 31's barcode reaches the top edge: no bars


def test_derived_side_is_a_multiple_of_8(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", frames=2, width=300, height=170)
    out = decode_all(clip, DecodeSettings(fps=30, width=512))
    assert out.shape[1:] == (288, 512, 3)
    out = decode_all(clip, DecodeSettings(fps=30, width=None, height=256))
    assert out.shape[1:] == (256, 448, 3)


def test_max_frames_stops_early(sample_video):
    out = decode_all(sample_video, DecodeSettings(fps=12, width=256, max_frames=5))
    assert len(out) == 5


# ------------------------------------------------------------------------------------ encode


@pytest.mark.parametrize(
    "fps,rate",
    [(25, "25/1"), (29.97, "30000/1001"), (12, "12/1"), (12.5, "25/2"), (7.5, "15/2")],
)
def test_encode_exact_rate_checked_by_ffprobe(tmp_path, fps, rate):
    frames = [barcode_frame(i, 320, 240) for i in range(30)]
    out = tmp_path / "out.mp4"
    assert encode_mp4(frames, out, EncodeSettings(fps=fps)) == 30
    video = ffprobe(out)["streams"][0]
    assert video["codec_name"] == "h264" and video["pix_fmt"] == "yuv420p"
    assert video["r_frame_rate"] == rate and video["avg_frame_rate"] == rate
    assert int(video["nb_read_frames"]) == 30
    assert float(video["duration"]) == pytest.approx(30 / fps, abs=1e-3)
    decoded = decode_all(out, DecodeSettings(fps=fps, width=320, height=240))
    assert [read_barcode(f) for f in decoded] == list(range(30))


def test_encode_pads_odd_sizes_and_puts_index_first(tmp_path):
    out = tmp_path / "odd.mp4"
    encode_mp4(np.zeros((5, 101, 75, 3), np.uint8), out, EncodeSettings(fps=25))
    video = ffprobe(out)["streams"][0]
    assert (video["width"], video["height"]) == (76, 102)
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat"), "faststart: index before the media data"


@pytest.mark.parametrize("audio_codec,expect", [("aac", "aac"), ("pcm_s16le", "aac")])
def test_encode_carries_audio_trimmed_to_video(tmp_path, audio_codec, expect):
    container = "mov" if audio_codec.startswith("pcm") else "mp4"
    source = make_clip(tmp_path / f"src.{container}", frames=90, audio_codec=audio_codec)
    frames = decode_all(source, DecodeSettings(fps=25, width=320, height=240, max_frames=50))
    out = tmp_path / "with_audio.mp4"
    encode_mp4(frames, out, EncodeSettings(fps=25, audio_from=str(source)))
    streams = {s["codec_type"]: s for s in ffprobe(out)["streams"]}
    assert streams["audio"]["codec_name"] == expect
    assert float(streams["audio"]["duration"]) == pytest.approx(2.0, abs=0.05)


def test_encode_failure_leaves_no_file(tmp_path):
    def frames():
        yield np.zeros((64, 64, 3), np.uint8)
        raise RuntimeError("upstream stage died")

    out = tmp_path / "result.mp4"
    with pytest.raises(RuntimeError):
        encode_mp4(frames(), out, EncodeSettings(fps=25))
    assert list(tmp_path.iterdir()) == []


def test_encode_rejects_bad_frames(tmp_path):
    with pytest.raises(errors.InvalidSettingError):
        encode_mp4([np.zeros((8, 8), np.float32)], tmp_path / "x.mp4", EncodeSettings())
    with pytest.raises(errors.InvalidSettingError):
        encode_mp4([], tmp_path / "x.mp4", EncodeSettings())
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- bad input


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(errors.EmptyInputError, match="empty"):
        probe(path)


def test_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_bytes(b"these are meeting notes, not a video\n" * 100)
    with pytest.raises(errors.NotAVideoError):
        probe(path)


def test_audio_only_file_is_not_a_video(tmp_path):
    import av

    path = tmp_path / "sound.m4a"
    with av.open(str(path), "w", format="mp4") as out:
        from tests.media import _add_audio, _write_tone

        _write_tone(out, _add_audio(out, "aac"), 0.5)
    with pytest.raises(errors.NotAVideoError, match="no video stream"):
        probe(path)


def test_truncated_mp4_without_index(tmp_path):
    clip = make_clip(tmp_path / "full.mp4", frames=60)  # moov at the end: cutting loses it
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with pytest.raises(errors.CorruptVideoError, match="truncated"):
        probe(cut)


def test_truncated_faststart_mp4_is_detected(tmp_path, sample_video):
    frames = decode_all(sample_video, DecodeSettings(fps=25, width=256))
    full = tmp_path / "full.mp4"
    encode_mp4(frames, full, EncodeSettings(fps=25))  # faststart: index first, data cut
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    with pytest.raises(errors.CorruptVideoError, match="truncated"):
        probe(cut)


def test_unknown_codec(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", frames=5)
    data = clip.read_bytes().replace(b"avc1", b"zzz9")
    path = tmp_path / "unknown.mp4"
    path.write_bytes(data)
    with pytest.raises(errors.UnsupportedCodecError):
        probe(path)


def test_absurd_size_header(tmp_path):
    path = tmp_path / "huge.y4m"
    path.write_bytes(b"YUV4MPEG2 W17000 H10000 F30:1 C420jpeg\nFRAME\n" + b"\0" * 4096)
    with pytest.raises(errors.LimitExceededError, match="17000x10000"):
        probe(path)


@pytest.mark.parametrize(
    "limits,match",
    [
        (InputLimits(max_bytes=1000), "MB"),
        (InputLimits(max_duration_s=1.0), "lasts"),
        (InputLimits(max_pixels=320 * 200), "MP"),
    ],
)
def test_configured_limits(tmp_path, limits, match):
    clip = make_clip(tmp_path / "c.mp4", frames=60)
    with pytest.raises(errors.LimitExceededError, match=match):
        probe(clip, limits)


def test_decoding_is_time_bounded(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", frames=60)
    info = probe(clip)
    with pytest.raises(errors.CorruptVideoError, match="too long"):
        list(
            decode_chunks(clip, DecodeSettings(width=64), InputLimits(decode_timeout_s=1e-9), info)
        )


@pytest.mark.parametrize("fps,rate", [(25, "25/1"), (29.97, "30000/1001")])
def test_concat_joins_segments_without_reencoding(tmp_path, fps, rate):
    source = make_clip(tmp_path / "src.mp4", frames=90, audio_codec="aac")
    segments = []
    for index, count in enumerate([16, 16, 7]):
        start = 16 * index
        segment = tmp_path / f"seg{index}.mp4"
        frames = [barcode_frame(start + i, 320, 240) for i in range(count)]
        encode_mp4(frames, segment, EncodeSettings(fps=fps))
        segments.append(segment)
    out = tmp_path / "joined.mp4"
    assert concat_mp4(segments, out, fps, audio_from=str(source)) == 39
    streams = {s["codec_type"]: s for s in ffprobe(out)["streams"]}
    video = streams["video"]
    assert video["r_frame_rate"] == rate and video["avg_frame_rate"] == rate
    assert int(video["nb_read_frames"]) == 39
    assert float(video["duration"]) == pytest.approx(39 / fps, abs=1e-3)
    assert float(streams["audio"]["duration"]) == pytest.approx(39 / fps, abs=0.05)
    check = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(out), "-f", "null", "-"], capture_output=True, text=True
    )
    assert check.returncode == 0 and check.stderr == "", "the joined file must decode cleanly"
    decoded = decode_all(out, DecodeSettings(fps=fps, width=320, height=240))
    assert [read_barcode(f) for f in decoded] == list(range(39))
