"""LoRA adapters (deployments/diffusion/lora.py): tiny random LoRAs built like real ones, read from
a file, a directory or S3, checked against the UNet, fused for a batch and unfused exactly.

All on CPU fp32 with the tiny SD 1.5 + ControlNet (`tiny_sd`) and LoRAs from
`deployments.tiny_models.build_tiny_lora`, 64x64 frames and a few steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from deployments import diffusion as d
from deployments.diffusion.lora import (
    LoraRef,
    LoraSource,
    UNetLoras,
    check_lora_fits,
    lora_digest,
    read_lora_state,
    resolve_lora_file,
)
from deployments.errors import InvalidSettingError
from deployments.model_loading import tiny_sd_controlnet_sources
from deployments.tiny_models import TINY_LORA_RANK, build_tiny_lora
from tests.unit.test_diffusion import SIDE, pose_maps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Fused vs the same adapter applied unfused at every step: the same maths in another order
# (W + s BA) x against W x + s B(A x)); fp32 rounding, amplified by random weights over the
# steps, stays far below this quarter of an 8-bit level.
FUSE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def loras(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    """Two tiny LoRAs (seeds 1 and 2) as saved directories."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "one": build_tiny_lora(tiny_sd.path, root / "one", seed=1).parent,
        "two": build_tiny_lora(tiny_sd.path, root / "two", seed=2).parent,
    }


def digest_of(path: Path) -> str:
    source = LoraSource(uri=str(path))
    return lora_digest("x", source, resolve_lora_file("x", source, path.parent))


@pytest.fixture(scope="module")
def lora_engine(tiny_sd, loras, tmp_path_factory) -> d.DiffusionEngine:
    base, controlnet = tiny_sd_controlnet_sources(tiny_sd.path)
    config = d.EngineConfig(
        model_id="tiny",
        base=base,
        controlnet=controlnet,
        device="cpu",
        cache_dir=tmp_path_factory.mktemp("model-cache"),
        loras={
            "one": LoraSource(uri=str(loras["one"])),  # a directory
            "two": LoraSource(uri=str(loras["two"] / "pytorch_lora_weights.safetensors")),
        },
    )
    engine = d.DiffusionEngine(config)
    engine.load()
    return engine


def refs(loras: dict[str, Path], **scales: float) -> tuple[LoraRef, ...]:
    return tuple(
        LoraRef(name=name, digest=digest_of(loras[name]), scale=scale)
        for name, scale in scales.items()
    )


def chunk(loras: tuple[LoraRef, ...] = (), frames: int = 2, **fields) -> d.ChunkRequest:
    settings = d.GenerationSettings(
        model_id="tiny",
        width=SIDE,
        height=SIDE,
        steps=fields.pop("steps", 3),
        scheduler=fields.pop("scheduler", "dpmpp_2m"),
        precision="fp32",
        guidance_scale=fields.pop("guidance_scale", 5.0),
        controlnet_every=1,
        loras=loras,
    )
    return d.ChunkRequest(
        job_id="job",
        chunk_index=0,
        prompt="a person dancing",
        negative_prompt="blurry",
        seed=7,
        control_images=pose_maps(frames),
        settings=settings,
        **fields,
    )


def frames_of(engine: d.DiffusionEngine, request: d.ChunkRequest) -> np.ndarray:
    return engine.generate([request], frames_dtype="float32")[0].frames


# --- the tiny LoRA and the batch key -------------------------------------------------------------


def test_tiny_lora_is_deterministic_and_in_diffusers_format(tiny_sd, tmp_path):
    first = build_tiny_lora(tiny_sd.path, tmp_path / "a", seed=3)
    again = build_tiny_lora(tiny_sd.path, tmp_path / "b", seed=3)
    assert first.name == "pytorch_lora_weights.safetensors"
    assert first.read_bytes() == again.read_bytes()
    state = load_file(str(first))
    assert all(key.startswith("unet.") for key in state)
    downs = [v for k, v in state.items() if ".lora_A." in k]
    assert downs and all(v.shape[0] == TINY_LORA_RANK for v in downs)
    assert all(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)  # not a no-op


def test_loras_are_part_of_the_batch_key_only_when_present(loras):
    plain = d.GenerationSettings(model_id="tiny")
    assert "loras" not in plain.model_dump()  # keys of requests without LoRAs are unchanged
    with_one = plain.model_copy(update={"loras": refs(loras, one=1.0)})
    with_one = d.GenerationSettings.model_validate(with_one.model_dump())
    assert with_one.model_dump()["loras"][0]["name"] == "one"
    scaled = d.GenerationSettings.model_validate(
        {**plain.model_dump(), "loras": [r.model_dump() for r in refs(loras, one=0.5)]}
    )
    keys = {plain.batch_key(), with_one.batch_key(), scaled.batch_key()}
    assert len(keys) == 3  # the set and the scale both separate batches
    # One set, one key, in any order; a name twice is refused.
    both = refs(loras, one=1.0, two=0.5)
    a = d.GenerationSettings(model_id="tiny", loras=both)
    b = d.GenerationSettings(model_id="tiny", loras=both[::-1])
    assert a.batch_key() == b.batch_key()
    with pytest.raises(InvalidSettingError, match="once"):
        d.GenerationSettings(model_id="tiny", loras=both + both[:1])


def test_batches_with_different_loras_are_refused_together(lora_engine, loras):
    with pytest.raises(ValueError, match="one batch key"):
        lora_engine.generate([chunk(), chunk(refs(loras, one=1.0))])


# --- fusing ---------------------------------------------------------------------------------------


def test_fused_lora_changes_the_frames_and_unfusing_restores_the_base_exactly(lora_engine, loras):
    lora_engine.apply_loras(())
    unet = lora_engine._modules.unet
    base_weights = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    base = frames_of(lora_engine, chunk())
    fused = frames_of(lora_engine, chunk(refs(loras, one=1.0)))
    assert np.abs(fused - base).mean() > 0.01  # the LoRA does something
    again = frames_of(lora_engine, chunk())
    # Bit-exact: the base weights are copied back from the copy taken before the first merge
    # (PEFT's unmerge alone subtracts the delta in floating point, ~1e-6 off).
    assert np.array_equal(again, base)
    after = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items()}
    for name, weight in base_weights.items():
        assert torch.equal(after[name.replace(".base_layer", "")], weight), name


def test_fused_equals_the_adapter_applied_at_every_step(tiny_sd, loras):
    """Fusing is an optimisation, not another model: the UNet with the LoRA merged into its
    weights computes what PEFT's unmerged adapter layers compute."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd.path), subfolder="unet").eval()
    path = loras["one"] / "pytorch_lora_weights.safetensors"
    state = read_lora_state("one", LoraSource(uri=str(path)), path)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        base = unet(x, 10, encoder_hidden_states=text).sample
        adapters = UNetLoras(unet)
        ref = LoraRef(name="one", digest="d", scale=0.7)
        adapters.apply([ref], lambda ref: state)
        fused = unet(x, 10, encoder_hidden_states=text).sample
        unet.unfuse_lora()  # the same adapter, unmerged: applied in every forward
        unmerged = unet(x, 10, encoder_hidden_states=text).sample
    assert (fused - base).abs().max() > 0.05
    assert (fused - unmerged).abs().max() < FUSE_TOLERANCE


def test_two_lora_sets_on_one_engine_load_each_file_once(lora_engine, loras):
    one, two = refs(loras, one=1.0), refs(loras, two=1.0)
    loads = lora_engine.lora_loads
    first_one = frames_of(lora_engine, chunk(one))
    first_two = frames_of(lora_engine, chunk(two))
    both = frames_of(lora_engine, chunk(refs(loras, one=1.0, two=1.0)))
    again_one = frames_of(lora_engine, chunk(one))
    assert np.abs(first_one - first_two).mean() > 0.01
    assert np.abs(both - first_one).mean() > 0.01 and np.abs(both - first_two).mean() > 0.01
    assert np.array_equal(again_one, first_one)  # swapping back gives the same frames
    assert lora_engine.lora_loads - loads <= 2  # cached adapters are not read again


def test_scale_zero_is_the_base_and_scale_changes_the_frames(lora_engine, loras):
    base = frames_of(lora_engine, chunk())
    zero = frames_of(lora_engine, chunk(refs(loras, one=0.0)))
    half = frames_of(lora_engine, chunk(refs(loras, one=0.5)))
    full = frames_of(lora_engine, chunk(refs(loras, one=1.0)))
    assert np.abs(zero - base).max() < FUSE_TOLERANCE
    assert np.abs(half - full).mean() > 0.005


def test_a_fused_lora_adds_no_work_units(lora_engine, loras):
    plain = lora_engine.generate([chunk(frames=3)])[0]
    fused = lora_engine.generate([chunk(refs(loras, one=1.0), frames=3)])[0]
    predicted = d.predict_chunk_units(chunk().settings, 3, lora_engine.model_weights)
    assert fused.work_units == plain.work_units == predicted


def test_turbo_like_settings_run_with_lcm_and_tcd(lora_engine, loras):
    """A few-step LoRA with the few-step schedulers, CFG off: one UNet row per frame."""
    for scheduler in d.FEW_STEP_SCHEDULERS:
        request = chunk(refs(loras, one=1.0), scheduler=scheduler, steps=2, guidance_scale=1.0)
        result = lora_engine.generate([request])[0]
        assert result.frames.shape == (2, SIDE, SIDE, 3)
        assert result.work_units.unet_evals == 2 * 2  # frames x steps, no CFG half
        assert result.work_units == d.predict_chunk_units(
            request.settings, 2, lora_engine.model_weights
        )


# --- sources ------------------------------------------------------------------------------------


def test_file_directory_and_s3_give_the_same_lora(loras, moto_s3, tmp_path):
    file = loras["one"] / "pytorch_lora_weights.safetensors"
    client = moto_s3.client()
    client.upload_file(str(file), moto_s3.bucket, "loras/one/pytorch_lora_weights.safetensors")
    digests = set()
    for uri in (str(file), str(loras["one"]), f"s3://{moto_s3.bucket}/loras/one"):
        source = LoraSource(uri=uri)
        path = resolve_lora_file("one", source, tmp_path / "cache", s3_client=client)
        assert path.suffix == ".safetensors"
        digests.add(lora_digest("one", source, path))
    assert len(digests) == 1
    # A bucket that does not exist (or that these credentials cannot read): a clear error.
    with pytest.raises(InvalidSettingError, match="LoRA 'one'"):
        resolve_lora_file(
            "one", LoraSource(uri="s3://elsewhere/lora"), tmp_path / "c2", s3_client=client
        )


def test_an_engine_loads_a_lora_from_s3(tiny_sd, loras, moto_s3, tmp_path):
    file = loras["two"] / "pytorch_lora_weights.safetensors"
    client = moto_s3.client()
    client.upload_file(str(file), moto_s3.bucket, "loras/two.safetensors")
    base, controlnet = tiny_sd_controlnet_sources(tiny_sd.path)
    config = d.EngineConfig(
        model_id="tiny",
        base=base,
        controlnet=controlnet,
        device="cpu",
        cache_dir=tmp_path,
        loras={"two": LoraSource(uri=f"s3://{moto_s3.bucket}/loras/two.safetensors")},
    )
    engine = d.DiffusionEngine(config, s3_client=client)
    ref = LoraRef(name="two", digest=digest_of(file))
    engine.apply_loras([ref])
    assert engine.lora_loads == 1


# --- bad LoRAs -----------------------------------------------------------------------------------


def test_bad_lora_files_are_refused_with_a_clear_message(tiny_sd, loras, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd.path), subfolder="unet")
    good = loras["one"] / "pytorch_lora_weights.safetensors"
    state = load_file(str(good))

    def refused(path: Path, match: str) -> None:
        source = LoraSource(uri=str(path))
        with pytest.raises(InvalidSettingError, match=match):
            resolved = resolve_lora_file("bad", source, tmp_path)
            check_lora_fits("bad", read_lora_state("bad", source, resolved)[0], unet)

    pickled = tmp_path / "lora.bin"
    torch.save(state, pickled)
    refused(pickled, "not a .safetensors file")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    refused(garbage, "not a readable safetensors file")
    not_lora = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(32, 4, 3, 3)}, str(not_lora))
    refused(not_lora, "not LoRA weights")
    # Another model's LoRA: same module names, other widths (e.g. SD 1.5's 320 against 32).
    wide = {k: torch.zeros(v.shape[0], v.shape[1] * 10) if ".lora_A." in k else v
            for k, v in state.items()}  # fmt: skip
    save_file(wide, str(tmp_path / "wide.safetensors"))
    refused(tmp_path / "wide.safetensors", "another model")
    ranks = {k: torch.zeros(v.shape[0], 2) if ".lora_B." in k else v for k, v in state.items()}
    save_file(ranks, str(tmp_path / "ranks.safetensors"))
    refused(tmp_path / "ranks.safetensors", "ranks of A and B differ")
    elsewhere = {k.replace("down_blocks.0", "down_blocks.9"): v for k, v in state.items()}
    save_file(elsewhere, str(tmp_path / "elsewhere.safetensors"))
    refused(tmp_path / "elsewhere.safetensors", "does not have")
    text = {**state, "text_encoder.layer.q_proj.lora_A.weight": torch.zeros(4, 32)}
    save_file(text, str(tmp_path / "text.safetensors"))
    refused(tmp_path / "text.safetensors", "text encoder")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, "0 .safetensors files")
    refused(tmp_path / "absent.safetensors", "does not exist")


def test_engine_refuses_unknown_changed_and_misfit_loras_before_the_loop(
    lora_engine, loras, tmp_path
):
    with pytest.raises(InvalidSettingError, match=r"not configured.*configured: \['one', 'two'\]"):
        lora_engine.generate([chunk((LoraRef(name="three", digest="x"),))])
    with pytest.raises(InvalidSettingError, match="changed since the job was planned"):
        lora_engine.generate([chunk((LoraRef(name="one", digest="0" * 16),))])
    # A file replaced by a misfit one under a configured name: refused, the UNet untouched.
    misfit = tmp_path / "misfit"
    shutil.copytree(loras["one"], misfit)
    path = misfit / "pytorch_lora_weights.safetensors"
    state = load_file(str(path))
    save_file({k: torch.zeros(v.shape[0], 3 * v.shape[1]) if ".lora_A." in k else v
               for k, v in state.items()}, str(path))  # fmt: skip
    engine_config = lora_engine.config.model_copy(
        update={"loras": {**lora_engine.config.loras, "misfit": LoraSource(uri=str(misfit))}}
    )
    base = frames_of(lora_engine, chunk())
    lora_engine.config, saved = engine_config, lora_engine.config
    try:
        with pytest.raises(InvalidSettingError, match="another model"):
            lora_engine.generate([chunk((LoraRef(name="misfit", digest=digest_of(misfit)),))])
    finally:
        lora_engine.config = saved
    assert np.array_equal(frames_of(lora_engine, chunk()), base)
