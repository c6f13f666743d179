"""benchmarks/cost.py: the lever table, the full-size CPU seconds and the GPU path's code."""

from __future__ import annotations

import json

import pytest

from benchmarks import cost

FP16_UNMEASURED = {"time_factor": 1.0, "basis": "not measured: no GPU"}


def test_levers_stacked_reach_the_standard_plan_and_a_repeat_costs_nothing():
    table = cost.lever_table(FP16_UNMEASURED, {"factor": 0.6, "basis": "measured"}, "scale")
    rows = {row["key"]: row for row in table["rows"]}
    assert table["stack_reaches_standard_units"]
    assert rows["batching"]["alone"]["saving_pct"] == pytest.approx(40.0)
    assert rows["batching"]["alone"]["units"] == table["naive"]["units"]  # time, not work
    assert rows["fps"]["alone"]["saving_pct"] == pytest.approx(52.0)  # 120 of 250 frames
    assert rows["fp16"]["cumulative"]["step_saving_pct"] == 0.0  # unmeasured: x1.0
    assert rows["cache"]["cumulative"]["units"] == 0.0
    assert rows["cache"]["cumulative"]["spot"] == 0.0
    # Every lever saves but coherence, which costs its (bounded) share.
    assert -cost.COHERENCE_BUDGET_PCT <= rows["coherence"]["cumulative"]["step_saving_pct"] < 0
    savings = [
        row["cumulative"]["saving_pct"] for row in table["rows"] if row["key"] != "coherence"
    ]
    assert savings == sorted(savings)


def test_batching_factor_comes_from_the_engine_rows(tmp_path):
    path = tmp_path / "batching.json"
    rows = [{"batch": 1, "s_per_unit": 0.2}, {"batch": 4, "s_per_unit": 0.12}]
    path.write_text(json.dumps({"when": "today", "engine": {"rows": rows}}))
    found = cost.batching_factor(path)
    assert found["measured"] and found["factor"] == pytest.approx(0.6)
    missing = cost.batching_factor(tmp_path / "absent.json")
    assert not missing["measured"] and missing["factor"] == 1.0
    assert "not measured" in missing["basis"]


def test_cpu_side_seconds_scale_to_10_s_and_use_the_full_size_calibration():
    run = {
        "seconds_of_clip": 4.0,
        "stages": {
            "pose": {"seconds": 1.0},
            "diffusion": {"seconds": 50.0},
            "upscale": {"seconds": 2.0},
            "interpolate": {"seconds": 4.0},
        },
    }
    calibration = {
        "768x432": {
            "upscale_cpu_s_per_frame": 2.0,
            "upscale_frames_measured": 1,
            "flow_cpu_s_per_pair": 0.03,
            "flow_cpu_s_per_pair_at_run_size": 0.01,
        }
    }
    seconds = cost.cpu_side_seconds("standard", run, calibration)
    assert "diffusion" not in seconds  # priced from work units on the GPU
    assert seconds["pose"]["seconds"] == pytest.approx(2.5)
    # 120 generated frames in 8 chunks; each chunk also upscales the next one's first frame.
    assert seconds["upscale"]["seconds"] == pytest.approx(2.0 * 127)
    pairs = cost.interpolated_pairs(cost.full_plan("standard"), 120)
    assert 100 < pairs < 120
    assert seconds["interpolate"]["seconds"] == pytest.approx(10.0 + 0.02 * pairs)
    naive = cost.cpu_side_seconds("naive", run, calibration)
    assert set(naive) == {"pose"}  # naive generates every frame at output size


def test_naive_bills_its_cpu_side_stages_at_the_gpu_price():
    _, _, price = next(row for row in cost.tier_rows() if row[0] == "scale")
    plan = cost.plan_dollars(1000.0, 3600.0, price, naive=False)
    naive = cost.plan_dollars(1000.0, 3600.0, price, naive=True)
    assert plan["gpu_s"] == naive["gpu_s"] == pytest.approx(1000 * price.seconds_per_work_unit)
    gpu_hours = plan["gpu_s"] / 3600
    cents = 1e-5  # dollars are rounded to 5 decimals
    expected = gpu_hours * price.on_demand_gpu_hour + 0.0425
    assert plan["on_demand"] == pytest.approx(expected, abs=cents)
    naive_expected = (gpu_hours + 1) * price.on_demand_gpu_hour
    assert naive["on_demand"] == pytest.approx(naive_expected, abs=cents)


def test_full_size_prediction_is_the_estimate_and_far_below_naive():
    standard = cost.full_size_prediction("standard")
    # 120 frames and the anchor keyframe (standard's anchor attention)
    assert standard["generation"] == "768x432" and standard["generated_frames"] == 121
    assert standard["naive"]["generation"] == "1920x1080"
    assert standard["naive"]["generated_frames"] == 250
    assert standard["naive"]["work_units"]["total"] / standard["work_units"]["total"] > 20


def test_precision_rows_run_on_cpu(tiny_sd):
    # The GPU path's code on the CPU: both precisions run fp32 there and no VRAM is read.
    rows = cost.measure_precisions(tiny_sd.path, "cpu", (64, 64), steps=1)
    assert [row["precision"] for row in rows] == ["fp32", "fp32"]
    assert all(row["s_per_unit"] > 0 and row["peak_gib"] is None for row in rows)


def test_standard_coherence_splits_its_overhead_and_keeps_the_budget():
    plain = cost.full_size_prediction("standard", coherence=cost.NO_COHERENCE)
    standard = cost.full_size_prediction("standard")
    assert (standard["anchor"], standard["anchor_pool"], standard["noise"]) == (
        "first_keyframe", 4, "job_windows")  # fmt: skip
    assert (plain["anchor"], plain["noise"]) == ("off", "per_chunk")
    assert standard["naive"]["work_units"] == plain["naive"]["work_units"]
    row = cost.anchor_overhead(plain, standard)
    print(cost.format_anchor({"anchor": row, "ratios_vs_naive": {"work_units": 22.0}}))
    parts = row["keyframe_pct"] + row["anchor_pass_pct"] + row["wider_attention_pct"]
    assert row["overhead_pct"] == pytest.approx(parts, abs=0.03)  # job noise is free
    # pool 4: the wider attention costs 1/16 of a full-size anchor's, about the keyframe's
    assert 0 < max(row["keyframe_pct"], row["wider_attention_pct"]) < row["anchor_pass_pct"]
    assert row["overhead_pct"] <= cost.COHERENCE_BUDGET_PCT
    naive = standard["naive"]["work_units"]["total"]
    assert naive / standard["work_units"]["total"] >= 20


def test_coherence_rows_beside_the_budget():
    section = cost.coherence_rows()
    print(cost.format_coherence(section))
    rows = {row["row"]: row for row in section["rows"]}
    assert rows["no coherence"]["overhead_pct"] == 0.0
    assert rows["seamless only (job noise)"]["overhead_pct"] == 0.0  # the noise is free
    assert rows["high, no coherence"]["overhead_pct"] == 0.0
    standard = rows["standard: anchor pool 4 + job noise"]
    anchor_only = rows["anchor only (pool 4)"]
    assert standard["work_units"] == anchor_only["work_units"]
    assert section["budget_met"] and standard["within_budget"] and standard["x_naive"] >= 20
    assert 0 < standard["overhead_pct"] == section["standard_overhead_pct"]
    # A finer anchor and an overlap frame each cost more; high's settings together exceed the
    # standard budget, which is why they are high's and not standard's.
    finer, overlap = rows["anchor pool 2 + job noise"], rows["pool 4 + job noise + 1 overlap"]
    high_settings = rows["high's: pool 2 + job noise + 1 overlap"]
    assert standard["overhead_pct"] < finer["overhead_pct"] < high_settings["overhead_pct"]
    assert standard["overhead_pct"] < overlap["overhead_pct"] < high_settings["overhead_pct"]
    # 120 frames in 8 chunks of 16: 7 chunks generate 1 overlap frame more; +1: the keyframe
    assert [standard["generated_frames"], overlap["generated_frames"]] == [121, 128]
    high = rows["high (its coherence)"]
    assert (high["anchor_pool"], high["noise"], high["chunk_overlap"]) == (2, "job_windows", 1)
    assert high["work_units"]["total"] > rows["high, no coherence"]["work_units"]["total"]


def test_turbo_levers_stack_to_the_turbo_plan_and_cost_no_lora_work():
    from benchmarks.cost import full_size_prediction, turbo_levers

    section = turbo_levers()
    assert section["stack_reaches_turbo_units"]
    assert [row["lever"] for row in section["rows"]] == [
        "6 lcm steps (few-step LoRA)",
        "CFG off (guidance 1.0)",
    ]
    standard = full_size_prediction("standard")  # turbo has standard's coherence
    turbo = full_size_prediction("turbo")
    # A third of the steps and half the UNet/ControlNet rows per step; VAE decodes unchanged.
    assert turbo["work_units"]["unet_evals"] * 6 == standard["work_units"]["unet_evals"]
    assert turbo["naive"] == standard["naive"]  # the baseline is the same plain SD 1.5
    assert section["ratio_vs_naive"] > 100 and section["fused_lora_extra_units"] == 0.0


def test_t2i_adapter_rows_trade_controlnet_passes_for_one_adapter_pass_per_keyframe():
    from benchmarks.cost import conditioner_rows

    section = conditioner_rows()
    rows = {row["preset"]: row for row in section["rows"]}
    for row in rows.values():
        units = row["work_units"]
        assert units["controlnet_evals"] == 0 and units["adapter_evals"] > 0
        assert 0 < row["saving_pct"] < 20  # only ControlNet's share of each step goes
        assert row["x_naive"] > row["preset_x_naive"]
    # once per keyframe per chunk, not per step: turbo's 6 steps and standard's 18 pay the same
    assert (
        rows["turbo"]["work_units"]["adapter_evals"]
        == (rows["standard"]["work_units"]["adapter_evals"])
    )
    stacked = [step["work_units"] for step in section["cumulative"]]
    assert stacked == sorted(stacked, reverse=True)
    assert stacked[-1] == rows["turbo"]["work_units"]["total"]


def test_density_rows_follow_the_clip_schedule(monkeypatch):
    from deployments.density import DensitySchedule

    # 120 frames in 8 chunks: half of them slow (6 fps)
    schedule = DensitySchedule(frames=120, chunk_frames=16, strides=(2, 1) * 4, speeds=(0,) * 8)
    monkeypatch.setattr(cost, "full_size_schedule", lambda clip, plan: schedule)
    section = cost.density_rows(None)
    standard, turbo = section["rows"]
    assert standard["generated_frames"] == 8 * 4 + 16 * 3 + 8 + 1  # + the anchor keyframe
    assert standard["fixed_generated_frames"] == 121
    assert standard["work_units"] < standard["fixed_units"] and standard["saving_pct"] > 20
    assert standard["x_naive"] > standard["fixed_x_naive"]
    assert turbo["work_units"] < standard["work_units"]
    assert section["schedule"]["slow_fraction"] == pytest.approx(64 / 120, abs=1e-3)
    what_if = section["if_slow"]
    assert [row["slow_chunks"] for row in what_if] == list(range(9))
    assert what_if[0]["work_units"] == standard["fixed_units"]  # no chunk slow: the full rate
    units = [row["work_units"] for row in what_if]
    assert units == sorted(units, reverse=True) and len(set(units)) == len(units)
