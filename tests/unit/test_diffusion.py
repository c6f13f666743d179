"""Diffusion stage: tiny models, loader, the denoising loop, keyframe ControlNet, work units.

All on CPU fp32 with the tiny random-weight SD 1.5 + ControlNet (`tiny_sd` fixture), 64x64
frames and a few steps.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from deployments import diffusion as d
from deployments.errors import InvalidSettingError
from deployments.model_loading import (
    ModelSource,
    classify_uri,
    download_s3_source,
    load_sd_components,
    tiny_sd_controlnet_sources,
)
from deployments.tiny_models import build_tiny_sd_controlnet

SIDE = 64
# With controlnet_every=1 the loop computes what diffusers' pipeline computes, in the same
# order: on CPU fp32 we observe bit-identical images. The tolerance only allows for BLAS
# builds that round differently: max abs difference in [0, 1] image space.
PIPELINE_TOLERANCE = 1e-5
# Batched vs alone, or in smaller forwards: the same maths on other tensor batch sizes, where CPU
# kernels may round differently and random weights amplify it over the steps (we see up to
# ~2e-4). 1e-3 is a quarter of one 8-bit level.
BATCH_TOLERANCE = 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def settings(**overrides) -> d.GenerationSettings:
    fields = dict(
        model_id="tiny",
        width=SIDE,
        height=SIDE,
        steps=4,
        scheduler="dpmpp_2m",
        precision="fp32",
        guidance_scale=5.0,
        controlnet_every=1,
    )
    return d.GenerationSettings(**{**fields, **overrides})


def pose_maps(frames: int, seed: int = 0, side: int = SIDE, speed: float = 2.0) -> np.ndarray:
    """Blobs moving `speed` pixels a frame, so neighbouring frames' control images differ."""
    yy, xx = np.mgrid[0:side, 0:side]
    rng = np.random.default_rng(seed)
    colors = rng.integers(64, 256, size=(3, 3))
    images = np.zeros((frames, side, side, 3), dtype=np.uint8)
    for frame in range(frames):
        for blob, color in enumerate(colors):
            cx = (side * (0.25 + 0.25 * blob) + speed * frame) % side
            cy = side * 0.5 + 4.0 * np.sin(frame / 2 + blob)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < (side / 8) ** 2
            images[frame][mask] = color
    return images


def request(frames: int = 5, **overrides) -> d.ChunkRequest:
    fields = dict(
        job_id="job",
        chunk_index=0,
        prompt="a person dancing",
        negative_prompt="blurry",
        seed=7,
        control_images=pose_maps(frames),
        settings=settings(),
    )
    return d.ChunkRequest(**{**fields, **overrides})


class ForwardCounter:
    """Counts the samples (rows) that really go through a module's forward."""

    def __init__(self, module: torch.nn.Module):
        self.rows = 0
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.rows += sample.shape[0]
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --- tiny models ------------------------------------------------------------------------------


def test_tiny_models_are_small_fast_and_deterministic(tiny_sd, tmp_path):
    size = sum(p.stat().st_size for p in tiny_sd.path.rglob("*") if p.is_file())
    print(f"tiny SD + ControlNet: {size / 1e6:.1f} MB, built in {tiny_sd.build_seconds:.1f} s")
    assert size < 20e6
    assert tiny_sd.build_seconds < 30
    for name in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd.path / name).exists(), name
    for name in ("vocab.json", "merges.txt"):
        assert (tiny_sd.path / "tokenizer" / name).is_file()
    again = build_tiny_sd_controlnet(tmp_path / "again", seed=0)
    assert _tree_digest(again) == _tree_digest(tiny_sd.path)


def test_tiny_models_load_in_diffusers_pipeline_with_sd_shapes(tiny_sd):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd.path)
    assert isinstance(pipe.controlnet, ControlNetModel)
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 4
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("the dancing").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert len(ids) < 2 + len("the dancing")  # byte-level BPE merged some bytes
    controlnet_out = [
        p.abs().sum().item() for p in pipe.controlnet.controlnet_mid_block.parameters()
    ]
    assert sum(controlnet_out) > 0  # not the zero-initialised (vacuous) ControlNet


# --- loader -----------------------------------------------------------------------------------


def test_classify_uri(tiny_sd, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert classify_uri(str(tiny_sd.path)) == "directory"
    assert classify_uri(str(checkpoint)) == "single_file"
    assert classify_uri("s3://bucket/models/sd15") == "s3"
    assert classify_uri("runwayml/stable-diffusion-v1-5") == "hub"
    with pytest.raises(ValueError, match="not a checkpoint"):
        classify_uri(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError):
        classify_uri(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        classify_uri("./models/sd15")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = _state(a), _state(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_loader_reads_tiny_models_like_diffusers(tiny_sd, tmp_path):
    from diffusers import StableDiffusionControlNetPipeline

    base, controlnet = tiny_sd_controlnet_sources(tiny_sd.path)
    loaded = load_sd_components(base, controlnet, dtype=torch.float32, cache_dir=tmp_path)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd.path)
    assert (loaded.base_kind, loaded.controlnet_kind) == ("directory", "directory")
    for name in ("unet", "vae", "text_encoder", "controlnet"):
        assert _same_weights(getattr(loaded, name), getattr(pipe, name)), name
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"


def test_single_file_controlnet_loads_the_same_weights(tiny_sd, tmp_path):
    from safetensors.torch import save_file

    base, directory_source = tiny_sd_controlnet_sources(tiny_sd.path)
    reference = load_sd_components(base, directory_source, dtype=torch.float32, cache_dir=tmp_path)
    checkpoint = tmp_path / "control_openpose.safetensors"
    save_file(_state(reference.controlnet), str(checkpoint))
    single = ModelSource(uri=str(checkpoint), config=str(tiny_sd.path), subfolder="controlnet")
    loaded = load_sd_components(base, single, dtype=torch.float32, cache_dir=tmp_path)
    assert loaded.controlnet_kind == "single_file"
    assert _same_weights(loaded.controlnet, reference.controlnet)


def test_single_file_base_model_goes_through_from_single_file(tiny_sd, tmp_path, monkeypatch):
    import diffusers

    reference = diffusers.StableDiffusionControlNetPipeline.from_pretrained(tiny_sd.path)
    calls = []

    def fake_from_single_file(path, **options):
        calls.append((path, options))
        return reference

    monkeypatch.setattr(
        diffusers.StableDiffusionPipeline, "from_single_file", staticmethod(fake_from_single_file)
    )
    checkpoint = tmp_path / "sd15.ckpt"
    checkpoint.write_bytes(b"not read by the fake")
    base = ModelSource(uri=str(checkpoint), config=str(tiny_sd.path))
    _, controlnet = tiny_sd_controlnet_sources(tiny_sd.path)
    loaded = load_sd_components(base, controlnet, dtype=torch.float32, cache_dir=tmp_path)
    assert loaded.base_kind == "single_file"
    assert calls == [
        (
            str(checkpoint),
            {"dtype": torch.float32, "load_safety_checker": False, "config": str(tiny_sd.path)},
        )
    ]
    assert loaded.unet is reference.unet


def _upload_tree(client, bucket: str, root: Path, prefix: str) -> None:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")


def test_s3_source_is_downloaded_once(tiny_sd, moto_s3, tmp_path):
    client = moto_s3.client()
    prefix = f"models/{os.urandom(4).hex()}/tiny-sd"
    _upload_tree(client, moto_s3.bucket, tiny_sd.path, prefix)
    requests: list[str] = []
    client.meta.events.register("before-call.s3.*", lambda model, **_: requests.append(model.name))
    uri = f"s3://{moto_s3.bucket}/{prefix}"
    cache = tmp_path / "cache"

    first = download_s3_source(uri, cache, client=client)
    downloads = requests.count("GetObject")
    assert downloads >= 10 and "ListObjectsV2" in requests
    assert _tree_digest(first) == _tree_digest(tiny_sd.path)
    mtimes = {p: p.stat().st_mtime_ns for p in first.rglob("*")}

    requests.clear()
    base = ModelSource(uri=uri)
    controlnet = ModelSource(uri=uri, subfolder="controlnet")
    loaded = load_sd_components(
        base, controlnet, dtype=torch.float32, cache_dir=cache, s3_client=client
    )
    assert requests == []  # the second load makes no S3 request at all
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == mtimes
    assert (loaded.base_kind, loaded.controlnet_kind) == ("directory", "directory")

    with pytest.raises(FileNotFoundError, match="no objects"):
        download_s3_source(f"s3://{moto_s3.bucket}/models/absent", cache, client=client)


def test_s3_single_checkpoint_object(tiny_sd, moto_s3, tmp_path):
    client = moto_s3.client()
    key = f"models/{os.urandom(4).hex()}/control.safetensors"
    weights = tiny_sd.path / "controlnet" / "diffusion_pytorch_model.safetensors"
    client.upload_file(str(weights), moto_s3.bucket, key)
    local = download_s3_source(f"s3://{moto_s3.bucket}/{key}", tmp_path, client=client)
    assert local.name == "control.safetensors"
    assert local.read_bytes() == weights.read_bytes()
    assert classify_uri(str(local)) == "single_file"


# --- equivalence with diffusers' pipeline ------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "unipc", "euler_a", "lcm"])
def test_every_frame_controlnet_matches_diffusers_pipeline(engine, tiny_sd, scheduler):
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    chunk = request(
        frames=3,
        noise_sharing=0.6,
        settings=settings(scheduler=scheduler, control_guidance_end=0.75),
    )
    ours = engine.generate([chunk], frames_dtype="float32")[0]

    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd.path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = d.build_scheduler(scheduler, pipe.scheduler.config)
    theirs = pipe(
        [chunk.prompt] * chunk.frames,
        image=[Image.fromarray(image) for image in chunk.control_images],
        negative_prompt=[chunk.negative_prompt] * chunk.frames,
        num_inference_steps=chunk.settings.steps,
        guidance_scale=chunk.settings.guidance_scale,
        control_guidance_end=0.75,
        height=SIDE,
        width=SIDE,
        latents=d.initial_latents(chunk),
        generator=d.step_generators(chunk),
        output_type="np",
    ).images
    difference = float(np.abs(theirs - ours.frames).max())
    print(f"{scheduler}: max abs difference to diffusers' pipeline {difference:.2e}")
    assert theirs.shape == ours.frames.shape == (3, SIDE, SIDE, 3)
    assert difference <= PIPELINE_TOLERANCE
    assert ours.frames.std() > 0.01  # a real image, not a constant


# --- keyframe ControlNet ---------------------------------------------------------------------


def test_keyframe_indices_and_blend():
    assert d.keyframe_indices(10, 4) == [0, 4, 8, 9]
    assert d.keyframe_indices(9, 4) == [0, 4, 8]
    assert d.keyframe_indices(1, 4) == [0]
    assert d.keyframe_indices(5, 1) == [0, 1, 2, 3, 4]
    blend = d.keyframe_blend(6, 4)  # keyframes 0, 4, 5
    assert blend[0] == (0, 0, 0.0) and blend[4] == (1, 1, 0.0) and blend[5] == (2, 2, 0.0)
    assert blend[1] == (0, 1, 0.25) and blend[3] == (0, 1, 0.75)


def test_keyframe_controlnet_counts_and_stays_close(engine):
    frames, steps = 10, 4
    moving = pose_maps(frames, speed=7.0)  # fast motion: interpolation visibly approximates
    every_frame = engine.generate(
        [request(frames, control_images=moving, settings=settings(steps=steps))]
    )[0]
    control_counter = ForwardCounter(engine._modules.controlnet)
    unet_counter = ForwardCounter(engine._modules.unet)
    try:
        chunk = request(
            frames, control_images=moving, settings=settings(steps=steps, controlnet_every=4)
        )
        keyed = engine.generate([chunk])[0]
    finally:
        control_counter.remove()
        unet_counter.remove()
    keyframes = len(d.keyframe_indices(frames, 4))  # 0, 4, 8 and the last frame, 9
    assert keyframes == 4
    assert control_counter.rows == keyframes * steps * 2 == keyed.work_units.controlnet_evals
    assert unet_counter.rows == frames * steps * 2 == keyed.work_units.unet_evals
    assert keyed.work_units == d.predict_chunk_units(chunk.settings, frames, engine.model_weights)
    assert every_frame.work_units.controlnet_evals == frames * steps * 2
    difference = np.abs(keyed.frames.astype(int) - every_frame.frames.astype(int))
    print(f"every=4 vs every=1: mean abs diff {difference.mean():.2f}/255, max {difference.max()}")
    assert difference.mean() > 0.1  # interpolated residuals do change in-between frames
    assert difference.mean() < 4  # ... but only a little (sanity)


def test_residuals_at_keyframes_equal_direct_evaluation(engine):
    chunk = request(5, settings=settings(steps=1, controlnet_every=4))  # keyframes 0 and 4
    seen = {}

    def capture_controlnet(module, args, kwargs, output):
        seen["control_input"] = args[0].clone()
        seen["control_text"] = kwargs["encoder_hidden_states"].clone()
        seen["control_image"] = kwargs["controlnet_cond"].clone()
        seen["control_out"] = [t.clone() for t in [*output[0], output[1]]]

    def capture_unet(module, args, kwargs):
        down = kwargs["down_block_additional_residuals"]
        seen["unet_residuals"] = [
            t.clone() for t in [*down, kwargs["mid_block_additional_residual"]]
        ]

    hooks = [
        engine._modules.controlnet.register_forward_hook(capture_controlnet, with_kwargs=True),
        engine._modules.unet.register_forward_pre_hook(capture_unet, with_kwargs=True),
    ]
    try:
        engine.generate([chunk])
    finally:
        for hook in hooks:
            hook.remove()
    # ControlNet ran on [uncond key0, uncond key4, cond key0, cond key4]; the UNet got
    # [uncond frames 0..4, cond frames 0..4].
    control, unet = seen["control_out"], seen["unet_residuals"]
    with torch.inference_mode():
        direct = engine._modules.controlnet(
            seen["control_input"][[1]],
            engine_timestep(engine, chunk),
            encoder_hidden_states=seen["control_text"][[1]],
            controlnet_cond=seen["control_image"][[1]],
            return_dict=False,
        )
    direct = [*direct[0], direct[1]]
    for level, (keyed, passed) in enumerate(zip(control, unet, strict=True)):
        assert torch.equal(passed[0], keyed[0]), level  # uncond frame 0 = keyframe 0
        assert torch.equal(passed[4], keyed[1]), level  # uncond frame 4 = keyframe 4
        assert torch.equal(passed[9], keyed[3]), level  # cond frame 4 = keyframe 4
        assert torch.allclose(keyed[1], direct[level][0], atol=1e-6), level  # = alone
        middle = 0.5 * keyed[2] + 0.5 * keyed[3]  # cond frame 2, halfway between keyframes
        assert torch.allclose(passed[7], middle, atol=1e-6), level


def engine_timestep(engine: d.DiffusionEngine, chunk: d.ChunkRequest) -> torch.Tensor:
    scheduler = d.build_scheduler(chunk.settings.scheduler, engine._modules.scheduler_config)
    scheduler.set_timesteps(chunk.settings.steps)
    return scheduler.timesteps[0]


def test_control_window_skips_controlnet_outside_it(engine):
    chunk = request(
        3, settings=settings(steps=8, control_guidance_start=0.25, control_guidance_end=0.75)
    )
    counter = ForwardCounter(engine._modules.controlnet)
    try:
        result = engine.generate([chunk])[0]
    finally:
        counter.remove()
    active = sum(d.controlnet_active_steps(8, 0.25, 0.75))
    assert active == 4
    assert counter.rows == 3 * active * 2 == result.work_units.controlnet_evals


# --- CFG, schedulers, batching -----------------------------------------------------------------


def test_guidance_off_halves_unet_work(engine):
    counts = {}
    for guidance in (5.0, 1.0):
        counter = ForwardCounter(engine._modules.unet)
        try:
            result = engine.generate([request(4, settings=settings(guidance_scale=guidance))])[0]
        finally:
            counter.remove()
        counts[guidance] = (counter.rows, result.work_units.unet_evals)
        assert counter.rows == result.work_units.unet_evals
    assert counts[5.0][0] == 2 * counts[1.0][0] == 2 * 4 * 4


def test_batched_requests_equal_each_alone_and_keep_order(engine):
    key = settings(scheduler="euler_a", controlnet_every=2)
    first = request(
        3, job_id="a", chunk_index=2, prompt="a dancer", seed=11, noise_sharing=0.7, settings=key
    )
    second = request(
        4,
        job_id="b",
        chunk_index=0,
        prompt="a robot",
        negative_prompt="",
        seed=12,
        control_images=pose_maps(4, seed=3),
        settings=key,
    )
    alone = [engine.generate([r], frames_dtype="float32")[0] for r in (first, second)]
    together = engine.generate([first, second], frames_dtype="float32")
    assert [(r.job_id, r.chunk_index) for r in together] == [("a", 2), ("b", 0)]
    for single, batched in zip(alone, together, strict=True):
        assert batched.frames.shape == single.frames.shape
        assert float(np.abs(batched.frames - single.frames).max()) <= BATCH_TOLERANCE
        assert batched.work_units == single.work_units
        assert batched.batch_requests == 2 and batched.batch_frames == 7
    assert float(np.abs(together[0].frames[0] - together[1].frames[0]).max()) > 0.01


def test_sub_batches_bound_forward_size_without_changing_results(engine, tiny_sd, tmp_path):
    base, controlnet = tiny_sd_controlnet_sources(tiny_sd.path)
    small = d.DiffusionEngine(
        d.EngineConfig(
            model_id="tiny",
            base=base,
            controlnet=controlnet,
            device="cpu",
            max_frames_per_forward=2,
            cache_dir=tmp_path,
        )
    )
    chunk = request(5, settings=settings(controlnet_every=2))
    reference = engine.generate([chunk], frames_dtype="float32")[0]
    small.load()
    counter = ForwardCounter(small._modules.unet)
    try:
        result = small.generate([chunk], frames_dtype="float32")[0]
    finally:
        counter.remove()
    assert counter.calls == 3 * chunk.settings.steps  # 5 frames in forwards of 2, 2, 1
    assert float(np.abs(result.frames - reference.frames).max()) <= BATCH_TOLERANCE
    assert result.work_units == reference.work_units


def test_results_are_uint8_frames_with_costs(engine):
    result = engine.generate([request(2, settings=settings(precision="fp16"))])[0]
    assert result.frames.dtype == np.uint8 and result.frames.shape == (2, SIDE, SIDE, 3)
    assert result.device == "cpu" and result.precision == "fp32"
    assert any("CPU runs fp32" in note for note in result.notes)
    assert result.wall_seconds >= result.device_seconds > 0
    assert result.load_seconds == 0.0  # already loaded


def test_shared_noise_and_per_frame_noise():
    shared = d.initial_latents(request(4, noise_sharing=1.0))
    assert all(torch.equal(shared[0], frame) for frame in shared)
    mixed = d.initial_latents(request(4, noise_sharing=0.5))
    assert not torch.equal(mixed[0], mixed[1])
    correlation = torch.corrcoef(torch.stack([mixed[0].flatten(), mixed[1].flatten()]))[0, 1]
    assert 0.3 < correlation < 0.7  # half the variance is shared
    other_chunk = d.initial_latents(request(4, noise_sharing=0.5, chunk_index=1))
    assert not torch.equal(mixed, other_chunk)
    assert torch.equal(mixed, d.initial_latents(request(4, noise_sharing=0.5)))


def test_unload_then_generate_reloads(tiny_sd, tmp_path):
    base, controlnet = tiny_sd_controlnet_sources(tiny_sd.path)
    engine = d.DiffusionEngine(
        d.EngineConfig(model_id="tiny", base=base, controlnet=controlnet, cache_dir=tmp_path)
    )
    assert not engine.is_loaded
    first = engine.generate([request(1, settings=settings(steps=1))])[0]
    assert engine.is_loaded and first.load_seconds == pytest.approx(engine.last_load_seconds)
    engine.unload()
    assert not engine.is_loaded
    again = engine.generate([request(1, settings=settings(steps=1))])[0]
    assert again.load_seconds == pytest.approx(engine.last_load_seconds)
    assert np.array_equal(first.frames, again.frames)
    engine.unload()
    small, large = engine.generate([request(1, settings=settings(steps=1)),
                                    request(3, settings=settings(steps=1))])  # fmt: skip
    # A batch pays one load; each chunk carries its share by work units.
    assert small.load_seconds + large.load_seconds == pytest.approx(engine.last_load_seconds)
    ratio = large.work_units.total / small.work_units.total
    assert large.load_seconds == pytest.approx(ratio * small.load_seconds) and ratio > 1


# --- work units -------------------------------------------------------------------------------


def test_predict_work_units_by_hand():
    # Made-up formulas: UNet 100 + T_0 + T_1^2 FLOPs over two levels, ControlNet half its linear
    # part, VAE 3 FLOPs per latent token.
    unet = d.FlopFormula(constant=100, linear=(1, 0), quadratic=(0, 1))
    weights = d.ModelWeights(
        unit_flops=unet.flops(64, 64),  # 100 + 4096 + 1024^2
        unet=unet,
        controlnet=d.FlopFormula(constant=0, linear=(0.5,), quadratic=(0,)),
        vae_decode=d.FlopFormula(constant=0, linear=(3,), quadratic=(0,)),
    )
    units = d.predict_work_units(16, 20, 7.5, 4, 0.0, 1.0, 512, 512, weights)
    assert (units.unet_evals, units.controlnet_evals, units.vae_decodes) == (640, 200, 16)
    unit = 100 + 4096 + 1024**2
    assert units.total == pytest.approx(640 + (200 * 0.5 * 4096 + 16 * 3 * 4096) / unit)
    half = d.predict_work_units(16, 20, 1.0, 4, 0.0, 1.0, 512, 256, weights)
    assert half.unet_evals == 320
    # 512x256: 2048 tokens at level 0, 512 at level 1; self-attention makes it less than half
    assert half.unet_units == pytest.approx(320 * (100 + 2048 + 512**2) / unit, abs=1e-6)
    assert half.unet_units < 160
    odd = d.predict_work_units(1, 1, 1.0, 1, 0.0, 1.0, 520, 264, weights)  # 65 x 33 latent
    assert odd.unet_units == pytest.approx((100 + 65 * 33 + (33 * 17) ** 2) / unit, abs=1e-6)


@pytest.mark.parametrize(
    "frames, overrides",
    [
        (1, {}),
        (6, {"controlnet_every": 3, "steps": 3}),
        (7, {"controlnet_every": 4, "guidance_scale": 1.0, "scheduler": "unipc"}),
        (
            4,
            {
                "controlnet_every": 2,
                "control_guidance_start": 0.2,
                "control_guidance_end": 0.7,
                "steps": 5,
            },
        ),
        (3, {"width": 96, "height": 64, "scheduler": "lcm", "steps": 2}),
    ],
)
def test_counted_units_equal_prediction(engine, frames, overrides):
    key = settings(**overrides)
    maps = np.zeros((frames, key.height, key.width, 3), np.uint8)
    maps[:, :, : SIDE // 2] = pose_maps(frames)[:, : key.height, : SIDE // 2]
    chunk = request(frames, settings=key, control_images=maps)
    result = engine.generate([chunk])[0]
    assert result.work_units == d.predict_chunk_units(chunk.settings, frames, engine.model_weights)


# --- settings and input checks ----------------------------------------------------------------


def test_batch_key_is_stable_readable_and_complete():
    key = settings().batch_key()
    assert key == settings().batch_key()
    assert re.fullmatch(r"[A-Za-z0-9._-]+", key) and key.startswith("tiny-64x64-4-dpmpp_2m-fp32")
    for change in (
        {"guidance_scale": 1.0},
        {"controlnet_every": 2},
        {"fps": 24.0},
        {"control_guidance_end": 0.5},
        {"model_id": "other/model"},
    ):
        assert settings(**change).batch_key() != key, change
    assert re.fullmatch(r"[A-Za-z0-9._-]+", settings(model_id="org/sd 1.5").batch_key())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"width": 100}, "width must be a multiple of 8"),
        ({"height": 32}, "height must be a multiple of 8 between 64"),
        ({"steps": 0}, "steps must be between 1 and 150"),
        ({"steps": 151}, "steps must be between 1 and 150"),
        ({"scheduler": "lcm", "steps": 60}, "lcm scheduler supports at most 50"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"controlnet_every": 0}, "controlnet_every must be 1 or more"),
        ({"control_guidance_start": 0.5, "control_guidance_end": 0.5}, "0 <= start < end"),
        ({"controlnet_conditioning_scale": 9.0}, "controlnet_conditioning_scale"),
    ],
)
def test_invalid_settings_raise_clear_errors(overrides, message):
    with pytest.raises(InvalidSettingError, match=message):
        settings(**overrides)


def test_invalid_requests_raise_clear_errors(engine):
    cases = [
        (request(2, control_images=pose_maps(2, side=72)), "are 72x72 but the settings ask"),
        (request(2, control_images=pose_maps(2).astype(np.float32)), "must be a uint8 array"),
        (request(2, control_images=pose_maps(2)[..., :2]), "must be RGB"),
        (request(2, control_images=pose_maps(2)[0]), "must be a uint8 array"),
        (request(2, settings=settings(model_id="other")), "model 'other' is not served here"),
        (
            request(
                2,
                settings=settings(width=2048, height=2048),
                control_images=np.zeros((2, 2048, 2048, 3), np.uint8),
            ),
            "exceed",
        ),
        (request(65), "1 to 64 frames"),
    ]
    for chunk, message in cases:
        with pytest.raises(InvalidSettingError, match=message):
            engine.generate([chunk])
    with pytest.raises(ValueError, match="share one batch key"):
        engine.generate([request(2), request(2, settings=settings(steps=5))])
    with pytest.raises(ValueError, match="at least one request"):
        engine.generate([])


def test_over_long_prompt_is_truncated_and_reported(engine):
    long_prompt = " ".join(["dancer"] * 120)  # well past CLIP's 77 tokens
    (result,) = engine.generate([request(frames=1, prompt=long_prompt)])
    assert any(note.startswith("prompt truncated to 77 tokens") for note in result.notes)
    (short,) = engine.generate([request(frames=1)])
    assert not any("truncated" in note for note in short.notes)


# --- anchor attention -------------------------------------------------------------------------


def anchor_input(seed: int = 7, maps_seed: int = 0, side: int = SIDE) -> d.AnchorInput:
    """The job's anchor: an image (here a pose map stands in for its keyframe) and its seed."""
    return d.AnchorInput(seed=seed, image=pose_maps(1, seed=maps_seed, side=side)[0])


def anchored(frames: int = 5, anchor: d.AnchorInput | None = None, **overrides) -> d.ChunkRequest:
    key = overrides.pop("settings", settings(anchor="first_keyframe"))
    return request(frames, settings=key, anchor=anchor or anchor_input(), **overrides)


class BankSpy:
    """Records, per step, the anchor keys/values each anchored forward wrote (a copy of the
    bank when its step's anchors are done), wrapping the real AnchorBank method."""

    def __init__(self, monkeypatch):
        from deployments.diffusion.anchor import AnchorBank

        self.steps: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        finish = AnchorBank.finish_writing

        def spy(bank):
            finish(bank)
            self.steps.append(
                {name: (bank.keys[name].clone(), bank.values[name].clone()) for name in bank.keys}
            )

        monkeypatch.setattr(AnchorBank, "finish_writing", spy)

    def rows(self, first: int, count: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Bank rows [first, first + count) of every step."""
        return [
            {
                name: (k[first : first + count], v[first : first + count])
                for name, (k, v) in s.items()
            }
            for s in self.steps
        ]


def _processor_types(engine) -> set[str]:
    return {type(p).__name__ for p in engine._modules.unet.attn_processors.values()}


def test_anchor_off_keeps_keys_and_output_of_before(engine):
    # Golden keys computed with the code before anchor attention existed: a request without
    # the anchor keeps its batch key and its cache key (so nobody's cache is invalidated).
    assert settings().batch_key() == "tiny-64x64-4-dpmpp_2m-fp32-4dbef27c1941"
    assert "anchor" not in settings().model_dump() and "anchor_pool" not in settings().model_dump()
    assert settings(anchor_pool=3).batch_key() == settings().batch_key()  # unused while off
    on = settings(anchor="first_keyframe")
    assert on.model_dump()["anchor"] == "first_keyframe" and on.model_dump()["anchor_pool"] == 2
    assert on.batch_key() != settings().batch_key()
    assert settings(anchor="first_keyframe", anchor_pool=1).batch_key() != on.batch_key()
    assert d.GenerationSettings.model_validate(on.model_dump()) == on
    assert d.GenerationSettings.model_validate(settings().model_dump()) == settings()
    # An anchor-off batch never touches the UNet's attention processors; after an anchored
    # batch the original processors are back and the anchor-off output is bit-identical.
    before = _processor_types(engine)
    chunk = request(4, settings=settings(controlnet_every=2), noise_sharing=0.5)
    first = engine.generate([chunk], frames_dtype="float32")[0]
    engine.generate([anchored(2)])
    assert _processor_types(engine) == before and "AnchorAttnProcessor" not in before
    again = engine.generate([chunk], frames_dtype="float32")[0]
    assert np.array_equal(first.frames, again.frames)
    assert again.work_units.anchor_attention_evals == 0
    assert again.work_units == d.predict_chunk_units(chunk.settings, 4, engine.model_weights)


def test_anchor_changes_every_generated_frame(engine):
    base = engine.generate([anchored(5)], frames_dtype="float32")[0]
    plain = engine.generate([request(5)], frames_dtype="float32")[0]
    for other in (anchor_input(seed=8), anchor_input(maps_seed=4)):  # only the anchor differs
        changed = engine.generate([anchored(5, anchor=other)], frames_dtype="float32")[0]
        per_frame = np.abs(changed.frames - base.frames).reshape(5, -1).max(axis=1)
        print(f"anchor changed: max abs change per frame {np.round(per_frame, 5)}")
        assert (per_frame > 1e-4).all()  # deterministic run: any change is the anchor's
    per_frame = np.abs(plain.frames - base.frames).reshape(5, -1).max(axis=1)
    assert (per_frame > 1e-4).all()  # the anchor acts on every frame


def test_anchor_keys_values_are_the_same_for_every_chunk_of_a_job(engine, monkeypatch):
    spy = BankSpy(monkeypatch)
    key = settings(anchor="first_keyframe", scheduler="euler_a", controlnet_every=2)
    job = anchor_input(seed=21, maps_seed=9)
    chunk0 = anchored(4, anchor=job, settings=key, job_id="j", seed=21)
    engine.generate([chunk0])
    alone = spy.rows(0, 2)  # [uncond, cond] of the only anchor
    spy.steps.clear()
    others = [
        anchored(3, anchor=anchor_input(seed=s, maps_seed=s), settings=key, job_id=f"o{s}",
                 seed=s, prompt=f"other {s}", control_images=pose_maps(3, seed=s))
        for s in (1, 2, 3)
    ]  # fmt: skip
    chunk5 = anchored(
        5, anchor=job, settings=key, job_id="j", seed=21, chunk_index=5,
        control_images=pose_maps(5, seed=30, speed=5.0),
    )  # fmt: skip
    engine.generate([others[0], others[1], chunk5, others[2]])
    batched = spy.rows(4, 2)  # the third request's anchor: bank rows 4 and 5
    assert len(alone) == len(batched) == key.steps
    for step, (a, b) in enumerate(zip(alone, batched, strict=True)):
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert torch.equal(a[name][0], b[name][0]), (step, name)  # keys, bit for bit
            assert torch.equal(a[name][1], b[name][1]), (step, name)  # values
    other_anchor = spy.rows(0, 2)
    assert not torch.equal(other_anchor[0][name][0], batched[0][name][0])


def test_anchored_chunk_alone_equals_it_in_a_batch_of_four(tiny_sd, tmp_path, monkeypatch):
    """Run in float64: in fp32 the tiny random weights amplify the CPU kernels' batch-size
    rounding to ~1e-2 over the steps even without the anchor, which would hide a wrong anchor
    row; in float64 the same code must agree to the output's own float32 rounding."""
    import deployments.diffusion.engine as engine_module

    monkeypatch.setattr(
        engine_module, "resolve_precision", lambda *_: (torch.float64, "fp32", None)
    )
    base, controlnet = tiny_sd_controlnet_sources(tiny_sd.path)
    config = d.EngineConfig(
        model_id="tiny", base=base, controlnet=controlnet, device="cpu", cache_dir=tmp_path
    )
    engine = d.DiffusionEngine(config)
    key = settings(anchor="first_keyframe", controlnet_every=2, scheduler="unipc")
    chunks = [
        anchored(3 + s, anchor=anchor_input(seed=s, maps_seed=s), settings=key, job_id=f"j{s}",
                 seed=s, prompt=f"dancer {s}", noise_sharing=0.8,
                 control_images=pose_maps(3 + s, seed=s))
        for s in range(4)
    ]  # fmt: skip
    alone = [engine.generate([c], frames_dtype="float32")[0] for c in chunks]
    together = engine.generate(chunks, frames_dtype="float32")
    assert engine._modules.unet.dtype == torch.float64
    for single, batched in zip(alone, together, strict=True):
        difference = float(np.abs(batched.frames - single.frames).max())
        assert difference <= 1e-6, difference
        assert batched.work_units == single.work_units
    # The four jobs' anchors differ, so a row reading another job's anchor would show here.
    assert float(np.abs(together[0].frames[0] - together[1].frames[0]).max()) > 0.01


@pytest.mark.parametrize(
    "frames, overrides",
    [
        (5, {}),
        (6, {"controlnet_every": 4, "anchor_pool": 1}),
        (4, {"guidance_scale": 1.0, "scheduler": "euler_a", "anchor_pool": 3}),
        (3, {"control_guidance_start": 0.25, "control_guidance_end": 0.75, "steps": 4}),
        (2, {"width": 96, "height": 72, "scheduler": "lcm", "steps": 2}),
        (3, {"anchor": "reference"}),
    ],
)
def test_anchor_work_is_counted_as_predicted(engine, frames, overrides):
    key = settings(**{"anchor": "first_keyframe", **overrides})
    maps = np.zeros((frames, key.height, key.width, 3), np.uint8)
    maps[:, : SIDE // 2, : SIDE // 2] = pose_maps(frames)[:, : SIDE // 2, : SIDE // 2]
    picture = np.full((key.height, key.width, 3), 90, np.uint8)
    anchor = d.AnchorInput(seed=3, image=picture)
    chunk = request(frames, settings=key, control_images=maps, anchor=anchor)
    unet, control = ForwardCounter(engine._modules.unet), ForwardCounter(engine._modules.controlnet)
    try:
        result = engine.generate([chunk])[0]
    finally:
        unet.remove()
        control.remove()
    passes = 2 if key.cfg else 1
    active = sum(d.controlnet_active_steps(key.steps, key.control_guidance_start,
                                           key.control_guidance_end))  # fmt: skip
    keyframes = len(d.keyframe_indices(frames, key.controlnet_every))
    units = result.work_units
    assert unet.rows == units.unet_evals == (frames + 1) * key.steps * passes  # + anchor row
    assert control.rows == units.controlnet_evals == keyframes * active * passes  # none on it
    assert units.vae_encodes == 1 and units.vae_encode_units > 0  # the anchor image's
    assert units.anchor_attention_evals == frames * key.steps * passes
    assert units.anchor_attention_units > 0
    assert units == d.predict_chunk_units(key, frames, engine.model_weights)
    plain = d.predict_chunk_units(key.model_copy(update={"anchor": "off"}), frames)
    assert d.predict_chunk_units(key, frames).total > plain.total


def reference_input(seed: int = 7, image_seed: int = 0, side: int = SIDE) -> d.AnchorInput:
    """A reference-image anchor: a random picture at the generation size and the job's seed."""
    picture = np.random.default_rng(image_seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return d.AnchorInput(seed=seed, image=picture)


def test_reference_changes_every_generated_frame(engine):
    key = settings(anchor="reference")

    def run(anchor: d.AnchorInput) -> np.ndarray:
        chunk = anchored(5, anchor=anchor, settings=key)
        return engine.generate([chunk], frames_dtype="float32")[0].frames

    base = run(reference_input())
    assert np.array_equal(base, run(reference_input()))  # deterministic: changes are the anchor's
    for other in (reference_input(image_seed=1), reference_input(seed=8)):  # only the anchor
        per_frame = np.abs(run(other) - base).reshape(5, -1).max(axis=1)
        print(f"reference changed: max abs change per frame {np.round(per_frame, 5)}")
        assert (per_frame > 1e-4).all()


@pytest.mark.parametrize("height, width", [(64, 64), (27, 45)])
def test_anchor_attention_costs_what_its_formula_says(engine, height, width):
    """The processor's extra FLOPs (counted by torch on a meta copy of the tiny UNet: on the
    CPU torch counts no FLOPs for its attention kernel) are `ModelWeights.anchor_units`: per
    level, the query tokens x the pooled anchor tokens x 4 x channels of its attn1 layers, also
    where pooling and down-sampling round up (a 27x45 latent)."""
    from deployments.diffusion.anchor import AnchorBank, anchor_attention
    from deployments.diffusion.flops import count_flops

    weights = engine.model_weights
    config = engine._modules.unet.config
    with torch.device("meta"):
        unet = type(engine._modules.unet).from_config(config)
        x = torch.zeros(1, 4, height, width)
        text = torch.zeros(1, 77, config.cross_attention_dim)
        rows = torch.tensor([0])

    def run():
        return unet(x, 10, encoder_hidden_states=text)

    plain = count_flops(run)
    assert plain == weights.unet.flops(height, width)
    for pool in (1, 2, 3):
        bank = AnchorBank(height, width, pool)
        with anchor_attention(unet, bank):
            bank.start_step()
            written = count_flops(run)
            bank.finish_writing()
            bank.rows = rows
            wider = count_flops(run)
        assert written == plain  # the anchor's own pass is a plain evaluation
        expected = weights.anchor_units(8 * width, 8 * height, pool) * weights.unit_flops
        assert wider - plain == pytest.approx(expected, rel=1e-9), pool


def test_anchored_batch_with_a_cancelled_request(engine):
    key = settings(anchor="first_keyframe", scheduler="dpmpp_2m")
    first = anchored(3, settings=key, job_id="a")
    second = anchored(4, anchor=anchor_input(seed=9), settings=key, job_id="b", seed=9)
    alone = engine.generate([second], frames_dtype="float32")[0]
    left, stayed = engine.generate(
        [first, second], frames_dtype="float32", cancelled=lambda step: (0,) if step >= 2 else ()
    )
    assert len(left.frames) == 0 and "cancelled_at_step 2" in left.notes
    assert left.work_units.unet_evals == (3 + 1) * 2 * 2  # two steps of frames and anchor
    assert float(np.abs(stayed.frames - alone.frames).max()) <= BATCH_TOLERANCE
    assert stayed.work_units == alone.work_units
    assert "AnchorAttnProcessor" not in _processor_types(engine)


def test_anchor_inputs_are_checked(engine):
    on = settings(anchor="first_keyframe")
    cases = [
        (request(2, settings=on), "has no anchor"),
        (request(2, anchor=anchor_input()), "anchor was given but settings.anchor is off"),
        (request(2, settings=on, anchor=anchor_input(side=72)), "anchor image must be"),
    ]
    for chunk, message in cases:
        with pytest.raises(InvalidSettingError, match=message):
            engine.generate([chunk])
    with pytest.raises(InvalidSettingError, match="anchor_pool must be between 1 and 4"):
        settings(anchor="first_keyframe", anchor_pool=0)
