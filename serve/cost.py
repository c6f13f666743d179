"""Cost: work units, measured seconds per stage and device, prices, and plan-vs-naive reports.

Work units come from the formula beside the diffusion loop (`deployments.diffusion`,
pure Python: importing this module loads no torch). A job's report holds, for the plan that ran
and for the naive plan on the same input (defined once in `serve.presets`, design section 3):
work units, seconds per stage and device, and dollars at spot and on-demand prices.

The naive plan is never run. Its seconds are estimated from its predicted work units at the
seconds-per-unit this job measured for diffusion (or a tier's reference rate when nothing was
measured), and its other stages from this job's measured seconds scaled by frame count. That
ignores the naive plan's fp32 and batch-1 slowdowns and the work this job's cache skipped, so
naive figures are lower bounds and the reported savings are conservative.

Prices are configuration (`PriceTable`, loadable from JSON/YAML); the defaults below note the
source and date of each number and say which are estimates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from deployments.diffusion.settings import GenerationSettings, keyframe_settings
from deployments.diffusion.work_units import (
    SD15_MODEL_WEIGHTS,
    ModelWeights,
    WorkUnits,
    predict_chunk_units,
)
from serve.presets import NAIVE, NAIVE_SKIPS

SECONDS_PER_HOUR = 3600.0

DeviceKind = Literal["gpu", "cpu"]
SecondsSource = Literal["estimate", "measured", "scaled"]


# --- Prices ---------------------------------------------------------------------------------------


class HardwarePrice(BaseModel):
    """Price of one GPU of a kind, per GPU-hour, with where the number comes from."""

    gpu: str = Field(description="GPU model, e.g. 'NVIDIA L4'.")
    vram_gb: int = Field(gt=0, description="GPU memory in GB.")
    on_demand_gpu_hour: float = Field(gt=0, description="On-demand USD per GPU-hour.")
    spot_gpu_hour: float = Field(gt=0, description="Spot/interruptible USD per GPU-hour.")
    seconds_per_work_unit: float = Field(
        gt=0,
        description="Reference seconds per work unit (one SD 1.5 UNet evaluation at 512x512, "
        "fp16), used only when a job measured no diffusion seconds (estimates, /v1/estimate).",
    )
    seconds_per_work_unit_source: SecondsSource = Field(
        default="estimate",
        description="Where seconds_per_work_unit comes from: 'estimate' (public throughputs), "
        "'measured' (benchmarks/gpu_calibration.py on this GPU) or 'scaled' (another GPU's "
        "measurement x its FP16 tensor TFLOPS / this GPU's; see `with_measured_rate`).",
    )
    source: str = Field(description="Where the prices come from, and as of when.")
    estimate: bool = Field(description="True when a price is an estimate, not a list price.")

    @model_validator(mode="after")
    def _spot_is_cheaper(self) -> HardwarePrice:
        if self.spot_gpu_hour > self.on_demand_gpu_hour:
            raise ValueError(f"{self.gpu}: spot price above on-demand price")
        return self


class PriceTable(BaseModel):
    """GPU prices per hardware kind, vCPU prices, and which hardware each tier runs on."""

    hardware: dict[str, HardwarePrice] = Field(description="Hardware kind -> GPU price.")
    vcpu_on_demand_hour: float = Field(gt=0, description="On-demand USD per vCPU-hour.")
    vcpu_spot_hour: float = Field(gt=0, description="Spot USD per vCPU-hour.")
    vcpu_source: str = Field(description="Where the vCPU prices come from, and as of when.")
    tiers: dict[str, str] = Field(description="Tier name -> hardware kind it runs on.")

    @model_validator(mode="after")
    def _tiers_known(self) -> PriceTable:
        unknown = {t: h for t, h in self.tiers.items() if h not in self.hardware}
        if unknown:
            raise ValueError(f"tiers name unknown hardware: {unknown}")
        if self.vcpu_spot_hour > self.vcpu_on_demand_hour:
            raise ValueError("vCPU spot price above on-demand price")
        return self

    def for_tier(self, tier: str) -> tuple[str, HardwarePrice]:
        """(hardware kind, price) of a tier; a hardware kind is accepted as a tier too."""
        kind = self.tiers.get(tier, tier)
        if kind not in self.hardware:
            raise ValueError(f"unknown tier {tier!r}; known: {sorted(self.tiers)}")
        return kind, self.hardware[kind]


# GPU-hour prices are for the smallest single-GPU cloud instance of each GPU, which includes its
# host vCPUs and memory. Spot prices float with demand; the values are typical, hence estimates.
# seconds_per_work_unit: rough public SD 1.5 fp16 512x512 throughputs (it/s with CFG = 2 UNet
# evaluations), all estimates; they only matter when a job measured nothing itself. Where a GPU
# calibration result exists, DEFAULT_PRICES (below) replaces them with scaled measurements.
ESTIMATED_PRICES = PriceTable(
    hardware={
        "rtx3060": HardwarePrice(
            gpu="NVIDIA GeForce RTX 3060 12GB",
            vram_gb=12,
            on_demand_gpu_hour=0.10,
            spot_gpu_hour=0.06,
            seconds_per_work_unit=0.065,
            source="estimate, as of mid 2024: typical community-cloud listings (vast.ai, "
            "RunPod community cloud); interruptible ~60% of on-demand",
            estimate=True,
        ),
        "rtx3090": HardwarePrice(
            gpu="NVIDIA GeForce RTX 3090 24GB",
            vram_gb=24,
            on_demand_gpu_hour=0.22,
            spot_gpu_hour=0.12,
            seconds_per_work_unit=0.03,
            source="estimate, as of mid 2024: RunPod community cloud list price ~$0.22/h; "
            "interruptible/vast.ai typical ~$0.12/h",
            estimate=True,
        ),
        "t4": HardwarePrice(
            gpu="NVIDIA T4 16GB",
            vram_gb=16,
            on_demand_gpu_hour=0.526,
            spot_gpu_hour=0.21,
            seconds_per_work_unit=0.11,
            source="on-demand: AWS EC2 g4dn.xlarge us-east-1 list price, as of June 2024; "
            "spot: estimate (typical us-east-1 spot, ~40% of on-demand)",
            estimate=True,
        ),
        "a10g": HardwarePrice(
            gpu="NVIDIA A10G 24GB",
            vram_gb=24,
            on_demand_gpu_hour=1.006,
            spot_gpu_hour=0.40,
            seconds_per_work_unit=0.045,
            source="on-demand: AWS EC2 g5.xlarge us-east-1 list price, as of June 2024; "
            "spot: estimate (typical us-east-1 spot, ~40% of on-demand)",
            estimate=True,
        ),
        "l4": HardwarePrice(
            gpu="NVIDIA L4 24GB",
            vram_gb=24,
            on_demand_gpu_hour=0.8048,
            spot_gpu_hour=0.32,
            seconds_per_work_unit=0.05,
            source="on-demand: AWS EC2 g6.xlarge us-east-1 list price, as of June 2024; "
            "spot: estimate (typical us-east-1 spot, ~40% of on-demand)",
            estimate=True,
        ),
        "a100": HardwarePrice(
            gpu="NVIDIA A100 40GB",
            vram_gb=40,
            on_demand_gpu_hour=3.673,
            spot_gpu_hour=1.10,
            seconds_per_work_unit=0.017,
            source="on-demand: GCP a2-highgpu-1g us-central1 list price, as of June 2024; "
            "spot: estimate (~30% of on-demand, typical GCP spot)",
            estimate=True,
        ),
    },
    vcpu_on_demand_hour=0.0425,
    vcpu_spot_hour=0.016,
    vcpu_source="on-demand: AWS EC2 c6i.large us-east-1 ($0.085/h for 2 vCPUs), as of June "
    "2024; spot: estimate (~38% of on-demand)",
    # Design section 6: dev RTX 3060, MVP 3090, scale A10/L4, burst spot. 'local' is priced
    # as the dev card so local runs report comparable numbers.
    tiers={"local": "rtx3060", "dev": "rtx3060", "mvp": "rtx3090", "scale": "l4", "burst": "a10g"},
)


# --- Measured seconds per work unit ---------------------------------------------------------------
#
# `benchmarks/gpu_calibration.py` measures seconds per work unit on the GPU it runs on (SD 1.5
# size, fp16, CFG, the largest batch: the serving configuration). A tier whose GPU was not
# measured gets that figure scaled by peak dense FP16 tensor throughput (FP32 accumulate, as
# PyTorch's fp16 matrix products use):
#     seconds_per_unit(tier) = seconds_per_unit(measured) x TFLOPS(measured) / TFLOPS(tier's GPU)
# This assumes both GPUs reach the same fraction of their peak. A large GPU at batch 8 reaches a
# smaller fraction than a small one (launch and memory overheads weigh more), so scaled figures
# for small GPUs are on the slow (expensive) side: conservative for prices.


class TensorPeak(BaseModel):
    """A GPU's peak dense FP16 tensor throughput, with where the number comes from."""

    tflops: float = Field(gt=0, description="Dense FP16 tensor TFLOPS with FP32 accumulate.")
    source: str = Field(description="Where the number comes from.")


FP16_TENSOR_TFLOPS: dict[str, TensorPeak] = {
    "h200": TensorPeak(tflops=989.4, source="NVIDIA H200 datasheet (SXM): 1,979 with sparsity"),
    "h100": TensorPeak(tflops=989.4, source="NVIDIA H100 datasheet (SXM): 1,979 with sparsity"),
    "a100": TensorPeak(tflops=312.0, source="NVIDIA A100 datasheet: 624 with sparsity"),
    "a10g": TensorPeak(
        tflops=125.0,
        source="estimate: NVIDIA publishes no A10G sheet; AWS's variant of the A10, taken at "
        "the A10 datasheet's 125 (250 with sparsity)",
    ),
    "l4": TensorPeak(tflops=121.0, source="NVIDIA L4 datasheet: 242 with sparsity"),
    "t4": TensorPeak(tflops=65.0, source="NVIDIA T4 datasheet: 65 FP16 mixed precision"),
    "rtx3090": TensorPeak(
        tflops=71.0,
        source="NVIDIA Ampere GA102 whitepaper: RTX 3090 FP16 tensor with FP32 accumulate 71 "
        "(142 with FP16 accumulate)",
    ),
    "rtx3060": TensorPeak(
        tflops=25.5,
        source="estimate: 112 tensor cores x 128 FLOP/clock (FP32 accumulate, GA10x "
        "whitepaper rate) x 1.777 GHz boost",
    ),
}
# GPU name (torch.cuda.get_device_name) fragments -> hardware kind, most specific first.
_GPU_NAME_KINDS = (
    ("H200", "h200"),
    ("H100", "h100"),
    ("A100", "a100"),
    ("A10G", "a10g"),
    ("L4", "l4"),
    ("T4", "t4"),
    ("3090", "rtx3090"),
    ("3060", "rtx3060"),
)
CALIBRATION_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
CALIBRATION_FILE = "gpu_calibration.json"


class MeasuredRate(BaseModel):
    """Seconds per work unit measured on one GPU by the GPU calibration."""

    gpu: str = Field(description="The GPU's name as CUDA reports it, e.g. 'NVIDIA H200'.")
    hardware: str = Field(description="Its hardware kind (a FP16_TENSOR_TFLOPS key).")
    seconds_per_work_unit: float = Field(gt=0, description="The calibration's reference figure.")
    created: str = Field(description="When the calibration ran (ISO 8601).")
    path: str = Field(description="The results file it was read from.")


def hardware_kind(gpu_name: str) -> str | None:
    """The FP16_TENSOR_TFLOPS key of a CUDA device name, or None when unknown."""
    for fragment, kind in _GPU_NAME_KINDS:
        if fragment == "L4":  # not the L40 / L40S
            if any(word == "L4" for word in gpu_name.replace("-", " ").split()):
                return kind
        elif fragment in gpu_name:
            return kind
    return None


def scaled_seconds_per_work_unit(seconds: float, measured: str, target: str) -> float:
    """A figure measured on hardware `measured`, scaled to hardware `target` by FP16 tensor
    TFLOPS (see the section's comment)."""
    return seconds * FP16_TENSOR_TFLOPS[measured].tflops / FP16_TENSOR_TFLOPS[target].tflops


def read_measured_rate(path: Path) -> MeasuredRate | None:
    """The reference rate of a calibration results file; None for a CPU or tiny run, a run
    without a reference figure, or a GPU whose FP16 throughput is not in the table."""
    document = json.loads(path.read_text())
    reference = document.get("reference")
    if document.get("device") != "cuda" or document.get("tiny") or not reference:
        return None
    gpu = document.get("machine", {}).get("gpu", "")
    kind = hardware_kind(gpu)
    if kind is None:
        return None
    return MeasuredRate(
        gpu=gpu,
        hardware=kind,
        seconds_per_work_unit=reference["seconds_per_work_unit"],
        created=document.get("created", ""),
        path=str(path),
    )


def find_measured_rate(results: Path = CALIBRATION_RESULTS) -> MeasuredRate | None:
    """The newest usable calibration under `results/<gpu>/`, or None (then prices keep their
    estimates; an installed package has no results folder)."""
    rates = [read_measured_rate(path) for path in sorted(results.glob(f"*/{CALIBRATION_FILE}"))]
    usable = [rate for rate in rates if rate is not None]
    return max(usable, key=lambda rate: rate.created) if usable else None


def with_measured_rate(table: PriceTable, rate: MeasuredRate | None) -> PriceTable:
    """`table` with every GPU's seconds per work unit from `rate`: as measured on its own
    hardware, scaled by FP16 TFLOPS on the others (those without a TFLOPS figure keep their
    estimate). Without a rate, `table` itself."""
    if rate is None:
        return table
    hardware = {}
    for kind, price in table.hardware.items():
        if kind == rate.hardware:
            update = {
                "seconds_per_work_unit": rate.seconds_per_work_unit,
                "seconds_per_work_unit_source": "measured",
            }
        elif kind in FP16_TENSOR_TFLOPS:
            seconds = scaled_seconds_per_work_unit(rate.seconds_per_work_unit, rate.hardware, kind)
            update = {"seconds_per_work_unit": seconds, "seconds_per_work_unit_source": "scaled"}
        else:
            update = {}
        hardware[kind] = price.model_copy(update=update)
    return table.model_copy(update={"hardware": hardware})


# The prices every report and estimate uses: the estimates, with measured seconds per work unit
# where a GPU calibration result exists in this checkout.
DEFAULT_PRICES = with_measured_rate(ESTIMATED_PRICES, find_measured_rate())


class Dollars(BaseModel):
    """An amount at spot and at on-demand prices."""

    spot: float = Field(default=0.0, description="USD at spot/interruptible prices.")
    on_demand: float = Field(default=0.0, description="USD at on-demand prices.")

    def __add__(self, other: Dollars) -> Dollars:
        return Dollars(spot=self.spot + other.spot, on_demand=self.on_demand + other.on_demand)


def gpu_dollars(gpu_seconds: float, price: HardwarePrice, gpu_fraction: float = 1.0) -> Dollars:
    """Dollars for `gpu_seconds` on a replica holding `gpu_fraction` of one GPU."""
    if not 0.0 < gpu_fraction <= 1.0:
        raise ValueError(f"gpu_fraction must be in (0, 1], got {gpu_fraction}")
    hours = gpu_seconds * gpu_fraction / SECONDS_PER_HOUR
    return Dollars(spot=hours * price.spot_gpu_hour, on_demand=hours * price.on_demand_gpu_hour)


def cpu_dollars(cpu_seconds: float, table: PriceTable = DEFAULT_PRICES) -> Dollars:
    """Dollars for `cpu_seconds` of CPU time (vCPU-seconds)."""
    hours = cpu_seconds / SECONDS_PER_HOUR
    return Dollars(spot=hours * table.vcpu_spot_hour, on_demand=hours * table.vcpu_on_demand_hour)


# --- Work-unit predictions ------------------------------------------------------------------------


def predict_generation_units(
    settings: GenerationSettings,
    frames: int,
    chunk_frames: int,
    weights: ModelWeights = SD15_MODEL_WEIGHTS,
    overlap: int = 0,
    lengths: Sequence[int] | None = None,
) -> WorkUnits:
    """Work units of generating `frames` frames in chunks of `chunk_frames` (keyframes are per
    chunk: each chunk's last frame is one). With an `overlap` (seamless chunks) every chunk but
    the first also generates the previous chunk's last `overlap` frames: they are counted in
    both chunks, as both generate them (and keyframes are those of the longer chunk). With
    anchor attention the job's anchor keyframe (its frame 0 generated alone, once) comes first.
    `lengths` (motion keyframe density, `scheduled_lengths`): the frames each chunk generates,
    overlap included, instead of full chunks.
    """
    if frames <= 0:  # e.g. a naive side with no output frame: nothing to generate
        return WorkUnits()
    keyframe = predict_keyframe_units(settings, weights)
    if lengths is not None:  # a motion density schedule: each chunk's own frame count
        by_length = {n: predict_chunk_units(settings, n, weights) for n in set(lengths)}
        return sum((by_length[n] for n in lengths), keyframe)
    return keyframe + _chunk_units(settings, frames, chunk_frames, weights, overlap)


def scheduled_lengths(plan: Any) -> list[int] | None:
    """Frames each chunk generates (its overlap included) under the plan's motion density
    schedule (`Plan.schedule`); None without one (every chunk every grid frame)."""
    schedule = getattr(plan, "schedule", None)
    if schedule is None:
        return None
    overlap = getattr(plan, "chunk_overlap", 0)
    return [len(schedule.with_overlap(c, overlap)) for c in range(len(schedule.strides))]


def predict_keyframe_units(
    settings: GenerationSettings, weights: ModelWeights = SD15_MODEL_WEIGHTS
) -> WorkUnits:
    """Work units of a job's anchor keyframe (none without anchor attention)."""
    if settings.anchor == "off":
        return WorkUnits()
    return predict_chunk_units(keyframe_settings(settings), 1, weights)


def _chunk_units(settings: GenerationSettings, frames: int, chunk_frames: int,
                 weights: ModelWeights, overlap: int) -> WorkUnits:  # fmt: skip
    total = WorkUnits()
    chunk_frames = max(1, chunk_frames)
    # Every full chunk costs the same: one prediction times their count, so an estimate of an
    # hour at 60 fps in 1-frame chunks costs the ingress microseconds, not seconds.
    full, rest = divmod(frames, chunk_frames)
    if overlap and frames > chunk_frames:  # chunk 0 (full) has no overlap; the others do
        first = predict_chunk_units(settings, chunk_frames, weights)
        total = first + _times(predict_chunk_units(settings, chunk_frames + overlap, weights),
                               full - 1)  # fmt: skip
        if rest:
            total = total + predict_chunk_units(settings, rest + overlap, weights)
        return total
    total = _times(predict_chunk_units(settings, chunk_frames, weights), full)
    if rest:
        total = total + predict_chunk_units(settings, rest, weights)
    return total


def _times(units: WorkUnits, count: int) -> WorkUnits:
    return WorkUnits(**{name: value * count for name, value in units.model_dump().items()})


def generated_frame_count(
    frames: int, chunk_frames: int, overlap: int = 0, keyframe: bool = False,
    lengths: Sequence[int] | None = None,
) -> int:  # fmt: skip
    """Frames the diffusion model generates for `frames` frames in chunks: with an overlap,
    every chunk but the first generates `overlap` frames more; with anchor attention
    (`keyframe`) the job's anchor keyframe is one more; `lengths`: each chunk's frames under a
    motion density schedule."""
    if frames <= 0:
        return 0
    if lengths is not None:
        return sum(lengths) + int(keyframe)
    chunks = math.ceil(frames / max(1, chunk_frames))
    return frames + overlap * (chunks - 1) + int(keyframe)


def naive_frame_count(frames: int, generation_fps: float, output_fps: float) -> int:
    """Frames the naive plan generates: every output frame (at least one for any input)."""
    if frames <= 0:
        return 0
    return max(1, math.ceil(frames * output_fps / generation_fps - 1e-9))


def naive_settings(settings: GenerationSettings, output_width: int, output_height: int,
                   output_fps: float) -> GenerationSettings:  # fmt: skip
    """The naive plan's generation settings for the same input and output: every output frame
    at output size (rounded down to a multiple of 8), with the naive preset's levers."""
    return settings.model_copy(
        update={
            "width": max(64, output_width - output_width % 8),
            "height": max(64, output_height - output_height % 8),
            "fps": output_fps,
            "steps": NAIVE.steps,
            "precision": NAIVE.precision,
            "controlnet_every": NAIVE.controlnet_every,
            # The naive plan's own sampling: a plain SD 1.5 with CFG, whatever the plan uses
            # (turbo's few-step LoRA and CFG off are levers, not part of the baseline).
            "scheduler": NAIVE.scheduler,
            "guidance_scale": NAIVE.guidance_scale,
            "loras": (),
            # A straightforward implementation has no anchor attention; leaving it out of the
            # baseline keeps the reported savings conservative.
            "anchor": "off",
            # Nor a motion module (the same reason).
            "motion_module": False,
            # ControlNet on every frame at every step, whatever conditions the plan.
            "conditioner": "controlnet",
        }
    )


# --- Reports --------------------------------------------------------------------------------------


class StageCost(BaseModel):
    """Seconds and dollars of one stage (summed over its calls) on one device kind."""

    stage: str = Field(description="Stage name.")
    device: DeviceKind = Field(description="gpu or cpu: which price applies.")
    calls: int = Field(default=0, description="Calls summed here.")
    cache_hits: int = Field(default=0, description="Calls served from the cache.")
    seconds: float = Field(
        default=0.0,
        description="Billed seconds: GPU seconds x the replica's GPU fraction, or CPU seconds.",
    )
    wall_seconds: float = Field(default=0.0, description="Wall-clock seconds of the calls.")
    load_seconds: float = Field(default=0.0, description="Model load seconds (cold starts).")
    dollars: Dollars = Field(default_factory=Dollars, description="Cost of `seconds`.")


class CostSide(BaseModel):
    """One side of the comparison: the plan that ran, or the naive baseline."""

    generated_frames: int = Field(description="Frames the diffusion model generates.")
    work_units: WorkUnits = Field(description="Diffusion work units (counted for the plan).")
    predicted_work_units: WorkUnits = Field(
        description="Work units the formula predicts for the whole job, cache ignored."
    )
    stages: list[StageCost] = Field(description="Seconds and dollars per stage and device.")
    gpu_seconds: float = Field(description="Billed GPU seconds (fraction-scaled).")
    cpu_seconds: float = Field(description="Billed CPU seconds.")
    dollars: Dollars = Field(description="Total cost.")
    estimated: bool = Field(description="True when seconds are estimated, not measured.")


class CostReport(BaseModel):
    """A job's cost: the plan that ran against the naive plan for the same input."""

    tier: str = Field(description="Tier whose prices apply.")
    hardware: str = Field(description="Hardware kind of the tier (price table key).")
    price_source: str = Field(description="Source of the GPU price used.")
    attempts: int = Field(default=1, description="Attempts the job took (retries, resumes).")
    chunk_retries: int = Field(
        default=0,
        ge=0,
        description="Chunk pipelines (and anchor keyframe calls) of the last attempt run again "
        "after an infrastructure failure: a replica, worker or node lost (a spot node killed). "
        "Their work is billed once: only finished chunks' records reach the ledger.",
    )
    plan: CostSide = Field(description="What ran.")
    naive: CostSide = Field(description="The naive baseline (estimated, never run).")
    ratios: dict[str, float] = Field(
        description="naive / plan for work units, billed seconds and dollars (higher = saved)."
    )
    notes: list[str] = Field(default_factory=list, description="Assumptions behind the numbers.")


def _record_device(record: Any) -> DeviceKind:
    return "gpu" if str(getattr(record, "device", "cpu")).startswith("cuda") else "cpu"


def _record_seconds(record: Any) -> float:
    return record.gpu_s if _record_device(record) == "gpu" else record.cpu_s


def _stage_costs(
    records: Iterable[Any], price: HardwarePrice, table: PriceTable
) -> list[StageCost]:
    """Sum records by (stage, device) and price them; gpu_s in records is fraction-scaled."""
    by_key: dict[tuple[str, DeviceKind], StageCost] = {}
    for record in records:
        device = _record_device(record)
        cost = by_key.setdefault(
            (record.stage, device), StageCost(stage=record.stage, device=device)
        )
        cost.calls += 1
        cost.cache_hits += int(bool(getattr(record, "cache_hit", False)))
        cost.seconds += _record_seconds(record)
        cost.wall_seconds += record.wall_s
        cost.load_seconds += getattr(record, "load_s", 0.0)
    for cost in by_key.values():
        cost.dollars = (
            gpu_dollars(cost.seconds, price)
            if cost.device == "gpu"
            else cpu_dollars(cost.seconds, table)
        )
    return list(by_key.values())


def _side(frames: int, units: WorkUnits, predicted: WorkUnits, stages: list[StageCost],
          estimated: bool) -> CostSide:  # fmt: skip
    return CostSide(
        generated_frames=frames,
        work_units=units,
        predicted_work_units=predicted,
        stages=stages,
        gpu_seconds=sum(s.seconds for s in stages if s.device == "gpu"),
        cpu_seconds=sum(s.seconds for s in stages if s.device == "cpu"),
        dollars=sum((s.dollars for s in stages), Dollars()),
        estimated=estimated,
    )


def _measured_weights(records: Sequence[Any]) -> ModelWeights | None:
    """The model weights the engine counted with (carried in its diffusion records); None when
    no record carries them (all from the cache, or records from before they were carried)."""
    for record in records:
        if record.stage == "diffusion" and getattr(record, "model_weights", None) is not None:
            return ModelWeights.model_validate(record.model_weights)
    return None


def _measured_units(records: Sequence[Any]) -> WorkUnits:
    total = WorkUnits()
    for record in records:
        if record.stage == "diffusion" and getattr(record, "work_units", None):
            total = total + WorkUnits.model_validate(record.work_units)
    return total


def savings_ratio(naive: float, plan: float) -> float:
    """naive / plan (higher = saved); infinite when only the plan costs nothing."""
    return naive / plan if plan > 0 else math.inf if naive > 0 else 1.0


def build_report(
    plan: Any,
    records: Sequence[Any],
    *,
    frames: int,
    tier: str = "local",
    attempts: int = 1,
    chunk_retries: int = 0,
    prices: PriceTable = DEFAULT_PRICES,
    weights: ModelWeights | None = None,
) -> CostReport:
    """The cost report of a finished job.

    `plan` is a `serve.pipeline.Plan` (its `generation`, `chunk_frames`, `output_*`), `records`
    the job's stage records (`serve.stages.StageRecord`: stage, device, gpu_s, cpu_s, wall_s,
    load_s, cache_hit, work_units, model_weights) and `frames` the number of frames of the
    edited motion (the chunks' spans; with an overlap, the plan side's generated frames count
    its frames too). The prediction uses the model weights the engine counted with (from the
    records), so predicted equals counted exactly.
    """
    hardware, price = prices.for_tier(tier)
    settings: GenerationSettings = plan.generation
    measured = _measured_units(records)
    weights = weights or _measured_weights(records) or SD15_MODEL_WEIGHTS
    plan_stages = _stage_costs(records, price, prices)
    overlap = getattr(plan, "chunk_overlap", 0)
    lengths = scheduled_lengths(plan)
    predicted = predict_generation_units(
        settings, frames, plan.chunk_frames, weights, overlap, lengths
    )
    keyframe = settings.anchor != "off"
    generated = generated_frame_count(frames, plan.chunk_frames, overlap, keyframe, lengths)
    plan_side = _side(generated, measured, predicted, plan_stages, estimated=False)

    naive_gen = naive_settings(settings, plan.output_width, plan.output_height, plan.output_fps)
    naive_frames = naive_frame_count(frames, settings.fps, plan.output_fps)
    naive_units = predict_generation_units(naive_gen, naive_frames, naive_frames, weights)
    naive_stages = _naive_stages(
        plan_stages, measured, naive_units, frames, naive_frames, price, prices
    )
    naive_side = _side(naive_frames, naive_units, naive_units, naive_stages, estimated=True)
    return CostReport(
        tier=tier,
        hardware=hardware,
        price_source=price.source,
        attempts=attempts,
        chunk_retries=chunk_retries,
        plan=plan_side,
        naive=naive_side,
        ratios={
            "work_units": savings_ratio(naive_units.total, predicted.total),
            "billed_seconds": savings_ratio(
                naive_side.gpu_seconds + naive_side.cpu_seconds,
                plan_side.gpu_seconds + plan_side.cpu_seconds,
            ),
            "dollars_spot": savings_ratio(naive_side.dollars.spot, plan_side.dollars.spot),
            "dollars_on_demand": savings_ratio(
                naive_side.dollars.on_demand, plan_side.dollars.on_demand
            ),
        },
        notes=[
            f"naive = every output frame generated at output size, {NAIVE.steps} steps, "
            f"{NAIVE.precision}, ControlNet on every frame, batch 1, no cache, every stage on "
            "the job's accelerator",
            "naive seconds are lower bounds: measured seconds per work unit (fp32 and batch-1 "
            "slowdowns and cache savings not added)",
            f"GPU price: {price.source}",
            f"vCPU price: {prices.vcpu_source}",
        ],
    )


def _naive_stages(
    plan_stages: list[StageCost],
    measured: WorkUnits,
    naive_units: WorkUnits,
    frames: int,
    naive_frames: int,
    price: HardwarePrice,
    table: PriceTable,
) -> list[StageCost]:
    """The naive plan's stages, estimated from this job's measurements.

    Diffusion: naive units x this job's measured seconds per unit (the tier's reference rate
    when all of diffusion came from the cache). Other stages: this job's seconds x frame ratio,
    except upscale and interpolation, which the naive plan does not need. All on the device that
    ran this job's diffusion (a GPU, or the CPU in local runs).
    """
    diffusion = [s for s in plan_stages if s.stage == "diffusion"]
    device: DeviceKind = "gpu" if any(s.device == "gpu" for s in diffusion) else "cpu"
    measured_seconds = sum(s.seconds for s in diffusion)
    if measured.total > 0 and measured_seconds > 0:
        per_unit = measured_seconds / measured.total
    else:
        device, per_unit = "gpu", price.seconds_per_work_unit
    scale = naive_frames / frames if frames else 1.0
    seconds = {"diffusion": naive_units.total * per_unit}
    for stage in plan_stages:
        if stage.stage not in NAIVE_SKIPS and stage.stage != "diffusion":
            seconds[stage.stage] = seconds.get(stage.stage, 0.0) + stage.seconds * scale
    stages = []
    for name, value in seconds.items():
        dollars = gpu_dollars(value, price) if device == "gpu" else cpu_dollars(value, table)
        stages.append(StageCost(stage=name, device=device, calls=0, seconds=value, dollars=dollars))
    return stages


class EstimateSide(BaseModel):
    """Predicted diffusion cost of one side of an estimate."""

    generated_frames: int = Field(description="Frames the diffusion model generates.")
    work_units: float = Field(description="Predicted diffusion work units.")
    gpu_seconds: float = Field(description="Work units x the tier's reference seconds per unit.")
    dollars: Dollars = Field(description="Cost of those GPU seconds.")


class CostEstimate(BaseModel):
    """A plan's diffusion cost before it runs, against its naive baseline (/v1/estimate)."""

    tier: str = Field(description="Tier whose prices and reference speed apply.")
    plan: EstimateSide = Field(description="The plan.")
    naive: EstimateSide = Field(description="The naive baseline for the same input.")
    ratio: float = Field(description="naive / plan work units.")
    notes: list[str] = Field(default_factory=list, description="Assumptions.")


class EstimateResponse(CostEstimate):
    """The body of POST /v1/estimate: the estimate and the plan it was made for."""

    plan_explained: list[str] = Field(
        description="The plan's levers, one line each (preset, generation size and rate, steps, "
        "keyframe interval, upscale, interpolation), as the job's report lists them."
    )


def estimate_plan(
    plan: Any,
    frames: int,
    *,
    tier: str = "local",
    prices: PriceTable = DEFAULT_PRICES,
    weights: ModelWeights = SD15_MODEL_WEIGHTS,
    gpu_fraction: float = 1.0,
) -> CostEstimate:
    """Predicted diffusion units, GPU seconds and dollars of a plan before it runs, and of its
    naive baseline, at the tier's reference seconds per work unit."""
    _, price = prices.for_tier(tier)
    settings = plan.generation
    overlap = getattr(plan, "chunk_overlap", 0)
    lengths = scheduled_lengths(plan)
    units = predict_generation_units(settings, frames, plan.chunk_frames, weights, overlap, lengths)
    naive_gen = naive_settings(settings, plan.output_width, plan.output_height, plan.output_fps)
    naive_frames = naive_frame_count(frames, settings.fps, plan.output_fps)
    naive_units = predict_generation_units(naive_gen, naive_frames, naive_frames, weights)

    def side(count: int, work: WorkUnits, fraction: float) -> EstimateSide:
        seconds = work.total * price.seconds_per_work_unit
        return EstimateSide(
            generated_frames=count,
            work_units=work.total,
            gpu_seconds=seconds,
            dollars=gpu_dollars(seconds, price, fraction),
        )

    return CostEstimate(
        tier=tier,
        plan=side(
            generated_frame_count(
                frames, plan.chunk_frames, overlap, settings.anchor != "off", lengths
            ),
            units,
            gpu_fraction,
        ),
        naive=side(naive_frames, naive_units, 1.0),
        ratio=savings_ratio(naive_units.total, units.total),
        notes=[
            f"reference speed ({price.seconds_per_work_unit_source}) and GPU price: "
            f"{price.source} (estimates)"
        ],
    )


class PreviewReport(BaseModel):
    """What a motion preview cost (CPU only, never the GPU) and what the full job would cost."""

    kind: Literal["preview"] = Field(default="preview", description="Always 'preview'.")
    tier: str = Field(description="Tier whose prices apply.")
    hardware: str = Field(description="Hardware kind of the tier (price table key).")
    preview: CostSide = Field(
        description="The preview itself: its stages' measured seconds and dollars; zero "
        "diffusion work units and zero GPU seconds, except the anchor keyframe's when it was "
        "asked for (one frame, which the job then takes from the cache)."
    )
    estimate: CostEstimate = Field(
        description="The full job on this input: predicted work units and dollars against naive."
    )
    notes: list[str] = Field(default_factory=list, description="What the figures mean.")


def build_preview_report(
    plan: Any,
    records: Sequence[Any],
    *,
    frames: int,
    tier: str = "local",
    prices: PriceTable = DEFAULT_PRICES,
) -> PreviewReport:
    """The report of a finished preview: its records (CPU: decode, pose, motion, preview; and
    the anchor keyframe's generation when asked for) priced, and the estimate of the job that
    would generate `frames` edited frames."""
    hardware, price = prices.for_tier(tier)
    stages = _stage_costs(records, price, prices)
    units = _measured_units(records)  # zero without the anchor frame: stated, not assumed
    keyframe = units.unet_evals > 0
    predicted = WorkUnits()
    if keyframe:  # weighed as the job's report weighs its units: by the models that ran
        weights = _measured_weights(records) or SD15_MODEL_WEIGHTS
        predicted = predict_keyframe_units(plan.generation, weights)
    side = _side(int(keyframe), units, predicted, stages, estimated=False)
    return PreviewReport(
        tier=tier,
        hardware=hardware,
        preview=side,
        estimate=estimate_plan(plan, frames, tier=tier, prices=prices),
        notes=[
            "the preview runs the job's decode, pose and motion stages (same cache keys: the "
            "job that follows reuses them) and draws the skeletons on CPU; no diffusion"
            + (
                ", except the anchor keyframe (one frame; the job takes it from the cache)"
                if keyframe
                else ""
            ),
            f"vCPU price: {prices.vcpu_source}",
        ],
    )
