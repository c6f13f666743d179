"""Reference images (the anchor of anchor attention): checked before anything is stored, and
prepared at the generation size.

Decisions (the why):
- The header decides first: Pillow's `Image.open` reads only the header, so a file claiming
  20000x20000 pixels is refused by `max_reference_pixels` before a pixel is decoded (Pillow's
  own decompression-bomb guard, at twice its 89 M pixel default, is caught and reported the
  same way). Only then are the pixels decoded once, to find truncated or damaged data.
- PNG, JPEG and WebP only, one frame: an animated image (GIF, APNG, animated WebP) has no one
  picture to anchor to, so it is refused rather than silently cut to its first frame.
- Preparing it for a generation size: the EXIF orientation is applied, the image is scaled to
  cover the frame (Lanczos) and centre-cropped, in RGB: the same bytes give the same array on
  any machine, so every chunk of a job sees the same anchor.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from deployments.errors import (
    CorruptImageError,
    EmptyInputError,
    InvalidSettingError,
    LimitExceededError,
    NotAnImageError,
)
from deployments.video.probing import InputLimits

# Part of the prepared reference's cache key: bump when the same file would give other pixels.
REFERENCE_CODE_VERSION = "reference-1"
REFERENCE_FORMATS = ("PNG", "JPEG", "WEBP")


class ReferenceInfo(BaseModel):
    """What `check_reference` learned about a reference image."""

    format: str = Field(description="Pillow's format name: PNG, JPEG or WEBP.")
    width: int = Field(description="Stored width in pixels.")
    height: int = Field(description="Stored height in pixels.")
    bytes: int = Field(description="File size.")


def check_reference(path: str | os.PathLike[str], limits: InputLimits) -> ReferenceInfo:
    """Accept a reference image or raise the InputError a user should see (see the decisions):
    empty 400, over the byte or pixel limits 413, not a PNG/JPEG/WebP or animated 415, too
    small 422, damaged pixels 422."""
    from PIL import Image, UnidentifiedImageError

    size = os.path.getsize(path)
    if size == 0:
        raise EmptyInputError("the reference image is empty")
    if size > limits.max_reference_bytes:
        raise LimitExceededError(
            f"the reference image is {size} bytes; the limit is {limits.max_reference_bytes}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=list(REFERENCE_FORMATS))
    except Image.DecompressionBombError:
        raise LimitExceededError(
            f"the reference image has more than {limits.max_reference_pixels} pixels"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise NotAnImageError("the reference is not a PNG, JPEG or WebP image") from None
    with image:
        width, height = image.size
        info = ReferenceInfo(format=image.format or "", width=width, height=height, bytes=size)
        if width * height > limits.max_reference_pixels:
            raise LimitExceededError(
                f"the reference image is {width}x{height} = {width * height} pixels; the "
                f"limit is {limits.max_reference_pixels}"
            )
        if getattr(image, "n_frames", 1) > 1 or getattr(image, "is_animated", False):
            raise NotAnImageError("the reference image is animated; send a single picture")
        if min(width, height) < limits.min_reference_side:
            raise InvalidSettingError(
                f"the reference image is {width}x{height}; its short side must be at least "
                f"{limits.min_reference_side} pixels"
            )
        try:
            image.load()
        except Exception:  # Pillow raises OSError, SyntaxError, ValueError... on bad data
            raise CorruptImageError("the reference image's data is damaged or truncated") from None
    return info


def prepare_reference(path: str | os.PathLike[str], width: int, height: int) -> np.ndarray:
    """The (checked) reference as uint8 RGB (height, width, 3): EXIF orientation applied,
    scaled to cover the frame and centre-cropped."""
    from PIL import Image, ImageOps

    with Image.open(Path(path)) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    scale = max(width / image.width, height / image.height)
    scaled = (
        max(width, math.ceil(image.width * scale)),
        max(height, math.ceil(image.height * scale)),
    )
    image = image.resize(scaled, Image.Resampling.LANCZOS)
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return np.asarray(image, dtype=np.uint8).copy()
