"""GPU calibration (issue 18.7), tested on a CPU: the tiny mode runs every phase, the script needs
none of the packages a lent GPU machine lacks, the carried wheels are chosen and sized right, and
the price table scales a measured GPU's figure to each tier."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.version import Version

from benchmarks import gpu_calibration, gpu_carry
from serve import cost

ROOT = Path(__file__).resolve().parents[2]
# Not on the lent GPU machine (av, mediapipe, ray), or not needed there and absent (boto3), or
# the app (serve: the calibration must not need it).
BLOCKED = (
    "ray",
    "av",
    "mediapipe",
    "boto3",
    "botocore",
    "serve",
    "fastapi",
    "starlette",
    "uvicorn",
    "spandrel",
    "moto",
)


def run_blocked(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where the BLOCKED packages look absent, as on the GPU
    machine: `None` in sys.modules makes both `import` and `importlib.util.find_spec` (which
    diffusers asks about optional packages) treat them as not installed."""
    guard = f"import sys\nsys.modules.update(dict.fromkeys({BLOCKED!r}))\n"
    return subprocess.run(
        [sys.executable, "-c", guard + textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )


def test_the_guard_hides_what_it_names():
    result = run_blocked(
        "import importlib.util\nassert importlib.util.find_spec('av') is None\nimport ray"
    )
    assert result.returncode != 0 and "import of ray halted" in result.stderr


def test_tiny_cpu_run_does_every_phase_without_ray_av_mediapipe_boto3_or_serve(tmp_path):
    out, copy = tmp_path / "result.json", tmp_path / "device-out"
    result = run_blocked(f"""
        import sys
        from benchmarks import gpu_calibration
        code = gpu_calibration.main(["--device", "cpu", "--tiny", "--out", {str(out)!r},
                                     "--also-copy-to", {str(copy)!r}, "--batches", "2",
                                     "--repeats", "1", "--budget-scale", "100"])
        blocked = sorted(m for m, v in sys.modules.items()
                         if m.split(".")[0] in {BLOCKED!r} and v is not None)
        print("loaded blocked modules:", blocked)
        sys.exit(code)
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded blocked modules: []" in result.stdout
    document = json.loads(out.read_text())
    assert json.loads((copy / gpu_calibration.RESULT_NAME).read_text()) == document
    assert document["schema"] == gpu_calibration.SCHEMA and document["tiny"] is True
    assert {name: phase["status"] for name, phase in document["phases"].items()} == {
        "smoke": "done",
        "engine": "done",
        "conditioners": "done",
    }
    assert document["failures"] == []
    smoke = document["phases"]["smoke"]["cases"]
    assert len(smoke) == 2 * len(gpu_calibration.SMOKE_CASES) and all(c["ok"] for c in smoke)
    assert {c["precision_requested"] for c in smoke} == {"fp16", "bf16"}
    assert all(c["precision_used"] == "fp32" and c["device"] == "cpu" for c in smoke)
    engine = document["phases"]["engine"]["cases"]
    assert len(engine) == 2 * 2  # precision x CFG (one batch size)
    for case in engine:
        assert case["seconds_per_work_unit"] > 0 and case["frames_finite"]
        assert case["unet_evals"] == case["steps"] * case["batch_frames"] * (
            2 if case["cfg"] else 1
        )
    summary = document["phases"]["conditioners"]["summary"]
    assert summary["controlnet_step_seconds_per_frame"] > 0
    assert 0 < document["phases"]["conditioners"]["adapter_flops_per_unet_eval"] < 1
    assert document["reference"]["cfg"] and document["reference"]["batch_frames"] == 2
    # A CPU, tiny run never prices anything.
    assert cost.read_measured_rate(out) is None


def test_phases_out_of_time_skip_their_cases_and_still_write_json(tmp_path):
    out = tmp_path / "result.json"
    budgets = dict.fromkeys(gpu_calibration.PHASES, 0.0)
    document = gpu_calibration.calibrate(
        "cpu", tiny=True, output=out, budgets=budgets, batches=(1,), repeats=1
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(document))
    for phase in document["phases"].values():
        assert phase["status"] == "partial" and phase["skipped"] and not phase["cases"]
    assert document["reference"] is None


def test_default_output_is_the_results_folder_only_for_a_full_cuda_run():
    assert gpu_calibration.default_output("cpu", True).parts[:2] == ("out", "gpu_calibration")
    assert gpu_calibration.default_output("cpu", False).parts[0] == "out"


# --- carried wheels -------------------------------------------------------------------------------

PINS = {"diffusers": "0.42.1", "pydantic": "2.14.4", "pydantic-core": "2.50.5"}
CORE = "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"


def test_wheels_are_selected_by_pin_and_platform():
    files = {
        "diffusers-0.42.1-py3-none-any.whl": 6_000_000,
        "diffusers-0.41.0-py3-none-any.whl": 6_000_000,  # stale download: left out
        "pydantic-2.14.4-py3-none-any.whl": 500_000,
        CORE: 2_000_000,
        "pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl": 2_000_000,
        "notes.txt": 10,
    }
    wheels, problems = gpu_carry.select_wheels(files, PINS)
    assert [w.file for w in wheels] == [
        "diffusers-0.42.1-py3-none-any.whl",
        "pydantic-2.14.4-py3-none-any.whl",
        CORE,
    ]
    assert problems == [
        "pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl does not run on CPython "
        "3.12 x86-64 Linux"
    ]
    wheels, problems = gpu_carry.select_wheels({CORE: 1}, PINS)
    assert sorted(problems) == ["no wheel of diffusers==0.42.1", "no wheel of pydantic==2.14.4"]


def test_only_pure_or_cp312_manylinux_x86_64_wheels_run_on_the_machine():
    runs = gpu_carry.runs_on_machine
    assert runs("diffusers-0.42.1-py3-none-any.whl") and runs(CORE)
    assert runs("cryptography-44.0.0-cp39-abi3-manylinux_2_28_x86_64.whl")
    assert not runs("x-1.0-cp313-abi3-manylinux_2_28_x86_64.whl")
    assert not runs("x-1.0-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert not runs("pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_aarch64.whl")
    assert not runs("pydantic_core-2.50.5-cp312-cp312-macosx_11_0_arm64.whl")
    assert not runs("pydantic_core-2.50.5-cp312-cp312-musllinux_1_1_x86_64.whl")


def test_requirements_are_met_by_carried_wheels_or_the_machine():
    carried = {"pydantic-core": Version("2.50.5"), "typing-extensions": Version("4.16.0")}
    requirements = {
        "pydantic": [
            "pydantic-core==2.50.5",
            "typing-extensions>=4.16.0",
            "email-validator>=2.0.0; extra == 'email'",
        ],
        "diffusers": ["numpy", "importlib_metadata", "Pillow", "tomli>=1.1; python_version<'3.11'"],
    }
    assert gpu_carry.unmet_requirements(requirements, carried) == []
    unmet = gpu_carry.unmet_requirements(
        {"pydantic": ["pydantic-core==2.51.0", "rich-toolkit"]}, carried
    )
    assert unmet == [
        "pydantic needs pydantic-core==2.51.0; carried pydantic-core 2.50.5",
        "pydantic needs rich-toolkit; neither carried nor on the machine",
    ]


def test_the_size_check_counts_the_working_tree_too():
    wheels = [gpu_carry.Wheel("a.whl", "a", Version("1"), 40 * 2**20)]
    assert gpu_carry.size_problems(wheels, tree=20 * 2**20) == []
    (problem,) = gpu_carry.size_problems(wheels, tree=30 * 2**20)
    assert problem == "wheels 40.0 MiB + working tree 30.0 MiB = 70.0 MiB > 64 MiB"


def test_pins_carry_diffusers_and_pydantic_as_tested_here_and_the_machines_hub():
    pins = gpu_carry.carry_pins()
    for name in ("diffusers", "pydantic", "pydantic-core"):
        assert pins[name] == __import__("importlib.metadata").metadata.version(name)
    assert pins["huggingface-hub"] == "1.33.0"


# --- prices from a measurement -------------------------------------------------------------------


def calibration_file(folder: Path, gpu: str, seconds: float, **changes) -> Path:
    path = folder / "gpu" / "gpu_calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "device": "cuda",
        "tiny": False,
        "created": "2026-12-02T12:00:00+00:00",
        "machine": {"gpu": gpu},
        "reference": {"seconds_per_work_unit": seconds},
    } | changes
    path.write_text(json.dumps(document))
    return path


def test_a_measured_figure_is_scaled_to_each_tier_by_fp16_tensor_tflops(tmp_path):
    assert cost.hardware_kind("NVIDIA H200") == "h200"
    assert cost.hardware_kind("NVIDIA L4") == "l4" and cost.hardware_kind("NVIDIA L40S") is None
    assert cost.hardware_kind("NVIDIA GeForce RTX 3090") == "rtx3090"
    assert cost.scaled_seconds_per_work_unit(0.002, "h200", "l4") == pytest.approx(
        0.002 * 989.4 / 121.0
    )
    assert cost.find_measured_rate(tmp_path) is None
    calibration_file(tmp_path, "NVIDIA H200", 0.002)
    rate = cost.find_measured_rate(tmp_path)
    assert rate.hardware == "h200" and rate.seconds_per_work_unit == 0.002
    table = cost.with_measured_rate(cost.ESTIMATED_PRICES, rate)
    for kind, price in table.hardware.items():
        before = cost.ESTIMATED_PRICES.hardware[kind]
        assert price.seconds_per_work_unit_source == "scaled"  # no H200 row: all scaled
        assert price.seconds_per_work_unit == pytest.approx(
            cost.scaled_seconds_per_work_unit(0.002, "h200", kind)
        )
        assert price.on_demand_gpu_hour == before.on_demand_gpu_hour
    assert table.hardware["l4"].seconds_per_work_unit > table.hardware["a100"].seconds_per_work_unit
    # A measurement on a tier's own GPU is taken as it is.
    l4 = cost.MeasuredRate(
        gpu="NVIDIA L4", hardware="l4", seconds_per_work_unit=0.04, created="", path=""
    )
    measured = cost.with_measured_rate(cost.ESTIMATED_PRICES, l4).hardware["l4"]
    assert (measured.seconds_per_work_unit, measured.seconds_per_work_unit_source) == (
        0.04,
        "measured",
    )


def test_cpu_tiny_or_unknown_gpu_results_leave_the_estimates(tmp_path):
    calibration_file(tmp_path, "", 0.5, device="cpu")
    assert cost.find_measured_rate(tmp_path) is None
    calibration_file(tmp_path, "NVIDIA H200", 0.5, tiny=True)
    assert cost.find_measured_rate(tmp_path) is None
    calibration_file(tmp_path, "NVIDIA RTX PRO 6000", 0.5)
    assert cost.find_measured_rate(tmp_path) is None
    assert cost.with_measured_rate(cost.ESTIMATED_PRICES, None) is cost.ESTIMATED_PRICES
    estimated = cost.find_measured_rate() is None
    assert (cost.DEFAULT_PRICES is cost.ESTIMATED_PRICES) == estimated
    if estimated:
        sources = {p.seconds_per_work_unit_source for p in cost.DEFAULT_PRICES.hardware.values()}
        assert sources == {"estimate"}


# --- SD 1.5-size models (built on the meta device: shapes and counts, no memory) ------------------


def test_sd15_random_models_have_sd15_shapes_and_fit_together(tmp_path):
    """The GPU run builds these on CUDA; here on the meta device: the configs give SD 1.5's
    parameter counts (those the work-unit weights were measured on), and the UNet takes the
    ControlNet's and the T2I-Adapter's residuals at 512x512 (phase 3's forwards)."""
    import torch

    from benchmarks.sd15_random import build_t2i_adapter, parameter_count, sd15_components
    from deployments.diffusion import SD15_MODEL_WEIGHTS
    from deployments.model_loading import load_sd_components, tiny_sd_controlnet_sources
    from deployments.tiny_models import build_tiny_sd_controlnet

    tiny = load_sd_components(
        *tiny_sd_controlnet_sources(build_tiny_sd_controlnet(tmp_path / "tiny")),
        dtype=torch.float32,
        cache_dir=tmp_path,
    )
    sd = sd15_components(tiny, device="meta")
    assert parameter_count(sd.unet) == SD15_MODEL_WEIGHTS.unet_parameters
    assert parameter_count(sd.controlnet) == SD15_MODEL_WEIGHTS.controlnet_parameters
    assert sd.tokenizer is tiny.tokenizer and sd.scheduler_config == tiny.scheduler_config
    adapter = build_t2i_adapter(sd.unet, tiny=False, device="meta")
    with torch.device("meta"), torch.no_grad():
        latents, text = torch.zeros(2, 4, 64, 64), torch.zeros(2, 77, 768)
        images = torch.zeros(2, 3, 512, 512)
        down, mid = sd.controlnet(
            latents, 10, encoder_hidden_states=text, controlnet_cond=images, return_dict=False
        )
        features = adapter(images)
        for extra in (
            {"down_block_additional_residuals": down, "mid_block_additional_residual": mid},
            {"down_intrablock_additional_residuals": features},
        ):
            out = sd.unet(latents, 10, encoder_hidden_states=text, **extra).sample
            assert out.shape == latents.shape
        decoded = sd.vae.decode(latents).sample
        assert decoded.shape == images.shape
        assert sd.text_encoder(torch.zeros(1, 77, dtype=torch.long))[0].shape == (1, 77, 768)
