"""A request + a probed input -> the job's plan, and the cost estimate of POST /v1/estimate."""

from __future__ import annotations

from typing import Any

from deployments.video import decoded_frame_count
from serve.config import AppArgs
from serve.cost import estimate_plan
from serve.pipeline import Plan, make_plan


def plan_for(args: AppArgs, request, info) -> dict[str, Any]:
    plan = make_plan(
        request.preset or args.default_preset,
        info.width,
        info.height,
        model_id=args.base_model,
        styles=request.styles,
        output_fps=request.output.fps,
        output_width=request.output.width,
        output_height=request.output.height,
        overrides=request.overrides,
    )
    return plan.model_dump(mode="json")


def estimate(args: AppArgs, request, duration_s: float, width: int, height: int) -> dict:
    plan = Plan.model_validate(plan_for(args, request, _Info(width, height)))
    frames = decoded_frame_count(duration_s, plan.generation.fps)
    return {
        "plan_explained": plan.explain(),
        **estimate_plan(plan, frames, tier=args.tier).model_dump(mode="json"),
    }


class _Info:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
