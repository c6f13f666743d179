"""Interpolation stage: retime frames from the generation fps to the output fps on CPU.

Diffusion makes frames at a low rate (12 fps); this stage makes the frames between, so the GPU
pays only for the frames it must.

One definition each, in the submodule of its responsibility; this package namespace is the
public API (`from deployments import interpolate; interpolate.X`) and re-exports them:
- `settings`: `InterpolationSettings` and the code version (the stage's cache key);
- `timing`: the timing rule, which source frames make each output frame;
- `backend`: the interface of a backend; `flow`: the default optical-flow backend;
- `registry`: which backend the settings ask for (learned models register here);
- `retime`: `FrameRetimer`, streaming a clip chunk by chunk;
- `files`: the `motionserve interpolate` helpers on image and video files.
"""

from deployments.interpolate.backend import InterpolationBackend, check_frame_pair
from deployments.interpolate.files import interpolate_pair_files, interpolate_video_file
from deployments.interpolate.flow import FlowBackend, PairMotion, is_scene_cut, resize_flow
from deployments.interpolate.registry import make_backend, register_backend
from deployments.interpolate.retime import FrameRetimer, interpolate_with_flow_from
from deployments.interpolate.settings import INTERPOLATE_CODE_VERSION, InterpolationSettings
from deployments.interpolate.timing import exact_fps, output_frame_count, output_positions

__all__ = [
    "INTERPOLATE_CODE_VERSION",
    "FlowBackend",
    "FrameRetimer",
    "InterpolationBackend",
    "InterpolationSettings",
    "PairMotion",
    "check_frame_pair",
    "exact_fps",
    "interpolate_pair_files",
    "interpolate_video_file",
    "interpolate_with_flow_from",
    "is_scene_cut",
    "make_backend",
    "output_frame_count",
    "output_positions",
    "register_backend",
    "resize_flow",
]
