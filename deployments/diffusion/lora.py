"""LoRA adapters on the UNet: where their weights come from, checking them against the UNet,
and fusing the set a batch asks for into the UNet's weights (Ray-free, importable without torch).

Decisions (the why):
- Sources: a LoRA is named in the app config (`LoraSource`: a .safetensors file, a directory
  holding one, an s3:// URI of either, or a hub id) and referred to by requests by name with a
  scale. Files and s3 objects go through `deployments.model_loading` like the base model (s3 is
  downloaded once into the model cache).
- Identity: a `LoraRef` in the batch key (`GenerationSettings.loras`) carries the file's content
  digest (sha256), so a LoRA replaced under the same name gets new batch and cache keys, and an
  engine that finds other bytes than the job was planned with refuses the batch. A hub LoRA has
  no bytes to hash before it is downloaded: its id and weight name stand in (documented).
- Format: diffusers/PEFT (``unet.<module>.lora_A/lora_B``) and the kohya format diffusers
  converts (``lora_unet_...``), safetensors only (a pickle is code, not weights). UNet-only:
  a file that also adapts the text encoder is refused rather than half applied.
- Fit: every key must name a module of this UNet with matching in/out features and a rank that
  agrees between its two matrices; anything else is an `InvalidSettingError` naming the first
  offending key, raised before the weights touch the UNet (and before any GPU work).
- Fusing: the batch's set is merged into the weights (PEFT `merge`), so a step costs what a
  plain UNet step costs: no per-step adapter matmuls, and the work units are unchanged.
  Switching sets unmerges and then copies the base weights back from a CPU copy taken before
  the first merge: PEFT's unmerge subtracts the delta in floating point (about 1e-6 off in
  fp32, more in fp16), the copy makes the base weights bit-exact again.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import InvalidSettingError

LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_LORAS = 4  # adapters fused into one batch
MIN_LORA_SCALE, MAX_LORA_SCALE = -4.0, 4.0
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save writes


class LoraSource(BaseModel):
    """One LoRA the app offers: where its weights are and what kind of LoRA it is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(
        min_length=1,
        description="LoRA weights in diffusers/PEFT or kohya format: a .safetensors file, a "
        "directory holding one, an s3://bucket/key of either, a hub id, or 'tiny' for the "
        "built-in random-weight test LoRA (tiny base model only).",
    )
    weight_name: str | None = Field(
        default=None,
        description="File inside a directory (or hub repo) source; default: its only "
        f".safetensors file, or {DEFAULT_WEIGHT_NAME}.",
    )
    few_step: bool = Field(
        default=False,
        description="A few-step distillation LoRA (LCM-LoRA, TCD, Hyper-SD): it lets the "
        "`turbo` preset run 6 steps without classifier-free guidance.",
    )


class LoraRef(BaseModel):
    """A LoRA in a batch key: its name, the digest of its weights and the scale it is fused at."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=LORA_NAME_PATTERN, description="Name in the app's LoRA config.")
    digest: str = Field(
        min_length=1,
        max_length=80,
        description="sha256 (first 16 hex digits) of the weights file; 'hub-' + a hash of "
        "the id for hub sources. Set by the server, never by the user.",
    )
    scale: float = Field(
        default=1.0,
        ge=MIN_LORA_SCALE,
        le=MAX_LORA_SCALE,
        description="Multiplier of the LoRA's delta when fused into the UNet weights.",
    )


def canonical_loras(loras: Sequence[LoraRef]) -> tuple[LoraRef, ...]:
    """The set sorted by name (one batch key per set, in any order); refuses duplicates."""
    names = [ref.name for ref in loras]
    if len(set(names)) != len(names):
        raise InvalidSettingError(f"each LoRA may be named once, got {names}")
    if len(names) > MAX_LORAS:
        raise InvalidSettingError(f"at most {MAX_LORAS} LoRAs per job, got {len(names)}")
    return tuple(sorted(loras, key=lambda ref: ref.name))


# --- files -------------------------------------------------------------------------------------


def _digest_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def hub_digest(uri: str, weight_name: str | None) -> str:
    return "hub-" + hashlib.sha256(f"{uri}\n{weight_name or ''}".encode()).hexdigest()[:16]


def resolve_lora_file(
    name: str,
    source: LoraSource,
    cache_dir: str | Path,
    *,
    s3_client: Any = None,
    s3_endpoint_url: str | None = None,
) -> Path | None:
    """The local .safetensors file of a LoRA (s3 downloaded once), or None for a hub id.

    Raises InvalidSettingError for a missing source, a file that is not .safetensors, or a
    directory without exactly one candidate file."""
    from deployments.model_loading import ModelSource, resolve_source

    try:
        kind, location = resolve_source(
            ModelSource(uri=source.uri),
            cache_dir,
            s3_client=s3_client,
            s3_endpoint_url=s3_endpoint_url,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise InvalidSettingError(f"LoRA '{name}': {exc}") from None
    except Exception as exc:  # boto3's errors (no such bucket, access denied) are not typed here
        raise InvalidSettingError(f"LoRA '{name}': cannot read {source.uri}: {exc}") from None
    if kind == "hub":
        return None
    path = Path(location)
    if kind == "directory":
        if source.weight_name:
            path = path / source.weight_name
        else:
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise InvalidSettingError(
                    f"LoRA '{name}': {source.uri} holds {len(found)} .safetensors files; name "
                    "the one to use with weight_name"
                )
            path = found[0]
        if not path.is_file():
            raise InvalidSettingError(f"LoRA '{name}': {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise InvalidSettingError(
            f"LoRA '{name}': {path.name} is not a .safetensors file (pickled .bin/.ckpt/.pt "
            "weights are refused: loading them runs code)"
        )
    return path


def lora_digest(name: str, source: LoraSource, path: Path | None) -> str:
    """The digest a `LoraRef` carries: the file's sha256, or the hub id's for a hub source."""
    if path is None:
        return hub_digest(source.uri, source.weight_name)
    return _digest_file(path)


def read_lora_state(
    name: str, source: LoraSource, path: Path | None
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """(state dict in diffusers' key format, network alphas) of a LoRA: its local file, or
    (`path` None) its hub id; refuses a file safetensors cannot read and one holding anything
    but UNet LoRA weights."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from safetensors.torch import load_file

    if path is None:
        raw = StableDiffusionLoraLoaderMixin.lora_state_dict(
            source.uri, weight_name=source.weight_name, use_safetensors=True
        )[0]
        where = source.uri
    else:
        where = path.name
        try:
            raw = load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
            raise InvalidSettingError(
                f"LoRA '{name}': {where} is not a readable safetensors file ({exc})"
            ) from None
    if not raw or not all("lora" in key or key.endswith(".alpha") for key in raw):
        sample = next((key for key in raw if "lora" not in key), "no tensors")
        raise InvalidSettingError(f"LoRA '{name}': {where} is not LoRA weights (found '{sample}')")
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(raw))
    foreign = [key for key in state if not key.startswith("unet.")]
    if foreign:
        raise InvalidSettingError(
            f"LoRA '{name}': it also adapts the text encoder ('{foreign[0]}'); motionserve "
            "applies UNet LoRAs only"
        )
    return state, alphas


_MATRIX = re.compile(r"^unet\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def check_lora_fits(name: str, state: dict[str, Any], unet: Any) -> None:
    """Raise InvalidSettingError unless every LoRA matrix fits a module of `unet` (a real or a
    meta-device UNet): the module exists, A's input width and B's output width match it, and
    A and B agree on the rank."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    peft_state = convert_unet_state_dict_to_peft(
        {key.removeprefix("unet."): value for key, value in state.items()}
    )
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in peft_state.items():
        match = _MATRIX.match(f"unet.{key}")
        if match is None:
            if key.endswith(".alpha"):
                continue
            raise InvalidSettingError(f"LoRA '{name}': unexpected key '{key}'")
        pairs.setdefault(match["module"], {})[match["which"]] = value
    if not pairs:
        raise InvalidSettingError(f"LoRA '{name}': holds no LoRA matrices for the UNet")
    for module_name, matrices in sorted(pairs.items()):
        if set(matrices) != {"A", "B"}:
            raise InvalidSettingError(
                f"LoRA '{name}': {module_name} has lora_{''.join(matrices)} but not both A and B"
            )
        try:
            module = unet.get_submodule(module_name)
        except AttributeError:
            raise InvalidSettingError(
                f"LoRA '{name}': adapts '{module_name}', which this UNet does not have (a LoRA "
                "for another model?)"
            ) from None
        module = getattr(module, "base_layer", module)  # already wrapped by another adapter
        inputs = getattr(module, "in_features", getattr(module, "in_channels", None))
        outputs = getattr(module, "out_features", getattr(module, "out_channels", None))
        down, up = matrices["A"], matrices["B"]
        shapes = f"A {tuple(down.shape)}, B {tuple(up.shape)}"
        if down.shape[0] != up.shape[1]:
            raise InvalidSettingError(
                f"LoRA '{name}': {module_name}: ranks of A and B differ ({shapes})"
            )
        if down.shape[1] != inputs or up.shape[0] != outputs:
            raise InvalidSettingError(
                f"LoRA '{name}': {module_name} is {inputs} -> {outputs} in this UNet but the "
                f"LoRA's matrices are {shapes} (a LoRA for another model?)"
            )


# --- the UNet's adapters -------------------------------------------------------------------------


class UNetLoras:
    """The LoRA adapters loaded into one UNet and the set fused into its weights now.

    `apply(refs, load)` makes the UNet compute with exactly `refs` fused (an empty set: the
    base weights, bit-exact). Adapters stay loaded (unmerged, inactive) up to `max_loaded`,
    least recently used evicted, so swapping between a few sets loads each file once.
    """

    def __init__(self, unet: Any, max_loaded: int = 8):
        self.unet = unet
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[tuple[str, str], str] = OrderedDict()  # (name, digest) -> id
        self.fused: tuple[LoraRef, ...] = ()
        self.loads = 0  # files loaded into the UNet (tests count them)
        self._backup: dict[str, Any] = {}  # module name -> its base weight, on CPU
        self._next_id = 0

    def apply(
        self,
        refs: Sequence[LoraRef],
        load: Callable[[LoraRef], tuple[dict[str, Any], dict[str, float] | None]],
    ) -> None:
        """Fuse `refs` (and nothing else) into the UNet; `load(ref)` gives a checked state."""
        refs = tuple(refs)
        if refs == self.fused:
            return
        self._unfuse()
        if not refs:
            return
        ids = [self._ensure_loaded(ref, load, keep=refs) for ref in refs]
        self.unet.enable_lora()
        self.unet.set_adapters(ids, weights=[ref.scale for ref in refs])
        self.unet.fuse_lora(adapter_names=ids)
        self.fused = refs

    def _unfuse(self) -> None:
        """Back to the base weights (exact) with every adapter inactive."""
        import torch

        if not self.loaded:
            return
        if self.fused:
            self.unet.unfuse_lora()
            with torch.no_grad():
                for module_name, weight in self._backup.items():
                    self.unet.get_submodule(module_name).base_layer.weight.copy_(weight)
            self.fused = ()
        self.unet.disable_lora()

    def _ensure_loaded(self, ref: LoraRef, load: Callable, keep: Sequence[LoraRef]) -> str:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        key = (ref.name, ref.digest)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        state, alphas = load(ref)
        wanted = {(r.name, r.digest) for r in keep}
        while len(self.loaded) >= self.max_loaded:
            victim = next(k for k in self.loaded if k not in wanted)
            self.unet.delete_adapters(self.loaded.pop(victim))
        adapter = f"lora{self._next_id}"
        self._next_id += 1
        with warnings.catch_warnings():  # "multiple adapters in the model": that is the plan
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            StableDiffusionLoraLoaderMixin.load_lora_into_unet(
                state, alphas, self.unet, adapter_name=adapter
            )
        self.loads += 1
        self.loaded[key] = adapter
        self._back_up_new_layers()
        return adapter

    def _back_up_new_layers(self) -> None:
        """CPU copies of the base weights of layers wrapped since the last call (taken while
        nothing is fused, so they are the base weights)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module_name, module in self.unet.named_modules():
            if isinstance(module, BaseTunerLayer) and module_name not in self._backup:
                base = module.get_base_layer().weight
                self._backup[module_name] = base.detach().to("cpu", copy=True)
