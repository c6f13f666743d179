"""Tiny random-weight models with the production architectures, for tests and the offline demo.

Each builder writes files in exactly the format the production loaders read, so the tiny models go
through the same loading code as real weights. Builds are deterministic: the same seed gives the
same bytes. No hub is contacted.

Sections:
- Stable Diffusion 1.5 family + ControlNet (`build_tiny_sd_controlnet`): a diffusers directory.
- AnimateDiff motion adapter for that tiny UNet (`build_tiny_motion_adapter`): a diffusers
  directory (config.json + one .safetensors, which is also the single-file form).
- T2I-Adapter (openpose layout) for that tiny UNet (`build_tiny_t2i_adapter`): a diffusers
  directory.
- Real-ESRGAN upscalers: added by the upscale stage.
"""

from __future__ import annotations

import json
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Stable Diffusion 1.5 + ControlNet (diffusers format)
# ---------------------------------------------------------------------------------------------
#
# Layout written (what StableDiffusionControlNetPipeline.from_pretrained and
# deployments.model_loading read): model_index.json, unet/, vae/, text_encoder/, tokenizer/,
# scheduler/ and controlnet/ alongside, in one directory. The production loader takes the
# ControlNet as a separate source; for the tiny models that source is the `controlnet`
# subfolder of the same directory (see `tiny_sd_controlnet_sources`).
#
# Real SD 1.5 shapes kept where they matter: 4 latent channels, VAE factor 8 (four VAE blocks),
# four UNet blocks (three cross-attention down blocks, one plain), cross-attention width equal
# to the text encoder's hidden size, 77-token prompts, the SD 1.5 scheduler config. Widths and
# depths are tiny (about 2.8 M parameters in all, 11 MB).

TINY_UNET_CHANNELS = (32, 32, 64, 64)  # the UNet's block widths (the adapters match them)

TINY_SD_TEXT_WIDTH = 32
TINY_SD_MAX_TOKENS = 77  # CLIP's context length, which SD prompts are padded to
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# A few byte-level BPE merges so the tokenizer exercises real merging, not only single bytes.
_TINY_MERGES = [
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("e", "r</w>"),
    ("o", "n</w>"),
    ("d", "a"),
    ("n", "c"),
]
# SD 1.5's own scheduler config (PNDM); the engine builds the scheduler it is asked for from it.
_SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2/CLIP convention).

    Printable Latin-1 bytes stand for themselves; the others are shifted above U+00FF in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols = {}
    shift = 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + shift)
            shift += 1
    return [symbols[byte] for byte in range(256)]


def _tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a tiny CLIP byte-level BPE tokenizer.

    Token order follows CLIP's: bytes, bytes ending a word, merged tokens, the special tokens.
    """
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in _TINY_MERGES]
    tokens += [_BOS, _EOS]
    return {token: index for index, token in enumerate(tokens)}, list(_TINY_MERGES)


def _tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _tiny_clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_SD_MAX_TOKENS)


def _write_vocab_files(directory: Path) -> None:
    """vocab.json and merges.txt, the files every CLIP tokenizer implementation can read."""
    vocab, merges = _tiny_clip_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (directory / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")


def _tiny_sd_modules(seed: int, vocab_size: int, eos_token_id: int, bos_token_id: int):
    """The tiny UNet, ControlNet, VAE and text encoder, each seeded on its own."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=TINY_UNET_CHANNELS,
        layers_per_block=1,
        cross_attention_dim=TINY_SD_TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(8, 16, 32, 32)
    )
    _randomize_zero_convolutions(controlnet, seed + 2)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    torch.manual_seed(seed + 4)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_SD_TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_SD_MAX_TOKENS,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    return unet, controlnet, vae, text_encoder


def _randomize_zero_convolutions(controlnet, seed: int) -> None:
    """Give ControlNet's zero-initialised convolutions random weights.

    A freshly made ControlNet adds exactly zero to the UNet (its training starts there), which
    would make every ControlNet test pass vacuously; trained ControlNets add real residuals that
    follow the pose maps. The output convolutions get small weights; the pose-map embedding's
    last convolution gets large ones, so the residuals change visibly with the pose maps.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    scaled = [(module, 0.05) for module in controlnet.controlnet_down_blocks]
    scaled += [(controlnet.controlnet_mid_block, 0.05)]
    scaled += [(controlnet.controlnet_cond_embedding.conv_out, 2.0)]
    with torch.no_grad():
        for module, std in scaled:
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def build_tiny_sd_controlnet(directory: str | Path, seed: int = 0) -> Path:
    """Build the tiny SD 1.5 + ControlNet pipeline into `directory` (diffusers format).

    Deterministic: the same seed writes the same weights. Returns the directory.
    """
    from diffusers import PNDMScheduler, StableDiffusionControlNetPipeline

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_clip_tokenizer()
    unet, controlnet, vae, text_encoder = _tiny_sd_modules(
        seed, len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id
    )
    pipeline = StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler=PNDMScheduler.from_config(_SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    _write_vocab_files(directory / "tokenizer")
    return directory


# ---------------------------------------------------------------------------------------------
# AnimateDiff motion adapter (diffusers MotionAdapter) for the tiny UNet
# ---------------------------------------------------------------------------------------------
#
# Block widths and layers per block match the tiny UNet's (UNetMotionModel.from_unet2d checks
# both); a motion mid block as in AnimateDiff v2; 32 positions like the real adapters. The
# temporal layers' output projections start at zero in AnimateDiff's training (a fresh adapter
# adds nothing); here every weight is random, so the module visibly changes the frames and a
# test of "the module ran" cannot pass vacuously.

TINY_MOTION_HEADS = 2
TINY_MOTION_MAX_FRAMES = 32


def build_tiny_motion_adapter(directory: str | Path, seed: int = 0) -> Path:
    """Build the tiny random-weight motion adapter into `directory` (diffusers format:
    config.json and diffusion_pytorch_model.safetensors). Deterministic for a seed."""
    import torch
    from diffusers import MotionAdapter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + 10)
    adapter = MotionAdapter(
        block_out_channels=TINY_UNET_CHANNELS,
        motion_layers_per_block=1,
        motion_mid_block_layers_per_block=1,
        use_motion_mid_block=True,
        motion_num_attention_heads=TINY_MOTION_HEADS,
        motion_norm_num_groups=32,
        motion_max_seq_length=TINY_MOTION_MAX_FRAMES,
    )
    generator = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if name.endswith("proj_out.weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    adapter.save_pretrained(directory, safe_serialization=True)
    return directory


# ---------------------------------------------------------------------------------------------
# T2I-Adapter (diffusers T2IAdapter) for the tiny UNet
# ---------------------------------------------------------------------------------------------
#
# The openpose adapters' layout (TencentARC's SD 1.x ones): `full_adapter`, 3 input channels
# (the RGB pose map), pixel-unshuffle by 8, one feature map per UNet down block with the
# block's width (added inside the block: `down_intrablock_additional_residuals`). One res block
# per level instead of two. Its weights are random (no zero initialisation in T2I-Adapters), so
# the features visibly change the frames and follow the pose maps.

TINY_T2I_RES_BLOCKS = 1


def build_tiny_t2i_adapter(directory: str | Path, seed: int = 0) -> Path:
    """Build the tiny random-weight T2I-Adapter into `directory` (diffusers format:
    config.json and diffusion_pytorch_model.safetensors). Deterministic for a seed."""
    import torch
    from diffusers import T2IAdapter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + 20)
    adapter = T2IAdapter(
        in_channels=3,
        channels=TINY_UNET_CHANNELS,
        num_res_blocks=TINY_T2I_RES_BLOCKS,
        downscale_factor=8,
        adapter_type="full_adapter",
    )
    adapter.save_pretrained(directory, safe_serialization=True)
    return directory


# ---------------------------------------------------------------------------------------------
# Real-ESRGAN upscalers (safetensors state dicts, the format of the converted real weights)
# ---------------------------------------------------------------------------------------------
#
# Same key layouts as the real models (RRDBNet's conv_first/body/conv_up/conv_hr/conv_last,
# SRVGGNetCompact's body.N), so spandrel detects them as it detects realesrgan-x4plus and
# realesr-animevideov3. spandrel's RRDBNet fixes the dense-block growth at 32 channels, so the
# tiny RRDB keeps that and shrinks the feature width and the block count instead.

TINY_RRDB_FEAT = 16
TINY_RRDB_BLOCKS = 2
TINY_RRDB_GROW = 32
TINY_COMPACT_FEAT = 8
TINY_COMPACT_CONVS = 4
TINY_UPSCALER_SCALE = 4


def _tiny_rrdb_shapes(feat: int, blocks: int, grow: int, scale: int) -> list[tuple[str, tuple]]:
    shapes = [("conv_first", (feat, 3, 3, 3))]
    for block in range(blocks):
        for rdb in (1, 2, 3):
            prefix = f"body.{block}.rdb{rdb}"
            for conv in range(1, 5):
                shapes.append((f"{prefix}.conv{conv}", (grow, feat + (conv - 1) * grow)))
            shapes.append((f"{prefix}.conv5", (feat, feat + 4 * grow)))
    shapes.append(("conv_body", (feat, feat)))
    shapes += [(f"conv_up{i}", (feat, feat)) for i in range(1, scale.bit_length())]
    shapes += [("conv_hr", (feat, feat)), ("conv_last", (3, feat))]
    return [(name, (*shape[:2], 3, 3)) for name, shape in shapes]


def _tiny_compact_shapes(feat: int, convs: int, scale: int) -> list[tuple[str, tuple]]:
    shapes = [("body.0", (feat, 3, 3, 3)), ("body.1", (feat,))]
    for index in range(2, 2 + 2 * convs, 2):
        shapes += [(f"body.{index}", (feat, feat, 3, 3)), (f"body.{index + 1}", (feat,))]
    shapes.append((f"body.{2 + 2 * convs}", (3 * scale * scale, feat, 3, 3)))
    return shapes


def _random_state_dict(shapes: list[tuple[str, tuple]], seed: int, gain: float) -> dict:
    """He-scaled random weights (times `gain`), small biases, PReLU slopes near 0.25."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes:
        if len(shape) == 1:  # PReLU slopes
            state[f"{name}.weight"] = 0.25 + 0.05 * torch.randn(shape, generator=generator)
            continue
        fan_in = shape[1] * shape[2] * shape[3]
        std = gain * (2.0 / fan_in) ** 0.5
        state[f"{name}.weight"] = torch.randn(shape, generator=generator) * std
        state[f"{name}.bias"] = torch.randn(shape[0], generator=generator) * 0.01
    return state


def _save_upscaler(state: dict, path: str | Path, kind: str, seed: int) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key: safetensors writes several in random order, which would change the bytes.
    save_file(state, str(path), metadata={"motionserve_tiny_model": f"{kind} seed={seed}"})
    return path


def build_tiny_rrdb(path: str | Path, seed: int = 0) -> Path:
    """A tiny Real-ESRGAN RRDBNet x4 (2 blocks, 16 features) as `.safetensors` at `path`."""
    shapes = _tiny_rrdb_shapes(
        TINY_RRDB_FEAT, TINY_RRDB_BLOCKS, TINY_RRDB_GROW, TINY_UPSCALER_SCALE
    )
    # Gain chosen so outputs spread over [0, 1] (std about 0.2) instead of saturating or
    # collapsing to one grey, which would make tiling and resizing tests pass vacuously.
    state = _random_state_dict(shapes, seed, gain=0.75)
    state["conv_last.bias"] += 0.5
    return _save_upscaler(state, path, "rrdb", seed)


def build_tiny_compact(path: str | Path, seed: int = 0) -> Path:
    """A tiny SRVGGNetCompact x4 (4 body convolutions, 8 features) as `.safetensors`."""
    shapes = _tiny_compact_shapes(TINY_COMPACT_FEAT, TINY_COMPACT_CONVS, TINY_UPSCALER_SCALE)
    return _save_upscaler(_random_state_dict(shapes, seed, gain=0.5), path, "compact", seed)


# ---------------------------------------------------------------------------------------------
# LoRA for the tiny UNet (diffusers' LoRA save format: pytorch_lora_weights.safetensors)
# ---------------------------------------------------------------------------------------------
#
# A PEFT LoRA on the tiny UNet's attention projections (to_q, to_k, to_v, to_out.0), saved with
# diffusers' `save_lora_weights` ("unet."-prefixed lora_A/lora_B keys), so it goes through the
# same reading, checking and fusing code as a real LoRA. Its up matrices are random, not zero
# (a freshly initialised LoRA changes nothing, which would make every test pass vacuously).

TINY_LORA_RANK = 4
TINY_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def build_tiny_lora(model_directory: str | Path, directory: str | Path, seed: int = 0) -> Path:
    """A random LoRA for the tiny UNet in `model_directory`, saved into `directory`; returns
    the .safetensors file. Deterministic for a seed."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(str(model_directory), subfolder="unet")
    torch.manual_seed(seed)
    config = LoraConfig(
        r=TINY_LORA_RANK,
        lora_alpha=TINY_LORA_RANK,
        init_lora_weights="gaussian",
        target_modules=list(TINY_LORA_TARGETS),
    )
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                std = 0.3 if "lora_B" in name else 0.5
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    directory = Path(directory)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        directory, unet_lora_layers=get_peft_model_state_dict(unet)
    )
    return directory / "pytorch_lora_weights.safetensors"
