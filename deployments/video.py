"""Video stage: probe, decode at the generation fps and size, encode H.264 MP4 (PyAV).

Decoding picks output frames by presentation timestamp (sample-and-hold: output time t shows the
last source frame shown at or before t), so variable-frame-rate, 29.97 and 59.94 sources come out
at exactly the requested rate. Only the frames that are picked are converted to RGB and resized:
at 12 fps from a 60 fps source that is 1 in 5, which is where most of the decode cost goes.
Frames leave in fixed-size chunks so memory stays bounded for long inputs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import av.error
import numpy as np
from pydantic import BaseModel, Field, model_validator

from deployments.errors import (
    CorruptVideoError,
    EmptyInputError,
    InvalidSettingError,
    LimitExceededError,
    NotAVideoError,
    UnsupportedCodecError,
)

VIDEO_CODE_VERSION = "video-1"

# Audio codecs an MP4 can carry as they are; anything else is transcoded to AAC.
_MP4_AUDIO_COPY = {"aac", "mp3", "alac", "opus", "ac3", "eac3"}
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


class DecodeSettings(BaseModel):
    """How to turn a source into generation frames; part of the decode stage's cache key."""

    fps: float = Field(default=12.0, gt=0, le=120, description="Output frame rate.")
    width: int | None = Field(
        default=512,
        ge=16,
        le=4096,
        description="Output width; None derives it from height and the source aspect.",
    )
    height: int | None = Field(
        default=None,
        ge=16,
        le=4096,
        description="Output height; None derives it from width and the source aspect.",
    )
    fit: Literal["letterbox", "crop"] = Field(
        default="crop",
        description="When both sides are given and the aspect differs: 'letterbox' pads with "
        "black, 'crop' fills the frame and cuts the centre.",
    )
    multiple_of: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Derived sides are rounded to this multiple (8 for SD latents).",
    )
    chunk_frames: int = Field(
        default=16, ge=1, le=1024, description="Frames per yielded chunk (memory bound)."
    )
    max_frames: int | None = Field(
        default=None, ge=1, description="Stop after this many output frames (previews)."
    )

    @model_validator(mode="after")
    def _needs_a_side(self) -> DecodeSettings:
        if self.width is None and self.height is None:
            raise ValueError("give width, height or both")
        return self


@dataclass(frozen=True)
class VideoChunk:
    """`frames` (n, H, W, 3) RGB uint8 shown at `times_s`, starting at output frame `start`."""

    index: int
    start: int
    frames: np.ndarray
    times_s: np.ndarray


# --------------------------------------------------------------------------------------- probe


def probe(path: str | os.PathLike, limits: InputLimits | None = None) -> VideoInfo:
    """Inspect a file by demuxing its packets (no picture decode) and enforce `limits`.

    Reading every packet's timestamp is what detects VFR and truncation: a truncated file's
    packets end well before the duration its header promises.
    """
    limits = limits or InputLimits()
    path = Path(path)
    size = _check_file(path, limits)
    deadline = time.monotonic() + limits.decode_timeout_s
    with _open_input(path) as container:
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


def _open_input(path: Path):
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


# -------------------------------------------------------------------------------------- decode


def output_size(source_w: int, source_h: int, settings: DecodeSettings) -> tuple[int, int]:
    """The (width, height) frames come out at, for a source displayed at source_w x source_h."""
    if settings.width is not None and settings.height is not None:
        return settings.width, settings.height
    aspect = source_w / source_h
    step = settings.multiple_of
    if settings.width is not None:
        height = max(step, round(settings.width / aspect / step) * step)
        return settings.width, height
    width = max(step, round(settings.height * aspect / step) * step)
    return width, settings.height


def output_frame_count(duration_s: float, fps: float) -> int:
    """Frames at `fps` whose time k/fps falls inside [0, duration)."""
    # The small epsilon keeps 10 s at 12 fps at 120 frames despite float error.
    return max(1, math.ceil(duration_s * fps - 1e-6))


def decode_chunks(
    path: str | os.PathLike,
    settings: DecodeSettings,
    limits: InputLimits | None = None,
    info: VideoInfo | None = None,
) -> Iterator[VideoChunk]:
    """Yield RGB frames at `settings.fps` and size, `settings.chunk_frames` at a time.

    Probes first (limits, truncation) unless `info` from an earlier probe is given.
    """
    limits = limits or InputLimits()
    info = info or probe(path, limits)
    out_w, out_h = output_size(info.width, info.height, settings)
    total = output_frame_count(info.duration_s, settings.fps)
    if settings.max_frames is not None:
        total = min(total, settings.max_frames)
    deadline = time.monotonic() + limits.decode_timeout_s
    picks = _pick_frames(path, info, settings.fps, total, deadline)
    batch: list[np.ndarray] = []
    chunk_index = 0
    produced = 0
    for frame in picks:
        batch.append(_to_rgb(frame, info, out_w, out_h, settings.fit))
        produced += 1
        if len(batch) == settings.chunk_frames or produced == total:
            start = produced - len(batch)
            times = np.arange(start, produced, dtype=np.float64) / settings.fps
            yield VideoChunk(chunk_index, start, np.stack(batch), times)
            chunk_index += 1
            batch = []


def decode_all(path: str | os.PathLike, settings: DecodeSettings, **kwargs) -> np.ndarray:
    """All output frames in one array; for short clips and tests (long inputs: `decode_chunks`)."""
    return np.concatenate([chunk.frames for chunk in decode_chunks(path, settings, **kwargs)])


def _pick_frames(path, info: VideoInfo, fps: float, total: int, deadline: float):
    """Source frames shown at output times k/fps, k < total (repeats allowed when upsampling)."""
    next_k = 0
    previous = None
    with _open_input(Path(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        origin = None
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                if time.monotonic() > deadline:
                    raise CorruptVideoError("decoding took too long: the file is damaged")
                t = float(frame.pts * stream.time_base)
                origin = t if origin is None else origin
                t -= origin
                # Emit the held frame for every output time before this frame appears.
                while next_k < total and previous is not None and next_k / fps < t - 1e-9:
                    yield previous
                    next_k += 1
                if next_k >= total:
                    return
                previous = frame
        except av.error.FFmpegError as exc:
            if previous is None:
                raise CorruptVideoError(f"the video cannot be decoded ({exc.strerror})") from exc
            # A damaged tail after a good prefix: hold the last good frame (probe already
            # rejected files that are missing a real part of their duration).
    while next_k < total and previous is not None:
        yield previous
        next_k += 1
    if previous is None:
        raise CorruptVideoError("no frame of the video could be decoded")


def _to_rgb(frame, info: VideoInfo, out_w: int, out_h: int, fit: str) -> np.ndarray:
    """Convert one picked frame: scale in swscale (pre-rotation axes), rotate, then fit."""
    disp_w, disp_h = info.width, info.height
    if fit == "crop":
        scale = max(out_w / disp_w, out_h / disp_h)
    else:
        scale = min(out_w / disp_w, out_h / disp_h)
    scaled_w = max(out_w if fit == "crop" else 1, round(disp_w * scale))
    scaled_h = max(out_h if fit == "crop" else 1, round(disp_h * scale))
    swapped = info.rotation % 180 != 0
    coded_w, coded_h = (scaled_h, scaled_w) if swapped else (scaled_w, scaled_h)
    rgb = frame.reformat(
        width=coded_w, height=coded_h, format="rgb24", interpolation="AREA"
    ).to_ndarray()
    if info.rotation:
        rgb = np.rot90(rgb, k=info.rotation // 90)
    return _fit(rgb, out_w, out_h)


def _fit(rgb: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Centre-crop whatever exceeds the output and pad whatever falls short with black."""
    h, w = rgb.shape[:2]
    top, left = max(0, (h - out_h) // 2), max(0, (w - out_w) // 2)
    rgb = rgb[top : top + out_h, left : left + out_w]
    h, w = rgb.shape[:2]
    if (h, w) == (out_h, out_w):
        return np.ascontiguousarray(rgb)
    canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)
    y, x = (out_h - h) // 2, (out_w - w) // 2
    canvas[y : y + h, x : x + w] = rgb
    return canvas


# -------------------------------------------------------------------------------------- encode


class EncodeSettings(BaseModel):
    """H.264 output settings."""

    fps: float = Field(default=25.0, gt=0, le=120, description="Exact output frame rate.")
    crf: int = Field(default=18, ge=0, le=51, description="x264 constant rate factor.")
    preset: str = Field(default="veryfast", description="x264 speed/size preset.")
    audio_from: str | None = Field(
        default=None,
        description="Source file whose first audio stream is carried over (copied when MP4 "
        "can hold it, else AAC), trimmed to the video's length.",
    )


def encode_mp4(frames: Iterable[np.ndarray], path: str | os.PathLike, settings: EncodeSettings):
    """Encode RGB uint8 frames (any iterable of (H, W, 3) arrays or chunks) to an MP4.

    Writes to a temporary file beside `path` and renames it, so a failure leaves no half-written
    result. Odd sizes are padded to even (yuv420p needs it) by repeating the edge. Returns the
    number of frames written.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    rate = exact_rate(settings.fps)
    try:
        count = _write_mp4(frames, partial, rate, settings)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return count


def exact_rate(fps: float | Fraction) -> Fraction:
    """A frame rate as an exact fraction: 25 -> 25, 29.97 -> 30000/1001, 12.5 -> 25/2."""
    if isinstance(fps, Fraction):
        rate = fps
    else:
        if not math.isfinite(fps):
            raise InvalidSettingError(f"a frame rate must be a finite number, not {fps}")
        # NTSC rates are written rounded (29.97, 23.976, 59.94) but mean n*1000/1001.
        ntsc = Fraction(round(fps * 1.001) * 1000, 1001)
        whole = round(fps)
        if abs(fps - whole) < 1e-6:
            rate = Fraction(whole)
        elif abs(float(ntsc) - fps) < 1e-4 * fps:
            rate = ntsc
        else:
            rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise InvalidSettingError(f"a frame rate must be above 0, not {float(rate):g}")
    return rate


def _write_mp4(frames, partial: Path, rate: Fraction, settings: EncodeSettings) -> int:
    count = 0
    with av.open(str(partial), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
        with _AudioCarrier(settings.audio_from) as audio:
            stream = None
            for rgb in _iter_frames(frames):
                if stream is None:
                    # Every stream must exist before the first packet is muxed.
                    stream = _add_video_stream(out, rgb.shape[1], rgb.shape[0], rate, settings)
                    audio.add_stream(out)
                frame = av.VideoFrame.from_ndarray(_even(rgb), format="rgb24")
                frame.pts = count
                for packet in stream.encode(frame):
                    out.mux(packet)
                count += 1
                # Interleave audio up to the video's clock, so the muxer buffers little.
                audio.mux_until(out, count / float(rate))
            if stream is None:
                raise InvalidSettingError("there are no frames to encode")
            for packet in stream.encode(None):
                out.mux(packet)
            audio.finish(out, count / float(rate))
    return count


def _iter_frames(frames) -> Iterator[np.ndarray]:
    for item in frames:
        item = np.asarray(item)
        if item.dtype != np.uint8 or item.shape[-1] != 3:
            raise InvalidSettingError("frames must be RGB uint8 arrays of shape (H, W, 3)")
        yield from (item if item.ndim == 4 else (item,))


def _add_video_stream(out, width: int, height: int, rate: Fraction, settings: EncodeSettings):
    stream = out.add_stream("libx264", rate=rate)
    stream.width, stream.height = width + width % 2, height + height % 2
    stream.pix_fmt = "yuv420p"
    stream.time_base = 1 / rate
    # repeat-headers puts SPS/PPS in front of every keyframe, so segments encoded separately
    # (chunk by chunk, on different replicas) can be joined by `concat_mp4` without re-encoding.
    stream.options = {
        "crf": str(settings.crf),
        "preset": settings.preset,
        "x264-params": "repeat-headers=1",
    }
    return stream


def _even(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return rgb
    return np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


class _AudioCarrier:
    """Carries the first audio stream of a source file into the output, cut at the video's end.

    Stream-copies codecs MP4 can hold (no quality loss, no CPU) and transcodes others to AAC.
    """

    def __init__(self, source: str | None):
        self._source = source
        self._src = None
        self._in_stream = None
        self._out_stream = None
        self._copy = False
        self._pending = None
        self._held = None

    def __enter__(self) -> _AudioCarrier:
        if self._source:
            self._src = av.open(self._source)
            if self._src.streams.audio:
                self._in_stream = self._src.streams.audio[0]
                self._copy = self._in_stream.codec_context.name in _MP4_AUDIO_COPY
        return self

    def __exit__(self, *exc_info) -> None:
        if self._src is not None:
            self._src.close()

    def add_stream(self, out) -> None:
        if self._in_stream is None:
            return
        if self._copy:
            self._out_stream = out.add_stream_from_template(self._in_stream)
            self._pending = self._packets()
        else:
            rate = self._in_stream.codec_context.sample_rate or 48000
            self._out_stream = out.add_stream("aac", rate=rate)
            self._pending = self._transcoded()

    def mux_until(self, out, until_s: float) -> None:
        """Mux audio packets that start before `until_s`; keep the first later one for next time."""
        while self._pending is not None:
            if self._held is None:
                self._held = next(self._pending, None)
                if self._held is None:
                    self._pending = None
                    return
            packet, time_s = self._held
            if time_s >= until_s:
                return
            out.mux(packet)
            self._held = None

    def finish(self, out, video_duration_s: float) -> None:
        self.mux_until(out, video_duration_s)
        if self._out_stream is not None and not self._copy:
            for packet in self._out_stream.encode(None):
                out.mux(packet)

    def _packets(self):
        base = self._in_stream.time_base
        for packet in self._src.demux(self._in_stream):
            if packet.pts is None or packet.dts is None:
                continue
            packet.stream = self._out_stream
            yield packet, float(packet.pts * base)

    def _transcoded(self):
        for frame in self._src.decode(self._in_stream):
            time_s = frame.time or 0.0
            frame.pts = None
            for packet in self._out_stream.encode(frame):
                yield packet, time_s


def concat_mp4(
    segments: Iterable[str | os.PathLike],
    path: str | os.PathLike,
    fps: float,
    audio_from: str | None = None,
) -> int:
    """Join H.264 MP4 segments made by `encode_mp4` at the same size and rate, without
    re-encoding (stream copy), optionally adding the source's audio; atomic like `encode_mp4`.

    Returns the number of video frames written. Timestamps are rewritten to one continuous
    timeline at exactly `fps`, whatever each segment's own timing.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    rate = exact_rate(fps)
    try:
        count = _concat(list(segments), partial, rate, audio_from)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return count


def _concat(segments: list, partial: Path, rate: Fraction, audio_from: str | None) -> int:
    if not segments:
        raise InvalidSettingError("there are no segments to join")
    count = 0
    with av.open(str(partial), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
        with _AudioCarrier(audio_from) as audio:
            stream = None
            for segment in segments:
                with av.open(str(segment)) as source:
                    video = source.streams.video[0]
                    if stream is None:
                        stream = out.add_stream_from_template(video)
                        audio.add_stream(out)
                        out.start_encoding()  # the muxer fixes the stream time base here
                    count = _copy_segment(source, video, stream, out, count, rate)
                audio.mux_until(out, count / float(rate))
            audio.finish(out, count / float(rate))
    return count


def _copy_segment(source, video, stream, out, offset: int, rate: Fraction) -> int:
    """Mux one segment's packets after `offset` frames; returns the new frame count."""
    ticks_in = 1 / (rate * video.time_base)  # segment ticks per frame
    ticks_out = 1 / (rate * stream.time_base)  # output ticks per frame
    frames = 0
    for packet in source.demux(video):
        if packet.pts is None:
            continue
        # B-frames give dts < pts; both shift by the same whole number of frames.
        pts_frames = round(packet.pts / ticks_in)
        dts_frames = round(packet.dts / ticks_in) if packet.dts is not None else pts_frames
        packet.pts = round((offset + pts_frames) * ticks_out)
        packet.dts = round((offset + dts_frames) * ticks_out)
        packet.duration = round(ticks_out)
        packet.time_base = stream.time_base
        packet.stream = stream
        out.mux(packet)
        frames += 1
    return offset + frames
