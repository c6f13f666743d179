"""The work-unit formula: what the GPU must do for a chunk, independent of hardware.

Pure Python (pydantic only, no torch, no numpy), so the cost model (`serve/cost.py`) imports it
without loading the engine; `DiffusionEngine.generate` counts the same things as it runs.

Decisions (the why):
- A work unit is the FLOPs of one evaluation of the loaded UNet at 512x512 (`ModelWeights.
  unit_flops`). Every model call (UNet, ControlNet, VAE decode/encode, motion module) is
  weighed by its FLOPs at its latent shape (h, w): `c + sum over levels l of (a_l T_l +
  b_l T_l^2)`, T_l = ceil(h / 2**l) x ceil(w / 2**l) tokens (`FlopFormula`). Convolutions,
  norms, projections and cross-attention are linear in a level's tokens, spatial
  self-attention quadratic, so latent area alone (the rule before) understated large frames:
  an SD 1.5 UNet call at 1920x1080 is 2.06x its area weight, a ControlNet call 2.20x (1.84x
  the parameter-ratio rule used before), while 512x288 calls cost 0.94x. The coefficients are
  fitted per architecture from FLOP counts on the meta device (`flops.py`, exact: whole FLOPs,
  residual 0) and carried here as numbers, so this module stays torch-free; SD 1.5's are the
  defaults.
- Outside `control_guidance_start/end` ControlNet is not evaluated at all (the pipeline
  evaluates it and multiplies by 0; adding zero residuals changes nothing, so skipping it is
  exact and saves the work).
- Classifier-free guidance runs only when guidance_scale > 1; then UNet and ControlNet see each
  frame twice (unconditional and conditional halves), and both are counted twice.
- Text encoding (one per distinct prompt per batch, about 2% of one UNet evaluation at SD 1.5
  size) is not counted in work units.
- Anchor attention (settings.anchor on) costs three things, all counted. (1) The anchor
  keyframe: the job's frame 0 generated once, alone, before the chunks (`keyframe_settings`:
  with a reference image it carries its own anchor pass); a 1-frame generation like any other,
  counted by the engine on that request and predicted per job (`serve/cost.py`). (2) Each
  chunk's anchor pass: one VAE encode of the keyframe image per chunk (`vae_encodes`, weighted
  by the encoder's FLOPs relative to the UNet's; encoding per chunk rather than once per job
  keeps a chunk's work independent of the others: any chunk may run on any replica, be retried
  or be cached; about 1.4 UNet evaluations per chunk) and one UNet row per chunk per step
  (twice with CFG), no ControlNet (an image anchor has no pose map). One per chunk, not per
  (job, batch): two chunks of one job in one batch each carry their own (identical) anchor row,
  so a chunk's work never depends on its batch mates and the prediction, made before any batch
  exists, equals the count. (3) The wider self-attention: each frame's attn1 layers also take
  the anchor's tokens (the level's grid pooled over pool x pool blocks), which adds the QK^T
  and AV products with them: per frame evaluation, sum over levels of
  `ModelWeights.anchor_attention[l]` x T_l x (anchor tokens at l), exact at every size.
- The motion module (settings.motion_module on, see motion_module.py) runs inside every UNet
  evaluation of the chunk's frames (and of its anchor, a window of one frame). Its FLOPs per
  frame are affine in the window length F (a chunk is one window): `motion_module`
  (projections, norms, feed-forwards of the temporal layers) + `motion_attention` x F (the
  temporal QK^T and AV), both linear in each level's tokens (the temporal attention runs per
  token, along the frames; no quadratic term). Counted as `motion_module_evals` (evaluations)
  and `motion_attention_evals` (evaluations x F).
- The T2I-Adapter (settings.conditioner 't2i_adapter', see t2i_adapter.py) replaces ControlNet:
  its features depend on the pose map only (no latents, no timestep, no text), so it runs once
  per keyframe per chunk, not per step, and not twice with CFG (both halves add the same
  features, as in diffusers' adapter pipeline); frames between keyframes get interpolated
  features. `adapter_evals` counts those forwards (pose maps), each weighed by the adapter's
  FLOPs at the chunk's size like every other call (`ModelWeights.adapter`: convolutions only,
  linear in each level's tokens). None when no step of the chunk applies conditioning
  (control_guidance_start/end).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, field_validator, model_validator

if TYPE_CHECKING:
    from deployments.diffusion.settings import GenerationSettings

VAE_FACTOR = 8  # SD's VAE downsamples each side by 8
REFERENCE_LATENT_AREA = 64 * 64  # 512x512 pixels: one UNet evaluation there is one work unit
# Units are sums of float products taken in different orders (counted: chunk by chunk as they
# finish; predicted: one chunk times the chunk count), so their last bits differ (seen:
# 3.2524024390243915 vs 3.252402439024391). Rounded to a millionth of a unit, far below any
# priced quantity, counted and predicted compare equal.
UNIT_DECIMALS = 6


class WorkUnits(BaseModel):
    """What the GPU must do, independent of hardware.

    Evaluations are counted per frame per step (twice with CFG); units weigh each by its
    model's FLOPs at the chunk's size relative to one UNet evaluation at 512x512
    (`ModelWeights`). Units add up across chunks and jobs.
    """

    unet_evals: int = Field(default=0, description="UNet evaluations (frame x step x CFG).")
    controlnet_evals: int = Field(default=0, description="ControlNet evaluations.")
    vae_decodes: int = Field(default=0, description="Frames decoded by the VAE.")
    unet_units: float = Field(
        default=0.0, description="UNet evaluations x their FLOPs at this size / unit FLOPs."
    )
    controlnet_units: float = Field(
        default=0.0, description="ControlNet evaluations x their FLOPs / unit FLOPs."
    )
    vae_units: float = Field(default=0.0, description="VAE decodes x their FLOPs / unit FLOPs.")
    vae_encodes: int = Field(
        default=0, description="Images encoded by the VAE (a reference-image anchor's)."
    )
    vae_encode_units: float = Field(
        default=0.0, description="VAE encodes x their FLOPs / unit FLOPs."
    )
    anchor_attention_evals: int = Field(
        default=0, description="UNet evaluations whose self-attention also took an anchor."
    )
    anchor_attention_units: float = Field(
        default=0.0,
        description="Those evaluations x the FLOPs of their attention to the pooled anchor "
        "tokens / unit FLOPs.",
    )
    motion_module_evals: int = Field(
        default=0, description="UNet evaluations that ran through the motion module."
    )
    motion_module_units: float = Field(
        default=0.0, description="Those evaluations x the motion module's FLOPs / unit FLOPs."
    )
    motion_attention_evals: int = Field(
        default=0,
        description="Motion-module evaluations x frames in their context window (the temporal "
        "attention of a frame grows with the window).",
    )
    adapter_evals: int = Field(
        default=0,
        description="T2I-Adapter evaluations: pose maps through the adapter (one per keyframe "
        "per chunk, not per step; CFG reuses them).",
    )
    adapter_units: float = Field(
        default=0.0, description="Those evaluations x the adapter's FLOPs / unit FLOPs."
    )
    motion_attention_units: float = Field(
        default=0.0,
        description="Those frame-evaluations x the temporal attention's FLOPs per window frame / "
        "unit FLOPs.",
    )

    # Every float field: one left out compares unequal in its last bits (counted vs predicted).
    @field_validator(
        "unet_units",
        "controlnet_units",
        "vae_units",
        "vae_encode_units",
        "anchor_attention_units",
        "motion_module_units",
        "motion_attention_units",
        "adapter_units",
    )
    @classmethod
    def _rounded(cls, units: float) -> float:
        return round(units, UNIT_DECIMALS)

    @property
    def total(self) -> float:
        return (
            self.unet_units
            + self.controlnet_units
            + self.vae_units
            + self.vae_encode_units
            + self.anchor_attention_units
            + self.motion_module_units
            + self.motion_attention_units
            + self.adapter_units
        )

    def __add__(self, other: WorkUnits) -> WorkUnits:
        return WorkUnits(
            **{name: getattr(self, name) + getattr(other, name) for name in WorkUnits.model_fields}
        )


def level_tokens(height: int, width: int, levels: int) -> list[int]:
    """Tokens at each resolution level of a latent (height, width): ceil(h / 2**l) x
    ceil(w / 2**l) (diffusers' stride-2 convs round up; the up path upsamples to the skip's
    size, so it sees the same counts)."""
    return [-(-height // 2**level) * -(-width // 2**level) for level in range(levels)]


def pooled_tokens(height: int, width: int, levels: int, pool: int) -> list[int]:
    """Anchor tokens at each level: the level's grid averaged over pool x pool blocks (the
    last partial block counts, as `avg_pool2d(ceil_mode=True)` does)."""
    sides = [(-(-height // 2**level), -(-width // 2**level)) for level in range(levels)]
    return [-(-h // pool) * -(-w // pool) for h, w in sides]


class FlopFormula(BaseModel):
    """FLOPs of one model call at a latent shape: `constant + sum over levels l of
    (linear[l] x T_l + quadratic[l] x T_l^2)`, T_l the tokens at level l (`level_tokens`).

    Convolutions, norms, projections, feed-forwards and cross-attention (to a fixed 77 text
    tokens) are linear in a level's tokens; spatial self-attention (QK^T and AV) is quadratic.
    Fitted from FLOP counts of the real architecture on the meta device (`flops.py`)."""

    constant: float = Field(description="FLOPs independent of the shape (time embedding, ...).")
    linear: tuple[float, ...] = Field(description="FLOPs per token at each level (level 0 first).")
    quadratic: tuple[float, ...] = Field(
        description="FLOPs per token^2 at each level (self-attention); as many as `linear`."
    )

    @model_validator(mode="after")
    def _same_levels(self) -> FlopFormula:
        if len(self.linear) != len(self.quadratic):
            raise ValueError("linear and quadratic need one coefficient per level each")
        return self

    def flops(self, height: int, width: int) -> float:
        """FLOPs at a latent (height, width)."""
        tokens = level_tokens(height, width, len(self.linear))
        return self.constant + sum(
            a * t + b * t * t for a, b, t in zip(self.linear, self.quadratic, tokens, strict=True)
        )


ZERO_FLOPS = FlopFormula(constant=0.0, linear=(), quadratic=())

# SD 1.5's models (UNet 859,520,964 parameters, ControlNet 361,279,120), fitted with `flops.py`
# from FlopCounterMode counts on meta copies at its 14 latent shapes: every coefficient is a
# whole number of FLOPs and the residual is 0. A test rebuilds each architecture on the meta
# device and checks the formulas at held-out shapes. UNet 803.27 GFLOPs at 512x512: one unit.
SD15_UNIT_FLOPS = 803_273_441_280.0
SD15_UNET_FLOPS = FlopFormula(
    constant=3_007_774_720,
    linear=(55_630_080, 215_820_800, 740_070_400, 616_432_640),
    quadratic=(6400, 12800, 25600, 5120),
)
SD15_CONTROLNET_FLOPS = FlopFormula(  # OpenPose ControlNet v1.1: from_unet, embedding 16..256
    constant=1_391_165_440,
    linear=(19_993_600, 63_063_040, 251_463_680, 344_458_240),
    quadratic=(2560, 5120, 10240, 5120),
)
# The VAE's levels are whole multiples of the latent (8h x 8w pixels), so one level in latent
# tokens holds them; its quadratic term is the mid block's attention at latent resolution.
SD15_VAE_DECODE_FLOPS = FlopFormula(constant=0, linear=(605_507_616,), quadratic=(2048,))
SD15_VAE_ENCODE_FLOPS = FlopFormula(constant=0, linear=(264_233_088,), quadratic=(2048,))
# FLOPs per (query token x anchor token) at each level: 4 x channels per attn1 layer (QK^T and
# AV over the anchor's tokens); SD 1.5: 5 layers at each of levels 0-2 (320, 640, 1280
# channels), 1 in the mid block (level 3). The same as the UNet's own quadratic terms.
SD15_ANCHOR_ATTENTION_FLOPS: tuple[float, ...] = (6400.0, 12800.0, 25600.0, 5120.0)
# AnimateDiff's SD 1.5 motion adapter (v1-5-2 architecture: 453,209,280 parameters, motion mid
# block) in UNetMotionModel: its FLOPs per frame minus the UNet's, for a window of F frames, are
# `motion_module + F x motion_attention` (about +38% of a UNet evaluation at 512x512, F=16).
SD15_MOTION_MODULE_FLOPS = FlopFormula(
    constant=-3_328_000,  # the motion model embeds the timestep once per window, not per frame
    linear=(22_528_000, 90_112_000, 360_448_000, 432_537_600),
    quadratic=(0, 0, 0, 0),
)
SD15_MOTION_ATTENTION_FLOPS = FlopFormula(
    constant=-32_000, linear=(12800, 25600, 51200, 61440), quadratic=(0, 0, 0, 0)
)
# TencentARC's SD 1.x openpose T2I-Adapter (full_adapter, channels 320/640/1280/1280, 2 res
# blocks, 77,369,280 parameters) on a pose map at 8x the latent size: convolutions only, linear
# in each level's tokens (59.89 GFLOPs at 512x512: 0.0746 units). Fitted with `flops.py`; a test
# rebuilds the architecture on the meta device and checks it.
SD15_ADAPTER_FLOPS = FlopFormula(
    constant=0, linear=(5_201_920, 16_793_600, 67_174_400, 65_536_000), quadratic=(0, 0, 0, 0)
)


class ModelWeights(BaseModel):
    """FLOP formulas of the loaded models; a work unit is one UNet evaluation at 512x512."""

    unit_flops: float = Field(
        default=SD15_UNIT_FLOPS,
        gt=0,
        description="FLOPs of one work unit: one evaluation of the loaded UNet at 512x512.",
    )
    unet: FlopFormula = Field(
        default=SD15_UNET_FLOPS, description="One UNet evaluation (one row) at a latent shape."
    )
    controlnet: FlopFormula = Field(
        default=SD15_CONTROLNET_FLOPS,
        description="One ControlNet evaluation (its pose map at 8x the latent size).",
    )
    vae_decode: FlopFormula = Field(
        default=SD15_VAE_DECODE_FLOPS, description="One frame decoded by the VAE."
    )
    vae_encode: FlopFormula = Field(
        default=SD15_VAE_ENCODE_FLOPS, description="One image encoded by the VAE."
    )
    anchor_attention: tuple[float, ...] = Field(
        default=SD15_ANCHOR_ATTENTION_FLOPS,
        description="FLOPs an anchor adds to one UNet evaluation's self-attention per (query "
        "token x anchor token) at each level (QK^T and AV in every attn1 layer of the level).",
    )
    motion_module: FlopFormula = Field(
        default=SD15_MOTION_MODULE_FLOPS,
        description="FLOPs the motion module adds to one frame evaluation apart from its "
        "temporal attention over the window.",
    )
    motion_attention: FlopFormula = Field(
        default=SD15_MOTION_ATTENTION_FLOPS,
        description="FLOPs the motion module's temporal attention adds to one frame "
        "evaluation per frame of its window.",
    )
    adapter: FlopFormula = Field(
        default=SD15_ADAPTER_FLOPS,
        description="One T2I-Adapter evaluation (its pose map at 8x the latent size).",
    )
    unet_parameters: int = Field(default=0, ge=0, description="UNet parameter count.")
    controlnet_parameters: int = Field(default=0, ge=0, description="ControlNet parameter count.")

    def units(self, formula: FlopFormula, width: int, height: int) -> float:
        """Work units of one call of `formula`'s model at a pixel size."""
        return formula.flops(height // VAE_FACTOR, width // VAE_FACTOR) / self.unit_flops

    def anchor_units(self, width: int, height: int, pool: int) -> float:
        """Work units an anchor pooled over pool x pool tokens adds to one UNet evaluation."""
        h, w, levels = height // VAE_FACTOR, width // VAE_FACTOR, len(self.anchor_attention)
        pairs = zip(level_tokens(h, w, levels), pooled_tokens(h, w, levels, pool), strict=True)
        return (
            sum(k * t * a for k, (t, a) in zip(self.anchor_attention, pairs, strict=True))
            / self.unit_flops
        )

    # The formulas at 512x512, relative to one UNet evaluation (reports, benchmarks).
    @property
    def controlnet_weight(self) -> float:
        return self.units(self.controlnet, 512, 512)

    @property
    def vae_weight(self) -> float:
        return self.units(self.vae_decode, 512, 512)

    @property
    def vae_encode_weight(self) -> float:
        return self.units(self.vae_encode, 512, 512)

    @property
    def anchor_attention_weight(self) -> float:
        """A full-size anchor (pool 1) at 512x512."""
        return self.anchor_units(512, 512, 1)

    @property
    def motion_module_weight(self) -> float:
        return self.units(self.motion_module, 512, 512)

    @property
    def motion_attention_weight(self) -> float:
        return self.units(self.motion_attention, 512, 512)

    @property
    def adapter_weight(self) -> float:
        return self.units(self.adapter, 512, 512)

    def reference_weights(self) -> dict[str, float]:
        """Each model's cost at 512x512 in work units (the weights the linear rule used)."""
        names = ("controlnet", "vae", "vae_encode", "anchor_attention", "motion_module")
        return {
            f"{name}_weight": getattr(self, f"{name}_weight")
            for name in (*names, "motion_attention", "adapter")
        }


SD15_MODEL_WEIGHTS = ModelWeights(unet_parameters=859_520_964, controlnet_parameters=361_279_120)


def cfg_enabled(guidance_scale: float) -> bool:
    return guidance_scale > 1.0


def controlnet_active_steps(steps: int, start: float, end: float) -> list[bool]:
    """Whether ControlNet applies at each step (the same test diffusers' pipeline makes)."""
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def keyframe_indices(frames: int, every: int) -> list[int]:
    """Every `every`-th frame from 0, plus the last frame, so no frame needs extrapolation."""
    if frames <= 0:
        return []
    keys = list(range(0, frames, every))
    if keys[-1] != frames - 1:
        keys.append(frames - 1)
    return keys


def weigh_work(
    unet_evals: int,
    controlnet_evals: int,
    vae_decodes: int,
    *,
    width: int,
    height: int,
    weights: ModelWeights,
    anchor_attention_evals: int = 0,
    anchor_pool: int = 1,
    vae_encodes: int = 0,
    motion_module_evals: int = 0,
    motion_attention_evals: int = 0,
    adapter_evals: int = 0,
) -> WorkUnits:
    """Counted evaluations weighed by each model's FLOPs at this size (`ModelWeights`)."""

    def units(formula: FlopFormula) -> float:
        return weights.units(formula, width, height)

    anchor = weights.anchor_units(width, height, anchor_pool) if anchor_attention_evals else 0.0
    return WorkUnits(
        unet_evals=unet_evals,
        controlnet_evals=controlnet_evals,
        vae_decodes=vae_decodes,
        unet_units=unet_evals * units(weights.unet),
        controlnet_units=controlnet_evals * units(weights.controlnet),
        vae_units=vae_decodes * units(weights.vae_decode),
        vae_encodes=vae_encodes,
        vae_encode_units=vae_encodes * units(weights.vae_encode),
        anchor_attention_evals=anchor_attention_evals,
        anchor_attention_units=anchor_attention_evals * anchor,
        motion_module_evals=motion_module_evals,
        motion_module_units=motion_module_evals * units(weights.motion_module),
        motion_attention_evals=motion_attention_evals,
        motion_attention_units=motion_attention_evals * units(weights.motion_attention),
        adapter_evals=adapter_evals,
        adapter_units=adapter_evals * units(weights.adapter),
    )


def predict_work_units(
    frames: int,
    steps: int,
    guidance_scale: float,
    controlnet_every: int,
    control_guidance_start: float,
    control_guidance_end: float,
    width: int,
    height: int,
    weights: ModelWeights = SD15_MODEL_WEIGHTS,
    *,
    anchor: bool = False,
    anchor_pool: int = 1,
    motion_module: bool = False,
    conditioner: str = "controlnet",
) -> WorkUnits:
    """Work units of one chunk of `frames` frames, before running it.

    UNet: frames x steps (x2 with CFG). ControlNet: keyframes x active steps (x2 with CFG).
    VAE: one decode per frame. With the anchor: one VAE encode (the anchor image), one more
    UNet row per step (the anchor's pass) and every frame evaluation's wider attention.
    `motion_module`: every UNet row also runs the motion module, the frames as one window of
    `frames`, the anchor as a window of one.
    `conditioner` 't2i_adapter': no ControlNet; the adapter once per keyframe (when any step
    applies conditioning).
    `DiffusionEngine.generate` counts exactly this.
    """
    passes = 2 if cfg_enabled(guidance_scale) else 1
    active = sum(controlnet_active_steps(steps, control_guidance_start, control_guidance_end))
    keyframes = len(keyframe_indices(frames, controlnet_every))
    adapter_evals = 0
    if conditioner == "t2i_adapter":
        keyframes, adapter_evals = 0, keyframes if active else 0
    rows = frames + (1 if anchor else 0)
    window_frames = frames * frames + (1 if anchor else 0)  # sum of each row's window length
    return weigh_work(
        rows * steps * passes,
        keyframes * active * passes,
        frames,
        width=width,
        height=height,
        weights=weights,
        anchor_attention_evals=frames * steps * passes if anchor else 0,
        anchor_pool=anchor_pool,
        vae_encodes=1 if anchor else 0,
        motion_module_evals=rows * steps * passes if motion_module else 0,
        motion_attention_evals=window_frames * steps * passes if motion_module else 0,
        adapter_evals=adapter_evals,
    )


def predict_chunk_units(
    settings: GenerationSettings, frames: int, weights: ModelWeights = SD15_MODEL_WEIGHTS
) -> WorkUnits:
    """`predict_work_units` for a chunk with these settings."""
    return predict_work_units(
        frames,
        settings.steps,
        settings.guidance_scale,
        settings.controlnet_every,
        settings.control_guidance_start,
        settings.control_guidance_end,
        settings.width,
        settings.height,
        weights,
        anchor=settings.anchor != "off",
        anchor_pool=settings.anchor_pool,
        motion_module=settings.motion_module,
        conditioner=settings.conditioner,
    )
