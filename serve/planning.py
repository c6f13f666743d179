"""A request + a probed input -> the job's plan, and the cost estimate of POST /v1/estimate."""

from __future__ import annotations

from typing import Any

from deployments.errors import InvalidSettingError
from deployments.motion import MotionEditor
from deployments.video import InputLimits, decoded_frame_count
from serve.config import AppArgs
from serve.cost import estimate_plan
from serve.loras import few_step_loras
from serve.pipeline import Plan, make_plan
from serve.presets import PRESETS


def plan_for(args: AppArgs, request, info, reference: bool | None = None) -> dict[str, Any]:
    """The job's plan. `reference`: whether the job has a reference image (None: not known, as
    for an estimate). The preset's coherence, the request's `coherence` switches, its field
    overrides and the reference image combine as `serve.pipeline.coherence_overrides` says (a
    reference turns anchor attention on with the reference as its anchor, unless a switch or
    an override says otherwise); `anchor: "reference"` without a reference image is refused.
    LoRAs named in the overrides become the plan's LoRA set (with their weights' digests);
    `turbo` adds the app's few-step LoRA, or is refused without one (serve.loras.few_step_loras)."""
    overrides = dict(request.overrides or {})
    preset = request.preset or args.default_preset
    if preset in PRESETS:  # an unknown one is refused by make_plan
        few_step_loras(args, overrides, PRESETS[preset].few_step)
    plan = make_plan(
        preset,
        info.width,
        info.height,
        model_id=args.base_model,
        styles=request.styles,
        output_fps=request.output.fps,
        output_width=request.output.width,
        output_height=request.output.height,
        overrides=overrides,
        coherence=request.coherence,
        reference=reference,
        motion_module_available=args.motion_module is not None,
    )
    if plan.generation.motion_module and args.motion_module is None:
        raise InvalidSettingError(
            "motion_module needs a motion module, and this server has none configured (the "
            "app's motion_module setting); leave it out or set it to false"
        )
    if plan.generation.conditioner == "t2i_adapter" and args.t2i_adapter is None:
        raise InvalidSettingError(
            'conditioner "t2i_adapter" needs a T2I-Adapter, and this server has none '
            'configured (the app\'s t2i_adapter setting); use "controlnet"'
        )
    return plan.model_dump(mode="json")


def estimate(args: AppArgs, request, duration_s: float, width: int, height: int) -> dict:
    """POST /v1/estimate: what the job would cost, or the InvalidSettingError (422) its
    submission would get; an input beyond this app's limits is refused the same way."""
    check_estimate_input(args.input_limits(), duration_s, width, height)
    plan = Plan.model_validate(plan_for(args, request, _Info(width, height)))
    decoded = decoded_frame_count(duration_s, plan.generation.fps)
    frames = MotionEditor(plan.styles).edited_frame_count(decoded)  # after the retime styles
    return {
        "plan_explained": plan.explain(),
        **estimate_plan(plan, frames, tier=args.tier).model_dump(mode="json"),
    }


def check_estimate_input(limits: InputLimits, duration_s: float, width: int, height: int):
    """The limits an upload would be probed against (a 413 there), as a 422 on an estimate."""
    if duration_s > limits.max_duration_s:
        raise InvalidSettingError(
            f"duration_s must be at most {limits.max_duration_s:g} s on this server, "
            f"got {duration_s:g}"
        )
    if width * height > limits.max_pixels:
        raise InvalidSettingError(
            f"the input is {width}x{height} = {width * height} pixels; this server takes at "
            f"most {limits.max_pixels}"
        )


class _Info:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
