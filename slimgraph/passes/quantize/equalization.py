"""quantize.equalize: cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019).

Two layers in a row, y = W2 · f(W1 x + b1), with f positively homogeneous
(f(x / s) = f(x) / s for s > 0: ReLU, LeakyReLU, PReLU, max/average pooling, nothing),
compute the same function after

    W1[c] /= s_c,   b1[c] /= s_c,   W2[:, c] *= s_c        (s_c > 0 per channel c)

With s_c = sqrt(r1_c / r2_c), where r1_c is the largest |weight| of output channel c of
layer 1 and r2_c that of input channel c of layer 2, both channels end with the range
sqrt(r1_c r2_c): per-tensor (and per-channel) weight quantization then loses less on the
channels that had small ranges (depthwise convolutions above all). Chains of three or
more layers are equalized pair by pair, repeated until the scales settle (`iterations`).

Pairs (layer 1 -> layer 2, each a Conv, Gemm or MatMul with a constant weight, see
`_layers.LAYER_OPS`), found by following layer 1's output through nodes that have it as
their only input of data:

1. elementwise ops that commute with positive per-channel scaling (`HOMOGENEOUS`) pass;
2. `Add` of a constant that is per channel (or a scalar) passes, and its constant is
   divided by s too (a MatMul's bias);
3. `Flatten(axis=1)` / a batch-keeping `Reshape` from [N, C, ...] to [N, C*R] passes once
   (a Conv followed by a Gemm); layer 2's input channels then come in blocks of R;
4. anything else (Clip/ReLU6, Sigmoid, a branch, a graph output) ends the search, and the
   reason is counted in `skipped`.

Exact: only float multiplications; outputs change by float rounding (~1e-7 relative).
Run it after fold_batchnorm (a BatchNormalization between the layers stops it) and before
quantization.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassResult, float_range, int_range, register_pass
from slimgraph.passes.quantize._layers import (
    Layer, bias_vector, exclusive, find_layers, set_bias, set_input_constant, set_weight,
)
from slimgraph.passes.rewrite import constant

logger = logging.getLogger("slimgraph.passes.quantize.equalize")

#: Ops with f(x / s) = f(x) / s for a positive per-channel s (s along the channel axis).
HOMOGENEOUS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool",
    "Identity", "Dropout",
})
FLATTENS = frozenset({"Flatten", "Reshape"})


@dataclasses.dataclass
class Pair:
    first: Layer
    second: Layer
    #: Add nodes between the layers and the index of their constant input
    adds: list[tuple[ir.Node, int]]
    #: layer 2 reads each channel of layer 1 as `repeat` consecutive inputs (after a Flatten)
    repeat: int


def _per_channel_constant(c: np.ndarray, channel_axis: int, rank: int | None) -> bool:
    """c broadcasts along the channel axis only (or is a scalar)."""
    if c.size == 1:
        return True
    if channel_axis == -1:
        return all(d == 1 for d in c.shape[:-1])
    if rank is None:
        return False
    full = (1,) * (rank - c.ndim) + c.shape
    return all(d == 1 for i, d in enumerate(full) if i != channel_axis)


def _flattens_batch(node: ir.Node) -> bool:
    """Flatten / Reshape from [N, C, ...] to [N, C * ...]."""
    if node.op_type == "Flatten":
        return node.attributes.get_int("axis", 1) == 1
    shape = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is not None and shape.tolist() == [0, -1]:
        return True
    src, dst = node.inputs[0].shape, node.outputs[0].shape
    if src is None or dst is None or len(dst) != 2 or len(src) < 2:
        return False
    dims = list(src)[1:]
    return all(isinstance(d, int) for d in dims) and dst[1] == math.prod(dims)


def find_pair(first: Layer, layers: dict[ir.Node, Layer]) -> Pair | str:
    """The layer fed by `first` through scale-commuting nodes, or why there is none."""
    if not exclusive(first.weight_value, first.node):
        return "weight is shared or a graph input"
    bias = bias_vector(first)
    if isinstance(bias, str):
        return bias
    channel_axis, rank = first.channel_axis, (first.weight.ndim if first.node.op_type == "Conv" else None)
    value, adds, flattened = first.output, [], False
    while True:
        if value.is_graph_output():
            return "output is a graph output"
        uses = list(value.uses())
        if len(uses) != 1:
            return f"output feeds {len(uses)} nodes"
        node, index = uses[0].node, uses[0].idx
        second = layers.get(node)
        if second is not None:
            if index != 0:
                return f"output is the weight of {node.op_type}"
            return _check_second(first, second, adds, channel_axis, flattened)
        data_inputs = [v for v in node.inputs if v is not None and constant(v) is None]
        if len(data_inputs) != 1:
            return f"{node.op_type} between the layers has other inputs"
        if len([o for o in node.outputs if o.uses() or o.is_graph_output()]) != 1:
            return f"{node.op_type} between the layers has other outputs in use"
        if node.op_type == "Add":  # case 2
            c = constant(node.inputs[1 - index])
            if flattened or not _per_channel_constant(c, channel_axis, rank):
                return "Add of a constant that is not per channel"
            adds.append((node, 1 - index))
        elif node.op_type in FLATTENS and not flattened and channel_axis == 1 and _flattens_batch(node):  # case 3
            flattened, channel_axis = True, -1
        elif node.op_type not in HOMOGENEOUS:  # case 4 (case 1 passes)
            return f"{node.op_type} between the layers does not commute with scaling"
        value = next(o for o in node.outputs if o.uses() or o.is_graph_output())


def _check_second(first: Layer, second: Layer, adds, channel_axis: int, flattened: bool) -> Pair | str:
    if not exclusive(second.weight_value, second.node):
        return "weight of the second layer is shared or a graph input"
    reads_axis = 1 if second.node.op_type == "Conv" else -1
    if reads_axis != channel_axis:
        return f"{second.node.op_type} reads another axis than the channels of {first.node.op_type}"
    inputs = second.weight.shape[second.in_axis] * second.groups
    if flattened:
        if inputs % first.channels:
            return f"{inputs} flattened inputs are not a multiple of {first.channels} channels"
        return Pair(first, second, adds, inputs // first.channels)
    if inputs != first.channels:
        return f"{first.channels} channels feed {inputs} inputs"
    return Pair(first, second, adds, 1)


def _input_ranges(layer: Layer, repeat: int) -> np.ndarray:
    """Largest |weight| per input channel of `layer` (channels of the previous layer)."""
    w = np.abs(layer.weight)
    if layer.node.op_type == "Conv":
        g = layer.groups
        grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])  # [g, M/g, C/g, k...]
        axes = (1, *range(3, grouped.ndim))
        per_input = grouped.max(axis=axes).reshape(-1)  # [g * C/g]
    else:
        per_input = np.moveaxis(w, layer.in_axis, 0).reshape(w.shape[layer.in_axis], -1).max(axis=1)
    return per_input.reshape(-1, repeat).max(axis=1)


def _scale_inputs(layer: Layer, s: np.ndarray, repeat: int) -> np.ndarray:
    """layer's weight with input channel c multiplied by s[c]."""
    w = layer.weight
    per_input = np.repeat(s, repeat)
    if layer.node.op_type == "Conv":
        g = layer.groups
        grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        factor = per_input.reshape(g, 1, -1, *([1] * (w.ndim - 2)))
        return (grouped * factor).reshape(w.shape)
    shape = [1] * w.ndim
    shape[layer.in_axis] = -1
    return w * per_input.reshape(shape)


def _scale_outputs(layer: Layer, s: np.ndarray) -> np.ndarray:
    shape = [1] * layer.weight.ndim
    shape[layer.out_axis] = -1
    return layer.weight / s.reshape(shape)


def equalize_pair(model: Model, pair: Pair, max_scale: float) -> float:
    """Equalize one pair in place; returns max |log s| (0 when nothing changed)."""
    first, second = pair.first, pair.second
    r1 = np.abs(first.weight).max(axis=tuple(a for a in range(first.weight.ndim) if a != first.out_axis))
    r2 = _input_ranges(second, pair.repeat)
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1, dtype=np.float64)
    s[ok] = np.sqrt(r1[ok].astype(np.float64) / r2[ok])
    s = np.clip(s, 1.0 / max_scale, max_scale).astype(np.float32)
    change = float(np.max(np.abs(np.log(s)))) if s.size else 0.0
    if change == 0.0:
        return 0.0
    set_weight(model, first, _scale_outputs(first, s))
    if first.bias_value is not None:
        set_bias(model, first, bias_vector(first) / s)
    for add, index in pair.adds:
        c = constant(add.inputs[index])
        shaped = s if first.channel_axis == -1 else s.reshape(-1, *([1] * (first.weight.ndim - 2)))
        new = (np.broadcast_to(c, np.broadcast_shapes(c.shape, shaped.shape)) / shaped).astype(c.dtype)
        set_input_constant(model, add, index, new, f"{add.name or 'add'}_equalized")
    set_weight(model, second, _scale_inputs(second, s, pair.repeat))
    return change


@register_pass
class Equalize(Pass):
    """Cross-layer equalization of consecutive Conv/Gemm/MatMul pairs through ReLU (exact)."""

    name = "quantize.equalize"
    exact = True
    after = ("fold_batchnorm", "fuse_*")
    before = ("quantize.static", "quantize.dynamic", "quantize.weight_only", "quantize.fp8",
              "quantize.bias_correction", "quantize.sensitivity", "quantize.mixed_precision")

    class Config(PassConfig):
        #: rounds over all pairs (chains of 3+ layers need several to settle)
        iterations: int = int_range(1, 50, default=10)
        #: stop when no scale moves more than this (|log s|)
        tolerance: float = float_range(1e-6, 1e-1, default=1e-3, log=True)
        #: clamp each scale to [1 / max_scale, max_scale]
        max_scale: float = float_range(1.0, 1e6, default=1e4, log=True)

    def run(self, model: Model, ctx) -> PassResult:
        layers, _ = find_layers(model)
        by_node = {layer.node: layer for layer in layers}
        pairs, skipped = [], collections.Counter()
        for layer in layers:
            found = find_pair(layer, by_node)
            if isinstance(found, str):
                skipped[found] += 1
            else:
                pairs.append(found)
        changed, rounds = set(), 0
        for rounds in range(1, self.config.iterations + 1):
            largest = 0.0
            for pair in pairs:
                change = equalize_pair(model, pair, self.config.max_scale)
                if change > 0:
                    changed.add(pair.first.node)
                largest = max(largest, change)
            if largest < self.config.tolerance:
                break
        logger.info("equalized %d of %d layer pairs in %d rounds", len(changed), len(pairs), rounds)
        return PassResult(model, modified=bool(changed),
                          stats={"pairs": len(changed), "rounds": rounds if pairs else 0, "skipped": dict(skipped)})
