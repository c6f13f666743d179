"""Synthetic test clips whose pictures carry their own frame number.

Each frame shows its index as a 10-bit barcode of black/white blocks (robust to lossy
compression), so a test can read back exactly which source frame a decoder picked.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BARCODE_BITS = 10


def barcode_frame(index: int, width: int, height: int) -> np.ndarray:
    """An RGB frame: top half a barcode of `index`, bottom half an asymmetric marker."""
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    block = width // BARCODE_BITS
    for bit in range(BARCODE_BITS):
        if index >> bit & 1:
            frame[: height // 2, bit * block : (bit + 1) * block] = 255
    # A red square in the bottom-left corner tells orientation after rotation.
    frame[height - height // 4 :, : width // 4] = (255, 0, 0)
    return frame


def read_barcode(frame: np.ndarray) -> int:
    """Inverse of `barcode_frame` for an upright frame of any size."""
    height, width = frame.shape[:2]
    block = width / BARCODE_BITS
    value = 0
    for bit in range(BARCODE_BITS):
        x = int((bit + 0.5) * block)
        if frame[height // 4, x].mean() > 127:
            value |= 1 << bit
    return value


def make_clip(
    path: Path,
    *,
    times_s: Sequence[float] | None = None,
    fps: float = 30.0,
    frames: int = 30,
    width: int = 320,
    height: int = 240,
    codec: str = "libx264",
    container: str | None = None,
    rotation: int = 0,
    audio_codec: str | None = None,
    time_base: Fraction = Fraction(1, 90000),
) -> Path:
    """Write a barcode clip. `times_s` gives explicit (possibly variable) frame times."""
    if times_s is None:
        times_s = [i / fps for i in range(frames)]
    with av.open(str(path), mode="w", format=container) as out:
        video = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.time_base = time_base
        video.codec_context.time_base = time_base
        if codec == "libx264":
            video.options = {"crf": "18", "preset": "ultrafast", "bf": "0"}
        if rotation:
            video.set_display_rotation(rotation)
        audio = _add_audio(out, audio_codec) if audio_codec else None
        for index, t in enumerate(times_s):
            frame = av.VideoFrame.from_ndarray(barcode_frame(index, width, height), format="rgb24")
            frame.pts = round(t / time_base)
            frame.time_base = time_base
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if audio is not None:
            _write_tone(out, audio, duration_s=times_s[-1] + 1 / fps)
    return path


def _add_audio(out, codec: str):
    stream = out.add_stream(codec, rate=48000)
    stream.layout = "mono"
    return stream


def _write_tone(out, stream, duration_s: float) -> None:
    samples = int(duration_s * 48000)
    tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000)).astype(np.float32)
    fmt = stream.codec_context.format.name if stream.codec_context.format else "fltp"
    frame_size = 1024
    for start in range(0, samples, frame_size):
        chunk = tone[start : start + frame_size]
        data = chunk.reshape(1, -1)
        if fmt.startswith("s16"):
            data = (data * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
        frame.sample_rate = 48000
        frame.pts = start
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
