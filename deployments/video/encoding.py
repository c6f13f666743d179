"""Encode and join: H.264 MP4 from RGB frames, segments joined without re-encoding, and the
source's audio carried over (PyAV)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from pydantic import BaseModel, Field

from deployments.errors import InvalidSettingError
from deployments.stopping import ShouldStop, until_stopped

# Audio codecs an MP4 can carry as they are; anything else is transcoded to AAC.
_MP4_AUDIO_COPY = {"aac", "mp3", "alac", "opus", "ac3", "eac3"}


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


def encode_mp4(
    frames: Iterable[np.ndarray],
    path: str | os.PathLike,
    settings: EncodeSettings,
    should_stop: ShouldStop | None = None,
):
    """Encode RGB uint8 frames (any iterable of (H, W, 3) arrays or chunks) to an MP4.

    Writes to a temporary file beside `path` and renames it, so a failure leaves no half-written
    result. Odd sizes are padded to even (yuv420p needs it) by repeating the edge. Returns the
    number of frames written. `should_stop` is asked before each frame; once it answers True,
    `Stopped` is raised and nothing is left at `path`.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    rate = exact_rate(settings.fps)
    try:
        frames = until_stopped(_iter_frames(frames), should_stop, "encoding")
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
    should_stop: ShouldStop | None = None,
) -> int:
    """Join H.264 MP4 segments made by `encode_mp4` at the same size and rate, without
    re-encoding (stream copy), optionally adding the source's audio; atomic like `encode_mp4`
    (`should_stop` is asked before each segment: `Stopped` leaves nothing at `path`).

    Returns the number of video frames written. Timestamps are rewritten to one continuous
    timeline at exactly `fps`, whatever each segment's own timing.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    rate = exact_rate(fps)
    try:
        count = _concat(list(segments), partial, rate, audio_from, should_stop)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return count


def _concat(segments: list, partial: Path, rate: Fraction, audio_from: str | None,
            should_stop: ShouldStop | None) -> int:  # fmt: skip
    if not segments:
        raise InvalidSettingError("there are no segments to join")
    count = 0
    with av.open(str(partial), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
        with _AudioCarrier(audio_from) as audio:
            stream = None
            for segment in until_stopped(segments, should_stop, "joining"):
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
