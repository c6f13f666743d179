"""Video stage: probe, decode at the generation fps and size, encode and join H.264 MP4 (PyAV).

One definition each, in the submodule of its responsibility; this package namespace is the
public API (`from deployments import video; video.X`) and re-exports them:
- `probing`: what a file is, and the input limits enforced before decoding;
- `decoding`: frames at the generation fps and size, chunk by chunk;
- `encoding`: H.264 MP4 encoding, joining segments without re-encoding, audio carried over.
"""

from deployments.video.decoding import (
    DecodeSettings,
    VideoChunk,
    decode_all,
    decode_chunks,
    decoded_frame_count,
    output_size,
)
from deployments.video.encoding import EncodeSettings, concat_mp4, encode_mp4, exact_rate
from deployments.video.probing import InputLimits, VideoInfo, check_limits, probe

# Part of the probe and decode artifacts' cache keys: bump when the same file would give other
# frames or another VideoInfo.
VIDEO_CODE_VERSION = "video-1"

__all__ = [
    "VIDEO_CODE_VERSION",
    "DecodeSettings",
    "EncodeSettings",
    "InputLimits",
    "VideoChunk",
    "VideoInfo",
    "check_limits",
    "concat_mp4",
    "decode_all",
    "decode_chunks",
    "decoded_frame_count",
    "encode_mp4",
    "exact_rate",
    "output_size",
    "probe",
]
