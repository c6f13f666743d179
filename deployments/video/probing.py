"""Probe: what an input video is (codec, size, rotation, timing), read from its packets without
decoding pictures, and the input limits enforced before any frame is decoded."""

from __future__ import annotations

import os
import time
from pathlib import Path

import av
import av.error
import numpy as np
from pydantic import BaseModel, Field

from deployments.errors import (
    CorruptVideoError,
    EmptyInputError,
    LimitExceededError,
    NotAVideoError,
    UnsupportedCodecError,
)

# Sizes that no real camera produces: a header claiming more is damaged or hostile.
_ABSURD_SIDE = 16384


class InputLimits(BaseModel):
    """Limits on an input video; anything beyond is rejected before any frame is decoded."""

    max_bytes: int = Field(default=2 * 1024**3, gt=0, description="Largest file size in bytes.")
    max_duration_s: float = Field(default=600.0, gt=0, description="Longest duration in seconds.")
    max_pixels: int = Field(
        default=3840 * 2160, gt=0, description="Largest frame area (width x height) in pixels."
    )
    max_source_fps: float = Field(
        default=240.0, gt=0, description="Highest average source frame rate accepted."
    )
    decode_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="Wall-clock bound on probing or decoding one input; a decoder stuck on "
        "hostile data fails instead of hanging a worker.",
    )
    max_reference_bytes: int = Field(
        default=20 * 1024**2,
        gt=0,
        description="Largest reference image file (anchor attention), in bytes.",
    )
    max_reference_pixels: int = Field(
        default=4096 * 4096,
        gt=0,
        description="Largest reference image area (width x height), refused from its header "
        "before any pixel is decoded.",
    )
    min_reference_side: int = Field(
        default=64,
        ge=1,
        description="Smallest short side of a reference image, in pixels (SD 1.5 needs 64).",
    )


class VideoInfo(BaseModel):
    """What `probe` learns about a file without decoding its pictures."""

    container: str = Field(description="Demuxer name, e.g. 'mov,mp4,m4a,3gp,3g2,mj2'.")
    codec: str = Field(description="Video codec name, e.g. 'h264', 'vp9'.")
    width: int = Field(description="Displayed width in pixels (after rotation).")
    height: int = Field(description="Displayed height in pixels (after rotation).")
    coded_width: int = Field(description="Stored picture width, before rotation.")
    coded_height: int = Field(description="Stored picture height, before rotation.")
    rotation: int = Field(description="Counter-clockwise rotation applied for display, degrees.")
    duration_s: float = Field(description="Presentation span of the video stream in seconds.")
    fps: float = Field(description="Average frame rate (frames / duration).")
    frame_count: int = Field(description="Number of video packets (frames) in the stream.")
    variable_frame_rate: bool = Field(description="Frame intervals differ beyond timestamp jitter.")
    min_frame_interval_s: float = Field(description="Shortest interval between frames.")
    max_frame_interval_s: float = Field(description="Longest interval between frames.")
    has_audio: bool = Field(description="The file has an audio stream.")
    audio_codec: str | None = Field(default=None, description="Audio codec name, if any.")
    size_bytes: int = Field(description="File size in bytes.")


def probe(path: str | os.PathLike, limits: InputLimits | None = None) -> VideoInfo:
    """Inspect a file by demuxing its packets (no picture decode) and enforce `limits`.

    Reading every packet's timestamp is what detects VFR and truncation: a truncated file's
    packets end well before the duration its header promises.
    """
    limits = limits or InputLimits()
    path = Path(path)
    size = _check_file(path, limits)
    deadline = time.monotonic() + limits.decode_timeout_s
    with open_input(path) as container:
        stream = _video_stream(container)
        coded_w, coded_h = stream.codec_context.width, stream.codec_context.height
        _check_dimensions(coded_w, coded_h, limits)
        times, durations = _packet_times(container, stream, deadline)
        rotation = _stream_rotation(container, stream)
        audio = container.streams.audio[0] if container.streams.audio else None
        header_duration = _header_duration_s(container, stream)
        container_name = container.format.name
        codec = stream.codec_context.name
    if len(times) == 0:
        raise CorruptVideoError("the video stream holds no frames: the file is damaged or empty")
    info = _timing_info(times, durations)
    _check_truncation(info["end_s"], header_duration)
    swapped = rotation % 180 != 0
    fps = info["count"] / info["span_s"] if info["span_s"] > 0 else 0.0
    video = VideoInfo(
        container=container_name,
        codec=codec,
        width=coded_h if swapped else coded_w,
        height=coded_w if swapped else coded_h,
        coded_width=coded_w,
        coded_height=coded_h,
        rotation=rotation,
        duration_s=info["span_s"],
        fps=fps,
        frame_count=info["count"],
        variable_frame_rate=info["vfr"],
        min_frame_interval_s=info["min_dt"],
        max_frame_interval_s=info["max_dt"],
        has_audio=audio is not None,
        audio_codec=audio.codec_context.name if audio is not None else None,
        size_bytes=size,
    )
    _check_limits(video, limits)
    return video


def _check_file(path: Path, limits: InputLimits) -> int:
    if not path.is_file():
        raise NotAVideoError(f"no such file: {path.name}")
    size = path.stat().st_size
    if size == 0:
        raise EmptyInputError("the uploaded file is empty")
    if size > limits.max_bytes:
        raise LimitExceededError(
            f"the file is {size / 1e6:.1f} MB; the limit is {limits.max_bytes / 1e6:.1f} MB"
        )
    return size


def open_input(path: Path):
    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except av.error.InvalidDataError as exc:
        if _looks_like_mp4(path):
            raise CorruptVideoError(
                "the file looks like an MP4 but cannot be read: it is truncated or damaged "
                "(its index, the 'moov' box, is missing)"
            ) from exc
        raise NotAVideoError("the file is not a video in a format we can read") from exc
    except av.error.FFmpegError as exc:
        raise NotAVideoError(f"the file cannot be opened as a video ({exc.strerror})") from exc


def _looks_like_mp4(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(12)
    return head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide")


def _video_stream(container):
    if not container.streams.video:
        raise NotAVideoError("the file has no video stream")
    stream = container.streams.video[0]
    name = stream.codec_context.name if stream.codec_context else None
    if not name or name == "none":
        raise UnsupportedCodecError("the video codec is unknown; use H.264, H.265, VP9 or AV1")
    try:
        av.codec.Codec(name, "r")
    except Exception as exc:  # PyAV raises different types per version for a missing decoder
        raise UnsupportedCodecError(f"no decoder for the '{name}' video codec") from exc
    return stream


def _check_dimensions(width: int, height: int, limits: InputLimits) -> None:
    if width <= 0 or height <= 0:
        raise CorruptVideoError("the video reports no picture size: the file is damaged")
    if width > _ABSURD_SIDE or height > _ABSURD_SIDE:
        raise LimitExceededError(f"a {width}x{height} picture is beyond any supported size")
    if width * height > limits.max_pixels:
        raise LimitExceededError(
            f"the picture is {width}x{height} ({width * height / 1e6:.1f} MP); "
            f"the limit is {limits.max_pixels / 1e6:.1f} MP"
        )


def _packet_times(container, stream, deadline: float) -> tuple[np.ndarray, np.ndarray]:
    """Presentation times and durations (seconds) of every video packet, in display order."""
    base = float(stream.time_base)
    pts, durations = [], []
    try:
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            pts.append(packet.pts)
            durations.append(packet.duration or 0)
            if len(pts) % 256 == 0 and time.monotonic() > deadline:
                raise CorruptVideoError("reading the video took too long: the file is damaged")
    except av.error.FFmpegError as exc:
        if not pts:
            raise CorruptVideoError(f"the video data cannot be read ({exc.strerror})") from exc
        # Data after a readable prefix is damaged: keep what we have; truncation is judged next.
    order = np.argsort(pts, kind="stable")
    times = np.asarray(pts, dtype=np.float64)[order] * base
    return times, np.asarray(durations, dtype=np.float64)[order] * base


def _stream_rotation(container, stream) -> int:
    """Display rotation from the first decodable frame's display matrix (0 if none)."""
    container.seek(0, stream=stream)
    try:
        for frame in container.decode(stream):
            return int(round((frame.rotation or 0) / 90.0)) * 90 % 360
    except av.error.FFmpegError as exc:
        raise CorruptVideoError(f"the first frame cannot be decoded ({exc.strerror})") from exc
    return 0


def _header_duration_s(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _timing_info(times: np.ndarray, durations: np.ndarray) -> dict:
    times = times - times[0]
    last_duration = durations[-1] if durations[-1] > 0 else 0.0
    intervals = np.diff(times)
    if len(intervals):
        median = float(np.median(intervals))
        last_duration = last_duration or median
        # Timestamps are rounded to the time base (1 ms in WebM/MKV), so 29.97 fps shows 33 and
        # 34 ms intervals; only deviations beyond that rounding and 5% count as variable rate.
        tolerance = max(0.0011, 0.05 * median)
        vfr = bool(np.any(np.abs(intervals - median) > tolerance))
        min_dt, max_dt = float(intervals.min()), float(intervals.max())
    else:
        vfr, min_dt, max_dt = False, last_duration, last_duration
    end = float(times[-1] + last_duration)
    return {
        "count": len(times),
        "span_s": end,
        "end_s": end,
        "vfr": vfr,
        "min_dt": min_dt,
        "max_dt": max_dt,
    }


def _check_truncation(end_s: float, header_duration_s: float | None) -> None:
    if header_duration_s and header_duration_s > 1.0 and end_s < 0.9 * header_duration_s:
        raise CorruptVideoError(
            f"the video data ends at {end_s:.1f} s but the file says {header_duration_s:.1f} s: "
            "it is truncated"
        )


def check_limits(info: VideoInfo, limits: InputLimits) -> None:
    """Enforce `limits` on what an earlier probe found (a cached probe of the same bytes)."""
    if info.size_bytes > limits.max_bytes:
        raise LimitExceededError(
            f"the file is {info.size_bytes / 1e6:.1f} MB; "
            f"the limit is {limits.max_bytes / 1e6:.1f} MB"
        )
    _check_dimensions(info.coded_width, info.coded_height, limits)
    _check_limits(info, limits)


def _check_limits(info: VideoInfo, limits: InputLimits) -> None:
    if info.duration_s > limits.max_duration_s:
        raise LimitExceededError(
            f"the video lasts {info.duration_s:.0f} s; the limit is {limits.max_duration_s:.0f} s"
        )
    if info.fps > limits.max_source_fps:
        raise LimitExceededError(
            f"the video runs at {info.fps:.0f} fps; the limit is {limits.max_source_fps:.0f} fps"
        )
