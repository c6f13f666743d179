"""Reference images: every bad one is refused with the error a user should see, before any
pixel of a huge one is decoded; good ones are prepared the same way every time; a reference
turns the anchor on in the plan."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deployments.errors import InputError
from deployments.reference import check_reference, prepare_reference
from deployments.video import InputLimits

LIMITS = InputLimits()


def picture(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def saved(tmp_path: Path, image: Image.Image, fmt: str, name: str = "ref", **kw) -> Path:
    path = tmp_path / f"{name}.{fmt.lower()}"
    image.save(path, format=fmt, **kw)
    return path


def png_header(width: int, height: int) -> bytes:
    """The start of a PNG claiming width x height: signature, IHDR, an empty IDAT (no pixel
    data follows, as in a file cut short or a forged header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")


def refused(path: Path, limits: InputLimits = LIMITS) -> tuple[int, str]:
    with pytest.raises(InputError) as caught:
        check_reference(path, limits)
    print(f"{path.name}: {caught.value.http_status} {caught.value.code}: {caught.value.message}")
    return caught.value.http_status, caught.value.code


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepts_png_jpeg_webp(tmp_path, fmt):
    info = check_reference(saved(tmp_path, picture(), fmt), LIMITS)
    assert (info.format, info.width, info.height) == (fmt, 96, 80)


def test_refuses_bad_references(tmp_path):
    random_bytes = tmp_path / "random.png"
    random_bytes.write_bytes(np.random.default_rng(1).bytes(4096))
    assert refused(random_bytes) == (415, "not_an_image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert refused(empty) == (400, "empty_input")
    tiny = saved(tmp_path, picture(1, 1), "PNG", "tiny")
    assert refused(tiny) == (422, "invalid_setting")
    thin = saved(tmp_path, picture(500, 63), "PNG", "thin")
    assert refused(thin) == (422, "invalid_setting")
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(20000, 20000))  # Pillow's own bomb guard fires at open
    assert refused(huge) == (413, "limit_exceeded")
    large = tmp_path / "large.png"
    large.write_bytes(png_header(5000, 5000))  # over our limit, under Pillow's guard
    assert refused(large) == (413, "limit_exceeded")
    frames = [picture(seed=s) for s in range(3)]
    gif = tmp_path / "animated.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert refused(gif) == (415, "not_an_image")
    webp = tmp_path / "animated.webp"
    frames[0].save(webp, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert refused(webp) == (415, "not_an_image")
    apng = tmp_path / "animated.png"
    frames[0].save(apng, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert refused(apng) == (415, "not_an_image")
    still_gif = saved(tmp_path, picture(), "GIF", "still")
    assert refused(still_gif) == (415, "not_an_image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(saved(tmp_path, picture(), "PNG", "whole").read_bytes()[:200])
    assert refused(truncated) == (422, "corrupt_image")
    good = saved(tmp_path, picture(), "PNG", "good")
    small_limits = InputLimits(max_reference_bytes=good.stat().st_size - 1)
    assert refused(good, small_limits) == (413, "limit_exceeded")
    assert refused(good, InputLimits(max_reference_pixels=96 * 80 - 1)) == (413, "limit_exceeded")


def test_huge_header_is_refused_without_decoding(tmp_path, monkeypatch):
    large = tmp_path / "large.png"
    large.write_bytes(png_header(5000, 5000))

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    assert refused(large) == (413, "limit_exceeded")


def test_prepare_covers_and_centre_crops_deterministically(tmp_path):
    # a wide image with a red middle: cropped to a square, the middle stays, the sides go
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, 100:200] = (255, 0, 0)
    path = saved(tmp_path, Image.fromarray(pixels), "PNG")
    out = prepare_reference(path, 64, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[:, 5:59, 0].min() > 200 and out[:, 5:59, 1].max() < 50
    assert np.array_equal(out, prepare_reference(path, 64, 64))
    rgba = saved(tmp_path, picture().convert("RGBA"), "PNG", "rgba")
    assert prepare_reference(rgba, 48, 80).shape == (80, 48, 3)
    # EXIF orientation is applied (a phone's portrait JPEG stored sideways)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif)
    sideways = tmp_path / "sideways.jpg"
    sideways.write_bytes(buffer.getvalue())
    upright = prepare_reference(sideways, 100, 300)
    assert upright[100:200, :, 0].mean() > 200  # the red band is now horizontal, in the middle


def test_a_reference_turns_the_anchor_on_unless_the_request_says_otherwise():
    from deployments.errors import InvalidSettingError
    from serve.config import AppArgs
    from serve.planning import plan_for
    from serve.schemas import JobRequest

    args = AppArgs()

    class Info:
        width, height = 640, 360

    def anchor(reference, preset="draft", **overrides):
        request = JobRequest(prompt="a dancer", preset=preset, overrides=overrides)
        return plan_for(args, request, Info(), reference)["generation"].get("anchor", "off")

    assert anchor(True) == "reference"
    assert anchor(True, anchor="off") == "off"
    assert anchor(True, anchor="first_keyframe") == "first_keyframe"
    assert anchor(False) == "off" and anchor(None) == "off"  # draft has no anchor of its own
    assert anchor(None, anchor="reference") == "reference"  # an estimate
    # standard anchors every job: on its first keyframe, or with a reference on the reference
    assert anchor(False, "standard") == "first_keyframe" == anchor(None, "standard")
    assert anchor(True, "standard") == "reference"
    with pytest.raises(InvalidSettingError, match="needs a reference image"):
        anchor(False, anchor="reference")
