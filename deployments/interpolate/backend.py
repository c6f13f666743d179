"""The interface every interpolation backend implements, and the frames it accepts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from deployments.errors import InvalidSettingError


class InterpolationBackend(ABC):
    """Makes frames between two frames; implementations: `FlowBackend`, learned models."""

    name: str = "abstract"

    @abstractmethod
    def interpolate(
        self, frame0: np.ndarray, frame1: np.ndarray, times: Sequence[float]
    ) -> list[np.ndarray]:
        """Frames at each t in `times` (0 < t < 1) between RGB uint8 frames of equal size."""

    def interpolate_with_flow_from(
        self,
        guide0: np.ndarray,
        guide1: np.ndarray,
        frame0: np.ndarray,
        frame1: np.ndarray,
        times: Sequence[float],
    ) -> list[np.ndarray]:
        """Frames between `frame0` and `frame1`, motion measured on smaller `guide` copies.
        A backend that cannot reuse motion across sizes works on the frames themselves."""
        return self.interpolate(frame0, frame1, times)


def check_frame_pair(frame0: np.ndarray, frame1: np.ndarray) -> None:
    for frame in (frame0, frame1):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise InvalidSettingError("frames must be RGB uint8 arrays of shape (H, W, 3)")
    if frame0.shape != frame1.shape:
        raise InvalidSettingError(
            f"frames to interpolate differ in size: {frame0.shape[1]}x{frame0.shape[0]} and "
            f"{frame1.shape[1]}x{frame1.shape[0]}"
        )
