"""GPU calibration: the diffusion engine on CUDA, then SD 1.5-size speed and memory (issue 18.7).

Made for a lent GPU machine that reaches no package registry and has torch and transformers but
not diffusers or pydantic: it needs only the diffusion engine (`deployments.diffusion`,
`deployments.model_loading`, `deployments.tiny_models`) and the wheels `make gpu-carry` brings
(`benchmarks/gpu_carry.py`); it imports no Ray, PyAV, MediaPipe or boto3, and nothing of
`serve` (a test holds it to that). `bash benchmarks/gpu_calibration.sh` installs the wheels and
runs it there; on a CUDA machine with the project installed `make bench-gpu` runs it directly.

Phases, each time-boxed (a phase out of time skips its remaining cases and says so), the JSON
rewritten after every case so a run cut short still leaves its figures:
1. smoke: the engine on the tiny models (built on the spot) in fp16 and in bf16, with and
   without CFG, ancestral and multistep schedulers, anchor attention off and on an anchor image
   (VAE-encoded per chunk): frames finite, the result's device and precision and the modules'
   dtype as asked, work units counted == predicted. The CUDA path had never run before this:
   dtype and device bugs show here first.
2. engine: SD 1.5-size random weights (`benchmarks/sd15_random.py`) at 512x512 through the
   engine's own loop: fp16 and fp32, chunks of 1/2/4/8 frames in one forward, CFG on and off,
   ControlNet on every frame. Seconds per work unit (the engine's compute seconds / the work
   units it counted, `deployments.diffusion.work_units`) and peak VRAM
   (torch.cuda.max_memory_allocated) per case.
3. conditioners: ControlNet against T2I-Adapter at SD 1.5 size: one forward of each model (UNet
   alone, ControlNet, UNet with either's residuals, the adapter, the VAE decoder) timed at one
   batch, and the per-frame cost of a denoising step with each conditioner (the adapter runs
   once per frame, not per step). Time ratios beside the work-unit formula's weights.

The reference figure (`reference.seconds_per_work_unit`) is the fp16, CFG-on case with the
largest batch: the serving configuration. `serve.cost` scales it to each tier's GPU.

`--device cpu --tiny` runs every phase with the tiny models at 64x64 in seconds (the unit
tests do); its results are never used for prices (`tiny` is true, `device` is 'cpu').
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import device_slug, pin_threads
from benchmarks.sd15_random import build_t2i_adapter, parameter_count, sd15_components
from deployments.diffusion.t2i_adapter import measure_adapter_formula

SCHEMA = "motionserve-gpu-calibration/1"
RESULT_NAME = "gpu_calibration.json"
RESULTS_ROOT = Path(__file__).parent / "results"
# Seconds per phase on the GPU (the whole run, wheels installed, must stay under 8 minutes).
DEFAULT_BUDGETS = {"smoke": 90.0, "engine": 210.0, "conditioners": 90.0}
BATCHES = (1, 2, 4, 8)
PHASES = ("smoke", "engine", "conditioners")


class Deadline:
    """A phase's time box: `left()` seconds remain of `budget` from the phase's start."""

    def __init__(self, budget: float):
        self.budget = budget
        self.started = time.perf_counter()

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def spent(self) -> float:
        return time.perf_counter() - self.started


class Run:
    """The result document, rewritten to each of `paths` after every case (a lent machine's
    $OUT among them, so a run cut short still sends its figures back)."""

    def __init__(self, paths: list[Path], document: dict[str, Any]):
        self.paths = paths
        self.document = document

    def save(self) -> None:
        text = json.dumps(self.document, indent=2, default=_json_default) + "\n"
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".json.tmp")
            temporary.write_text(text)
            temporary.replace(path)

    def phase(self, name: str) -> dict[str, Any]:
        return self.document["phases"][name]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# --- the machine ----------------------------------------------------------------------------------


def machine(device: str) -> dict[str, Any]:
    import diffusers
    import pydantic
    import torch
    import transformers

    info: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "pydantic": pydantic.VERSION,
        "platform": platform.platform(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "gpu_memory_bytes": props.total_memory,
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    return info


def default_output(device: str, tiny: bool) -> Path:
    """benchmarks/results/<gpu name>/ for a full CUDA run (committed); out/ otherwise."""
    if device == "cuda" and not tiny:
        import torch

        return RESULTS_ROOT / device_slug(torch.cuda.get_device_name(0)) / RESULT_NAME
    name = "tiny" if tiny else device
    return Path("out") / "gpu_calibration" / f"{device}-{name}" / RESULT_NAME


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, int]]:
    """Peak bytes allocated inside the block (CUDA only; 0 on a CPU)."""
    import torch

    found = {"peak_bytes": 0}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield found
    if device == "cuda":
        torch.cuda.synchronize()
        found["peak_bytes"] = int(torch.cuda.max_memory_allocated())


# --- requests -------------------------------------------------------------------------------------


def make_request(
    settings: Any, frames: int, *, chunk: int = 0, anchor: bool = False, seed: int = 7
) -> Any:
    """A chunk request with random pose maps (and a random anchor image when anchored)."""
    from deployments.diffusion import AnchorInput, ChunkRequest

    rng = np.random.default_rng(seed + chunk)
    shape = (settings.height, settings.width, 3)
    images = rng.integers(0, 256, size=(frames, *shape), dtype=np.uint8)
    reference = None
    if anchor:
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        reference = AnchorInput(seed=seed, image=image)
    return ChunkRequest(
        job_id=f"calibration-{chunk}",
        chunk_index=chunk,
        prompt="a person dancing in a sunlit park",
        negative_prompt="blurry",
        seed=seed,
        noise_sharing=0.5,
        control_images=images,
        settings=settings,
        anchor=reference,
    )


def engine_config(device: str, precision: str, base: Any, controlnet: Any, frames: int) -> Any:
    from deployments.diffusion import EngineConfig

    return EngineConfig(
        model_id="calibration",
        base=base,
        controlnet=controlnet,
        device=device,
        precision=precision,
        max_frames_per_forward=frames,
        max_frames_per_request=64,
    )


def module_dtype(module: Any) -> str:
    return str(next(module.parameters()).dtype).removeprefix("torch.")


# --- phase 1: smoke -----------------------------------------------------------------------------

SMOKE_CASES = (
    # (name, scheduler, guidance, anchor)
    ("dpmpp_2m_cfg", "dpmpp_2m", 7.5, False),
    ("euler_a_no_cfg", "euler_a", 1.0, False),
    ("unipc_cfg_anchor_image", "unipc", 5.0, True),
)


def smoke_case(engine: Any, precision: str, case: tuple, side: int, steps: int) -> dict[str, Any]:
    """One generation on the tiny models; the checks it failed under 'failures'."""
    from deployments.diffusion import (
        GenerationSettings,
        predict_chunk_units,
        resolve_precision,
    )

    name, scheduler, guidance, anchor = case
    settings = GenerationSettings(
        model_id="calibration",
        width=side,
        height=side,
        steps=steps,
        scheduler=scheduler,
        precision=precision,
        guidance_scale=guidance,
        controlnet_every=2,
        anchor="first_keyframe" if anchor else "off",
    )
    requests = [make_request(settings, 3, chunk=i, anchor=anchor) for i in range(2)]
    results = engine.generate(requests, frames_dtype="float32")
    device_type = engine.config.device
    dtype, expected, _ = resolve_precision(precision, device_type)
    failures = []
    for result, request in zip(results, requests, strict=True):
        frames = result.frames
        if frames.shape != (request.frames, side, side, 3):
            failures.append(f"{result.job_id}: frames shape {frames.shape}")
        if not np.isfinite(frames).all():
            failures.append(f"{result.job_id}: non-finite frames")
        if not result.device.startswith(device_type):
            failures.append(f"{result.job_id}: ran on {result.device}, not {device_type}")
        if result.precision != expected:
            failures.append(f"{result.job_id}: precision {result.precision} != {expected}")
        predicted = predict_chunk_units(settings, request.frames, engine.model_weights)
        if result.work_units != predicted:
            failures.append(
                f"{result.job_id}: counted {result.work_units.total} != predicted "
                f"{predicted.total} work units"
            )
    wanted = str(dtype).removeprefix("torch.")
    for part in ("unet", "controlnet", "vae", "text_encoder"):
        got = module_dtype(getattr(engine._modules, part))
        if got != wanted:
            failures.append(f"{part} is {got}, not {wanted}")
    frames = np.concatenate([r.frames for r in results])
    return {
        "case": name,
        "precision_requested": precision,
        "precision_used": results[0].precision,
        "device": results[0].device,
        "frames": int(frames.shape[0]),
        "frames_std": float(frames.std()) if np.isfinite(frames).all() else None,
        "work_units": sum(r.work_units.total for r in results),
        "notes": results[0].notes,
        "failures": failures,
        "ok": not failures,
    }


def run_smoke(run: Run, device: str, model_dir: Path, deadline: Deadline) -> None:
    from deployments.diffusion import DiffusionEngine
    from deployments.model_loading import tiny_sd_controlnet_sources

    phase = run.phase("smoke")
    base, controlnet = tiny_sd_controlnet_sources(model_dir)
    for precision in ("fp16", "bf16"):
        engine = DiffusionEngine(engine_config(device, precision, base, controlnet, 4))
        for case in SMOKE_CASES:
            if deadline.left() <= 0:
                phase["skipped"].append(f"{precision} {case[0]}")
                continue
            try:
                row = smoke_case(engine, precision, case, side=64, steps=3)
            except Exception as error:  # recorded: the run goes on to the next case
                row = {
                    "case": case[0],
                    "precision_requested": precision,
                    "ok": False,
                    "failures": [f"{type(error).__name__}: {error}"],
                }
            phase["cases"].append(row)
            run.save()
        engine.unload()


# --- phase 2: engine at SD 1.5 size --------------------------------------------------------------


def engine_case(
    engine: Any,
    precision: str,
    batch: int,
    cfg: bool,
    side: int,
    steps: int,
    repeats: int,
    device: str,
) -> dict[str, Any]:
    """Warm-up, then `repeats` timed generations of one chunk of `batch` frames."""
    from deployments.diffusion import GenerationSettings

    settings = GenerationSettings(
        model_id="calibration",
        width=side,
        height=side,
        steps=steps,
        scheduler="dpmpp_2m",
        precision=precision,
        guidance_scale=7.5 if cfg else 1.0,
        controlnet_every=1,
    )
    engine.config = engine.config.model_copy(update={"max_frames_per_forward": batch})
    request = make_request(settings, batch)
    engine.generate([request])  # warm-up: kernels chosen, caches filled
    per_unit, compute, finite = [], [], True
    with peak_memory(device) as peak:
        for _ in range(repeats):
            (result,) = engine.generate([request], frames_dtype="float32")
            compute.append(result.device_seconds)
            per_unit.append(result.device_seconds / result.work_units.total)
            finite = finite and bool(np.isfinite(result.frames).all())
    units = result.work_units
    seconds = statistics.median(compute)
    return {
        "precision": result.precision,
        "precision_requested": precision,
        "batch_frames": batch,
        "cfg": cfg,
        "steps": steps,
        "width": side,
        "height": side,
        "controlnet_every": 1,
        "repeats": repeats,
        "work_units": units.total,
        "unet_evals": units.unet_evals,
        "controlnet_evals": units.controlnet_evals,
        "vae_decodes": units.vae_decodes,
        "compute_seconds": seconds,
        "seconds_per_work_unit": statistics.median(per_unit),
        "seconds_per_frame": seconds / batch,
        "peak_vram_bytes": peak["peak_bytes"],
        "frames_finite": finite,
    }


def run_engine(
    run: Run,
    device: str,
    components: Any,
    deadline: Deadline,
    *,
    tiny: bool,
    batches: tuple[int, ...],
    repeats: int,
) -> None:
    from deployments.diffusion import DiffusionEngine
    from deployments.model_loading import ModelSource

    phase = run.phase("engine")
    side, steps = (64, 2) if tiny else (512, 4)
    source = ModelSource(uri="random-weights")  # a label: the engine is given its modules
    engine = DiffusionEngine(
        engine_config(device, "fp16", source, source, max(batches)), components=components
    )
    phase["load_seconds"] = engine.load()
    weights = engine.model_weights
    phase["model_weights"] = {**weights.model_dump(), **weights.reference_weights()}
    for precision in ("fp16", "fp32"):
        for cfg in (True, False):
            for batch in batches:
                label = f"{precision} batch {batch} cfg {'on' if cfg else 'off'}"
                if deadline.left() <= 0:
                    phase["skipped"].append(label)
                    continue
                try:
                    row = engine_case(engine, precision, batch, cfg, side, steps, repeats, device)
                except Exception as error:
                    row = {"case": label, "ok": False, "error": f"{type(error).__name__}: {error}"}
                phase["cases"].append(row)
                run.save()
    engine.unload()


def reference_rate(cases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The serving configuration's seconds per work unit: fp16 (bf16 or fp32 where that is all
    that ran, as on a CPU), CFG on, the largest batch measured."""
    measured = [c for c in cases if "seconds_per_work_unit" in c and c["cfg"]]
    for precision in ("fp16", "bf16", "fp32"):
        rows = [c for c in measured if c["precision"] == precision]
        if rows:
            best = max(rows, key=lambda c: c["batch_frames"])
            return {
                "seconds_per_work_unit": best["seconds_per_work_unit"],
                "precision": precision,
                "batch_frames": best["batch_frames"],
                "cfg": True,
                "width": best["width"],
                "height": best["height"],
                "definition": "engine compute seconds / counted work units (one work unit = "
                "one SD 1.5 UNet evaluation at 512x512), SD 1.5-size random weights, "
                "ControlNet on every frame, dpmpp_2m",
            }
    return None


# --- phase 3: conditioners ------------------------------------------------------------------------


def timed(run_once: Callable[[], Any], device: str, repeats: int) -> float:
    """Median seconds of `run_once` after one warm-up call."""
    run_once()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run_once()
        synchronize(device)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def adapter_flops_per_unet_eval(adapter: Any, unet: Any, side: int) -> float:
    """Adapter FLOPs per pose map / UNet FLOPs per evaluation at `side` pixels: the engine's
    fitted adapter formula over a FLOP count of the UNet (meta copies)."""
    import torch

    from deployments.diffusion.flops import count_flops, unet_call

    latent = side // 8
    with torch.device("meta"):
        unet_meta = type(unet).from_config(unet.config)
        unet_flops = count_flops(unet_call(unet_meta, latent, latent))
    return measure_adapter_formula(adapter, unet).flops(latent, latent) / unet_flops


def run_conditioners(
    run: Run,
    device: str,
    components: Any,
    deadline: Deadline,
    *,
    tiny: bool,
    repeats: int,
    weights: dict[str, Any] | None,
) -> None:
    import torch

    phase = run.phase("conditioners")
    side, steps, frames = (64, 2, 2) if tiny else (512, 20, 4)
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet, controlnet, vae = components.unet, components.controlnet, components.vae
    adapter = build_t2i_adapter(unet, tiny=tiny, device=device)
    for module in (unet, controlnet, vae, adapter):
        module.to(device=device, dtype=dtype)
    rows = 2 * frames  # CFG on: each frame's two halves go through every model
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    latents = randn(rows, 4, side // 8, side // 8)
    text = randn(rows, 77, unet.config.cross_attention_dim)
    images = torch.rand(rows, 3, side, side, generator=generator).to(device=device, dtype=dtype)
    timestep = torch.tensor(500, device=device)
    phase |= {
        "precision": str(dtype).removeprefix("torch."),
        "frames": frames,
        "cfg": True,
        "rows_per_forward": rows,
        "width": side,
        "height": side,
        "steps_per_frame": steps,
        "adapter_parameters": parameter_count(adapter),
        "controlnet_parameters": parameter_count(controlnet),
        "unet_parameters": parameter_count(unet),
    }
    with torch.inference_mode():
        down, mid = controlnet(
            latents, timestep, encoder_hidden_states=text, controlnet_cond=images, return_dict=False
        )
        features = adapter(images)
        forwards: dict[str, Callable[[], Any]] = {
            "unet": lambda: unet(latents, timestep, encoder_hidden_states=text),
            "controlnet": lambda: controlnet(
                latents, timestep, encoder_hidden_states=text, controlnet_cond=images
            ),
            "unet_with_controlnet_residuals": lambda: unet(
                latents,
                timestep,
                encoder_hidden_states=text,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ),
            "t2i_adapter": lambda: adapter(images),
            "unet_with_adapter_residuals": lambda: unet(
                latents,
                timestep,
                encoder_hidden_states=text,
                down_intrablock_additional_residuals=[f.clone() for f in features],
            ),
            "vae_decode": lambda: vae.decode(latents[:frames] / vae.config.scaling_factor),
        }
        seconds: dict[str, float] = {}
        with peak_memory(device) as peak:
            for name, forward in forwards.items():
                if deadline.left() <= 0:
                    phase["skipped"].append(name)
                    continue
                seconds[name] = timed(forward, device, repeats)
                phase["forward_seconds"] = dict(seconds)
                run.save()
        phase["peak_vram_bytes"] = peak["peak_bytes"]
    phase["adapter_flops_per_unet_eval"] = adapter_flops_per_unet_eval(adapter, unet, side)
    needed = (
        "unet",
        "controlnet",
        "unet_with_controlnet_residuals",
        "t2i_adapter",
        "unet_with_adapter_residuals",
        "vae_decode",
    )
    if all(name in seconds for name in needed):
        phase["summary"] = conditioner_summary(seconds, frames, steps, weights)


def conditioner_summary(
    seconds: dict[str, float], frames: int, steps: int, weights: dict[str, Any] | None
) -> dict[str, Any]:
    """Per-frame, per-step seconds of a denoising step with each conditioner, and time ratios
    beside the formula's weights. Forwards hold both CFG halves of `frames` frames; the VAE
    decodes `frames` images once per frame (no CFG)."""
    unet = seconds["unet"]
    controlnet_step = seconds["controlnet"] + seconds["unet_with_controlnet_residuals"]
    adapter_step = seconds["unet_with_adapter_residuals"] + seconds["t2i_adapter"] / steps
    summary = {
        "controlnet_step_seconds_per_frame": controlnet_step / frames,
        "t2i_adapter_step_seconds_per_frame": adapter_step / frames,
        "t2i_adapter_saves": 1.0 - adapter_step / controlnet_step,
        "controlnet_time_per_unet_time": seconds["controlnet"] / unet,
        "adapter_time_per_unet_time": seconds["t2i_adapter"] / unet,
        "vae_decode_time_per_unet_eval_time": seconds["vae_decode"] / (unet / 2),
    }
    if weights:
        summary["formula_controlnet_weight"] = weights["controlnet_weight"]
        summary["formula_vae_weight"] = weights["vae_weight"]
        if "adapter_weight" in weights:
            summary["formula_adapter_weight"] = weights["adapter_weight"]
    return summary


def quiet_libraries() -> None:
    """No progress bars or cast warnings from diffusers/transformers in the run's output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


# --- the run ------------------------------------------------------------------------------------


def calibrate(
    device: str,
    *,
    tiny: bool,
    output: Path,
    copies: tuple[Path, ...] = (),
    budgets: dict[str, float] = DEFAULT_BUDGETS,
    batches: tuple[int, ...] = BATCHES,
    repeats: int = 3,
) -> dict[str, Any]:
    """Run the phases; returns the document written to `output` (and into each of `copies`,
    folders)."""
    import torch

    from deployments.model_loading import load_sd_components, tiny_sd_controlnet_sources
    from deployments.tiny_models import build_tiny_sd_controlnet

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_calibration: --device cuda but CUDA is not available")
    if device == "cpu":  # tiny models: one thread; on a shared CPU more threads thrash
        pin_threads(1)
    started = time.perf_counter()
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "tiny": tiny,
        "device": device,
        "machine": machine(device),
        "budgets_seconds": dict(budgets),
        "phases": {name: {"status": "pending", "cases": [], "skipped": []} for name in PHASES},
        "reference": None,
        "failures": [],
        "warnings": [],
    }
    run = Run([output, *(folder / RESULT_NAME for folder in copies)], document)
    run.save()
    with tempfile.TemporaryDirectory(prefix="motionserve-calibration-") as scratch:
        model_dir = build_tiny_sd_controlnet(Path(scratch) / "tiny-sd")
        tiny_components = load_sd_components(
            *tiny_sd_controlnet_sources(model_dir), dtype=torch.float32, cache_dir=scratch
        )
        steps: list[tuple[str, Callable[[Deadline], None]]] = [
            ("smoke", lambda deadline: run_smoke(run, device, model_dir, deadline)),
        ]
        components: dict[str, Any] = {}

        def engine(deadline: Deadline) -> None:
            build = time.perf_counter()
            components["sd"] = (
                tiny_components if tiny else sd15_components(tiny_components, device=device)
            )
            synchronize(device)
            run.phase("engine")["build_seconds"] = time.perf_counter() - build
            run_engine(
                run, device, components["sd"], deadline, tiny=tiny, batches=batches, repeats=repeats
            )

        def conditioners(deadline: Deadline) -> None:
            weights = run.phase("engine").get("model_weights")
            run_conditioners(
                run, device, components["sd"], deadline, tiny=tiny, repeats=repeats, weights=weights
            )

        steps += [("engine", engine), ("conditioners", conditioners)]
        for name, body in steps:
            phase, deadline = run.phase(name), Deadline(budgets[name])
            phase["status"] = "running"
            run.save()
            try:
                body(deadline)
                phase["status"] = "partial" if phase["skipped"] else "done"
            except Exception as error:  # the next phase may still run; the failure is recorded
                phase["status"] = "failed"
                phase["error"] = f"{type(error).__name__}: {error}"
            phase["seconds"] = deadline.spent()
            if device == "cuda":
                torch.cuda.empty_cache()
            document["reference"] = reference_rate(run.phase("engine")["cases"])
            document["failures"] = failures(document)
            document["warnings"] = warnings(document)
            document["total_seconds"] = time.perf_counter() - started
            run.save()
    return document


def failures(document: dict[str, Any]) -> list[str]:
    """Every failed check and phase, one line each."""
    found = []
    for name, phase in document["phases"].items():
        if phase["status"] == "failed":
            found.append(f"{name}: {phase.get('error')}")
        for case in phase["cases"]:
            for failure in case.get("failures", []):
                found.append(
                    f"{name} {case.get('precision_requested', '')} {case['case']}: {failure}"
                )
            if "error" in case:
                found.append(f"{name} {case['case']}: {case['error']}")
    return found


def warnings(document: dict[str, Any]) -> list[str]:
    """What is odd but no bug: random SD 1.5-size weights may overflow fp16 in places."""
    return [
        f"engine {case['precision']} batch {case['batch_frames']}: non-finite frames "
        "(random weights)"
        for case in document["phases"]["engine"]["cases"]
        if case.get("frames_finite") is False
    ]


def summary_lines(document: dict[str, Any]) -> list[str]:
    lines = [
        f"device {document['device']} ({document['machine'].get('gpu', 'cpu')}), "
        f"tiny={document['tiny']}, {document.get('total_seconds', 0):.1f} s"
    ]
    for name, phase in document["phases"].items():
        lines.append(
            f"{name}: {phase['status']} in {phase.get('seconds', 0):.1f} s, "
            f"{len(phase['cases'])} cases, {len(phase['skipped'])} skipped"
        )
    for case in document["phases"]["engine"]["cases"]:
        if "seconds_per_work_unit" in case:
            lines.append(
                f"  {case['precision_requested']} (ran {case['precision']}) batch "
                f"{case['batch_frames']} cfg "
                f"{'on ' if case['cfg'] else 'off'}: {case['seconds_per_work_unit']:.5f} s/unit, "
                f"peak {case['peak_vram_bytes'] / 2**30:.2f} GiB"
            )
    summary = document["phases"]["conditioners"].get("summary")
    if summary:
        lines.append("  conditioners: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    reference = document["reference"]
    if reference:
        lines.append(f"reference: {reference['seconds_per_work_unit']:.5f} s per work unit")
    lines += [f"warning: {line}" for line in document["warnings"]]
    lines += [f"FAILED {line}" for line in document["failures"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64x64 (CPU tests)")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"the JSON file (default: results/<gpu>/"
        f"{RESULT_NAME} for a full CUDA run, else under out/)",
    )
    parser.add_argument(
        "--also-copy-to",
        type=Path,
        help="a folder the JSON is also written into (after every case)",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--budget-scale", type=float, default=1.0, help="multiplies every phase's time box"
    )
    args = parser.parse_args(argv)
    quiet_libraries()
    if args.repeats < 1 or min(args.batches) < 1 or not math.isfinite(args.budget_scale):
        parser.error("--repeats and --batches must be >= 1")
    output = args.out or default_output(args.device, args.tiny)
    budgets = {name: seconds * args.budget_scale for name, seconds in DEFAULT_BUDGETS.items()}
    copies = (args.also_copy_to,) if args.also_copy_to else ()
    document = calibrate(
        args.device,
        tiny=args.tiny,
        output=output,
        copies=copies,
        budgets=budgets,
        batches=tuple(args.batches),
        repeats=args.repeats,
    )
    print("\n".join(summary_lines(document)))
    print(f"wrote {output}")
    return 1 if document["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
