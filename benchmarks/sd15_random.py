"""SD 1.5-size models with random weights, built on the spot (no files, no hub), for GPU timing.

Speed and memory depend on the architecture and the dtype, not on the weights' values, so
random weights time a real SD 1.5 as well as trained ones would. The configs below are those
of the published SD 1.5 (`unet/`, `vae/`, `text_encoder/` config.json of
stable-diffusion-v1-5), the OpenPose ControlNet v1.1 (`ControlNetModel.from_unet` of that UNet,
conditioning embedding 16/32/96/256: 361,279,120 parameters) and TencentARC's SD 1.x OpenPose
T2I-Adapter (`full_adapter`, channels 320/640/1280/1280, 2 res blocks, downscale 8).

`tiny=True` gives the same families at tiny widths (the unit tests' shapes), so the calibration
runs every phase on a CPU in seconds. Models are built directly on `device` (random
initialisation of 1.2 B parameters on a CPU would take longer than the whole GPU run).
"""

from __future__ import annotations

from typing import Any

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
}
SD15_CONTROLNET_EMBEDDING = (16, 32, 96, 256)
# AnimateDiff's SD 1.5 motion adapter, v1-5-2 architecture (453,209,280 parameters).
SD15_MOTION_ADAPTER = {
    "block_out_channels": (320, 640, 1280, 1280),
    "motion_layers_per_block": 2,
    "motion_mid_block_layers_per_block": 1,
    "use_motion_mid_block": True,
    "motion_num_attention_heads": 8,
    "motion_norm_num_groups": 32,
    "motion_max_seq_length": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
SD15_ADAPTER = {
    "in_channels": 3,
    "channels": (320, 640, 1280, 1280),
    "num_res_blocks": 2,
    "downscale_factor": 8,
    "adapter_type": "full_adapter",
}


def t2i_adapter_config(unet: Any, *, tiny: bool) -> dict[str, Any]:
    """A full_adapter config whose feature widths match the UNet's down blocks."""
    if not tiny:
        return dict(SD15_ADAPTER)
    from deployments.tiny_models import TINY_T2I_RES_BLOCKS

    channels = tuple(unet.config.block_out_channels)
    return {**SD15_ADAPTER, "channels": channels, "num_res_blocks": TINY_T2I_RES_BLOCKS}


def build_t2i_adapter(unet: Any, *, tiny: bool, device: Any) -> Any:
    """A random-weight T2I-Adapter for `unet` (fp32, eval mode, on `device`)."""
    import torch
    from diffusers import T2IAdapter

    with torch.device(device):
        adapter = T2IAdapter(**t2i_adapter_config(unet, tiny=tiny))
    return adapter.eval().requires_grad_(False)


def sd15_components(tiny_components: Any, *, device: Any, seed: int = 0) -> Any:
    """`SDComponents` of SD 1.5 size with random weights, on `device` in fp32.

    Takes the tokenizer and the scheduler config from `tiny_components` (the tiny models'
    loaded components): the tokenizer's vocabulary does not change the compute (77 tokens
    either way), and the text encoder is built for that vocabulary.
    """
    import dataclasses

    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_components.tokenizer
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=SD15_CONTROLNET_EMBEDDING
        )
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **SD15_TEXT,
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )
        )
    modules = {"unet": unet, "controlnet": controlnet, "vae": vae, "text_encoder": text_encoder}
    for module in modules.values():
        module.eval().requires_grad_(False)
    return dataclasses.replace(tiny_components, **modules, load_seconds=0.0)


def parameter_count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())
