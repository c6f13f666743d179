"""benchmarks/peer.py: the hooks count what the pipelines call, the meta-device runs record what
real CPU runs do, and a recorded call's FLOPs are those of a direct meta-device count."""

from __future__ import annotations

import pytest

from benchmarks import peer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_peer_size_is_512_on_the_short_side_rounded_to_8():
    assert peer.peer_size(1920, 1080) == (912, 512)
    assert peer.peer_size(1080, 1920) == (512, 912)
    assert peer.peer_size(512, 512) == (512, 512)


def test_hooks_count_one_pipeline_frame_and_meta_records_the_cpu_run(tiny_sd):
    size = (128, 72)
    pipeline = peer.load_peer_pipeline(tiny_sd.path, "cpu")
    cpu = peer.peer_frame(pipeline, size, seed=0)
    counts = peer.call_counts(cpu)
    # CFG batched: one UNet and one ControlNet call of 2 rows per step; one VAE decode; the
    # prompt and the negative prompt encoded apart
    assert counts == {
        "controlnet calls": peer.PEER_STEPS,
        "controlnet rows": 2 * peer.PEER_STEPS,
        "text_encoder calls": 2,
        "text_encoder rows": 2,
        "unet calls": peer.PEER_STEPS,
        "unet rows": 2 * peer.PEER_STEPS,
        "vae_decode calls": 1,
        "vae_decode rows": 1,
    }
    assert {call.shape for call in cpu if call.model == "unet"} == {(2, 4, 9, 16)}
    assert {call.cond for call in cpu if call.model == "controlnet"} == {(2, 3, 72, 128)}
    # the meta device (a Python dispatch per op: 4 steps keep it short) records the same calls
    cpu = peer.peer_frame(pipeline, size, seed=0, steps=4)
    meta = peer.peer_frame(peer.load_peer_pipeline(tiny_sd.path, "meta"), size, seed=1, steps=4)
    assert meta == cpu and len(cpu) == 4 * 2 + 3


def test_meta_engine_records_what_the_cpu_engine_runs(tiny_sd, tmp_path):
    from benchmarks.cost import full_plan

    plan = full_plan("standard")  # anchor pool 4, ControlNet every 4th frame, CFG
    settings = plan.generation.model_copy(update={"width": 64, "height": 64, "steps": 2})
    request = peer.chunk_request(settings, 5, plan)
    recorded = []
    engines = peer.tiny_engine(tiny_sd.path, tmp_path), peer.meta_engine(tiny_sd.path, tmp_path)
    for engine in engines:
        engine.load()
        m = engine._modules
        with peer.recording(unet=m.unet, controlnet=m.controlnet, vae=m.vae,
                            text_encoder=m.text_encoder) as calls:  # fmt: skip
            engine.generate([request])
        recorded.append(calls)
    assert recorded[1] == recorded[0]
    counts = peer.call_counts(recorded[0])
    # per step: the anchor's pass (2 rows), the frames (10 rows); keyframes 0 and 4 (and the
    # last, 4) through the ControlNet: 2 x 2 rows; the anchor image VAE-encoded once
    assert counts["unet calls"] == 2 * 2 and counts["unet rows"] == (2 + 10) * 2
    assert counts["controlnet rows"] == 4 * 2 and counts["vae_encode calls"] == 1
    reading = [call for call in recorded[0] if call.model == "unet" and call.anchor_pool]
    assert len(reading) == 2 and {call.anchor_pool for call in reading} == {4}


def test_weighing_a_recorded_call_equals_a_direct_meta_count():
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.sd15_random import SD15_UNET

    weigher = peer.FlopWeigher()

    def direct(rows: int) -> int:
        counter = FlopCounterMode(display=False)
        with torch.device("meta"), counter, torch.no_grad():
            text = torch.zeros(rows, 77, 768)
            unet(torch.zeros(rows, 4, 64, 64), 10, encoder_hidden_states=text)
        return counter.get_total_flops()

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    one_row = weigher.flops(peer.Call("unet", (1, 4, 64, 64)))
    assert 0.7e12 < one_row < 0.9e12  # SD 1.5's UNet at 512x512: about 0.8 TFLOPs
    # counted per row and multiplied: equal to a direct count of the whole batch
    assert weigher.flops(peer.Call("unet", (2, 4, 64, 64))) == direct(2) == 2 * one_row
    # A call reading pool-4 anchor keys/values: QK^T and AV (4 x tokens x keys x channels)
    # over 1/16 more keys in every attn1 layer
    shapes = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        shapes.append((hidden.shape[1], module.to_q.out_features))

    hooks = [module.register_forward_pre_hook(record, with_kwargs=True)
             for name, module in unet.named_modules() if name.endswith("attn1")]  # fmt: skip
    direct(1)
    for hook in hooks:
        hook.remove()
    attention = sum(4 * tokens * tokens * channels for tokens, channels in shapes)
    anchored = weigher.flops(peer.Call("unet", (2, 4, 64, 64), anchor_pool=4))
    assert anchored - 2 * one_row == 2 * attention // 16


def test_upscaler_weighing_matches_the_convolutions_by_hand():
    # SRVGGNetCompact animevideov3: 3->64, 16 x 64->64, 64->48 3x3 convolutions at input size
    height, width = 72, 128
    macs = height * width * 9 * (3 * 64 + 16 * 64 * 64 + 64 * 48)
    call = peer.Call("upscaler:realesr-animevideov3-x4", (1, 3, height, width))
    assert peer.FlopWeigher().flops(call) == 2 * macs


def test_plan_chunks_follow_the_orchestrators_spans():
    from benchmarks.cost import full_plan

    standard, high = full_plan("standard"), full_plan("high")
    runs = [(r["what"], r["frames"], r["count"]) for r in peer.plan_chunks(standard, 120)]
    assert runs == [("anchor keyframe", 1, 1), ("chunk of 16", 16, 7), ("chunk of 8", 8, 1)]
    runs = [(r["frames"], r["count"]) for r in peer.plan_chunks(high, 120)]
    assert runs == [(1, 1), (16, 1), (17, 6), (9, 1)]  # one overlap frame after chunk 0
    assert peer.upscaled_frames(standard, 120) == 120 + 7
    assert sum(f * c for f, c in runs[1:]) == 120 + 7  # each overlap frame generated twice


def test_cost_report_carries_the_latest_peer_ratios(tmp_path):
    import json

    assert peer.summary(tmp_path / "absent.json") is None
    row = {"diffusion_only": 3.9, "with_upscale_gpu_tiers_gpu": 3.5}
    result = {
        "when": "2026-12-02T16:00:00+00:00",
        "label": "FLOP counts, not GPU-measured seconds",
        "peer": {"what": "the pipeline", "size": "912x512", "steps": 20, "guidance_scale": 7.5},
        "comparison": {"standard": row},
    }
    path = tmp_path / "peer.json"
    path.write_text(json.dumps(result))
    section = peer.summary(path)
    assert section["peer_over_ours"] == {"standard": row}
    text = peer.format_summary(section)
    assert "FLOP counts" in text and "3.90x" in text and "3.50x" in text
