"""File helpers behind `motionserve interpolate`: one frame between two images, or a whole video
retimed at its own size."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from deployments.errors import InvalidSettingError, NotAVideoError
from deployments.interpolate.backend import check_frame_pair
from deployments.interpolate.registry import make_backend
from deployments.interpolate.retime import FrameRetimer
from deployments.interpolate.settings import InterpolationSettings
from deployments.interpolate.timing import exact_fps


def interpolate_pair_files(
    a_png: str | os.PathLike,
    b_png: str | os.PathLike,
    t: float,
    out_png: str | os.PathLike,
    settings: InterpolationSettings | None = None,
) -> Path:
    """Write the frame at time t (0..1) between two image files; backs `motionserve interpolate
    A.png B.png --t 0.5 -o mid.png`."""
    if not (isinstance(t, int | float) and 0.0 <= t <= 1.0):
        raise InvalidSettingError(f"t must be between 0 and 1, not {t}")
    frame0, frame1 = _read_rgb(a_png), _read_rgb(b_png)
    check_frame_pair(frame0, frame1)
    if t == 0.0:
        middle = frame0
    elif t == 1.0:
        middle = frame1
    else:
        middle = make_backend(settings).interpolate(frame0, frame1, [float(t)])[0]
    out_png = Path(out_png)
    _write_rgb(out_png, middle)
    return out_png


def interpolate_video_file(
    in_mp4: str | os.PathLike,
    fps: float,
    out_mp4: str | os.PathLike,
    settings: InterpolationSettings | None = None,
    chunk_frames: int = 16,
) -> int:
    """Retime a video to `fps` at its own size, streaming chunk by chunk, keeping its audio;
    backs `motionserve interpolate IN.mp4 --fps 25 -o out.mp4`. Returns frames written."""
    from deployments.video import DecodeSettings, EncodeSettings, decode_chunks, encode_mp4, probe

    out_rate = _check_output_fps(fps)
    info = probe(in_mp4)
    if info.fps > 120:
        raise InvalidSettingError(f"the video runs at {info.fps:.0f} fps; at most 120 is supported")
    decode = DecodeSettings(
        fps=info.fps, width=info.width, height=info.height, chunk_frames=chunk_frames
    )
    retimer = FrameRetimer(info.fps, out_rate, settings)
    frames = retimer.run(chunk.frames for chunk in decode_chunks(in_mp4, decode, info=info))
    encode = EncodeSettings(fps=float(out_rate), audio_from=str(in_mp4))
    return encode_mp4(frames, out_mp4, encode)


def _check_output_fps(fps: float) -> Fraction:
    if not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
        raise InvalidSettingError(f"the output fps must be a number above 0, not {fps}")
    if fps > 120:
        raise InvalidSettingError(f"the output fps must be at most 120, not {fps:g}")
    return exact_fps(fps)


def _read_rgb(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise NotAVideoError(f"no such image: {path.name}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise NotAVideoError(f"{path.name} is not an image we can read")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    try:
        ok = cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    except cv2.error as exc:
        raise InvalidSettingError(f"cannot write {path.name}: {exc.msg.strip()}") from exc
    if not ok:
        raise InvalidSettingError(f"cannot write {path.name}: unknown image type or bad folder")
