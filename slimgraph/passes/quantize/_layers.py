"""Layers with a constant weight, as the accuracy tools (equalization, SmoothQuant, bias
correction, sensitivity, mixed precision) see them, and the weight quantization they
simulate.

`LAYER_OPS` is the one table: for Conv, Gemm and MatMul it says where the weight is,
which weight axis holds the output channels and which the input channels, where the bias
goes, and which axis of the *output activation* holds the channels. `find_layers(model)`
returns one `Layer` per main-graph node that has a constant float weight; every other
node of those op types is counted under the reason it was left out.

`fake_quantize_weight(layer, bits)` is the weight quantization quantize.static performs
(QParams: int8, symmetric, per output channel, `bits` wide, `weight_bits` choosing the
bits as static's `weight_bits` does), dequantized back to float. Bias correction corrects
for exactly this, and sensitivity / mixed precision simulate it.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.quantize.qparams import QParams
from slimgraph.passes.rewrite import constant


@dataclasses.dataclass
class Layer:
    """One Conv / Gemm / MatMul whose weight is a constant (see `LAYER_OPS`)."""

    node: ir.Node
    weight_value: ir.Value
    #: the weight as stored (Conv [M, C/g, k...], Gemm B [K, N] or [N, K], MatMul [K, N])
    weight: np.ndarray
    #: weight axis of the output channels / of the input channels
    out_axis: int
    in_axis: int
    #: axis of the output activation that holds the output channels (Conv: 1, else -1)
    channel_axis: int
    groups: int = 1
    #: Gemm's beta: the bias input is added as beta * C
    bias_factor: float = 1.0

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def activation(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def channels(self) -> int:
        return self.weight.shape[self.out_axis]

    @property
    def has_bias_input(self) -> bool:
        return self.node.op_type in ("Conv", "Gemm")

    @property
    def bias_value(self) -> ir.Value | None:
        inputs = self.node.inputs
        return inputs[2] if self.has_bias_input and len(inputs) > 2 and inputs[2] is not None else None


def _weight(node: ir.Node, index: int) -> np.ndarray | str:
    if len(node.inputs) <= index or node.inputs[index] is None:
        return "no weight input"
    w = constant(node.inputs[index])
    if w is None:
        return "weight is not a constant"
    if w.dtype != np.float32:
        return f"weight is {w.dtype}, not float32"
    return w


def _conv(node: ir.Node) -> Layer | str:
    w = _weight(node, 1)
    if isinstance(w, str):
        return w
    if w.ndim < 3:
        return "weight is not a convolution kernel"
    return Layer(node, node.inputs[1], w, 0, 1, 1, groups=node.attributes.get_int("group", 1))


def _gemm(node: ir.Node) -> Layer | str:
    if node.attributes.get_int("transA", 0):
        return "Gemm with transA=1"
    w = _weight(node, 1)
    if isinstance(w, str):
        return w
    trans_b = node.attributes.get_int("transB", 0)
    alpha = node.attributes.get_float("alpha", 1.0)
    if alpha != 1.0:
        return "Gemm with alpha != 1"
    return Layer(node, node.inputs[1], w, 0 if trans_b else 1, 1 if trans_b else 0, -1,
                 bias_factor=node.attributes.get_float("beta", 1.0))


def _matmul(node: ir.Node) -> Layer | str:
    w = _weight(node, 1)
    if isinstance(w, str):
        return w
    if w.ndim != 2:
        return f"weight is rank {w.ndim}, not a [K, N] matrix"
    return Layer(node, node.inputs[1], w, 1, 0, -1)


#: op type -> how to read it as a Layer (or the reason it is not one)
LAYER_OPS: dict[str, Callable[[ir.Node], Layer | str]] = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}


def find_layers(model: Model) -> tuple[list[Layer], collections.Counter]:
    """(layers in graph order, {reason: count} for the Conv/Gemm/MatMul nodes left out)."""
    layers, skipped = [], collections.Counter()
    for node in model.graph:
        reader = LAYER_OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if reader is None:
            continue
        found = reader(node)
        if isinstance(found, str):
            skipped[found] += 1
        else:
            layers.append(found)
    return layers, skipped


# --- weight quantization --------------------------------------------------------------------------
#: `bits` settings of the accuracy tools, as quantize.static's `weight_bits`
BITS_CHOICES = ("auto", 4, 5, 6, 7, 8)


def weight_bits(layer: Layer, setting: str | int, target: str = "cpu") -> int:
    """The weight bits quantize.static gives this layer: `setting` when it is a number;
    "auto" (static's default): 7 where ORT's u8s8 GEMM may saturate (x86 CPU without VNNI,
    target "cpu"), except depthwise convolutions, else 8 (see static.py)."""
    if setting != "auto":
        return int(setting)
    from slimgraph.passes.quantize._cpu import auto_weight_bits

    return auto_weight_bits(layer.node, target=target)


def weight_qparams(layer: Layer, bits: int = 8) -> QParams:
    """What quantize.static uses for this weight: int8, symmetric, per output channel."""
    w = layer.weight
    axes = tuple(a for a in range(w.ndim) if a != layer.out_axis)
    return QParams.from_range(w.min(axis=axes), w.max(axis=axes), dtype="int8", symmetric=True,
                              bits=bits, axis=layer.out_axis)


def fake_quantize_weight(layer: Layer, bits: int = 8) -> np.ndarray:
    """The weight after int8 quantization and dequantization (float32, same shape)."""
    q = weight_qparams(layer, bits)
    return q.dequantize(q.quantize(layer.weight))


# --- editing ----------------------------------------------------------------------------------------
def exclusive(value: ir.Value, node: ir.Node) -> bool:
    """True when `node` is the only reader of `value` and it is not a graph input/output."""
    return (not value.is_graph_input() and not value.is_graph_output()
            and all(use.node is node for use in value.uses()))


def fresh_name(model: Model, base: str) -> str:
    taken = set(model.graph.initializers)
    taken.update(v.name for v in model.graph.inputs)
    taken.update(o.name for n in model.nodes(recursive=True) for o in n.outputs)
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def new_initializer(model: Model, array: np.ndarray, base: str) -> ir.Value:
    tensor = ir.tensor(array)
    value = ir.Value(name=fresh_name(model, base), const_value=tensor, shape=ir.Shape(array.shape),
                     type=ir.TensorType(tensor.dtype))
    model.graph.register_initializer(value)
    return value


def set_input_constant(model: Model, node: ir.Node, index: int, array: np.ndarray, base: str) -> None:
    """Make input `index` of `node` the constant `array`: in place when the node is its only
    reader, else through a new initializer (the old one stays for its other readers)."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is not None and value.const_value is not None and exclusive(value, node) \
            and value.name in model.graph.initializers:
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    new = new_initializer(model, array, base)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)


def set_weight(model: Model, layer: Layer, array: np.ndarray) -> None:
    set_input_constant(model, layer.node, 1, array.astype(np.float32), f"{layer.weight_value.name}_adj")
    layer.weight = array.astype(np.float32)
    layer.weight_value = layer.node.inputs[1]


def bias_vector(layer: Layer) -> np.ndarray | str:
    """The layer's bias as one value per output channel (zeros when it has none), or why it
    cannot be read that way (a Gemm C that is not per output channel)."""
    value = layer.bias_value
    if value is None:
        return np.zeros(layer.channels, np.float32)
    b = constant(value)
    if b is None:
        return "bias is not a constant"
    if b.size == 1:
        return np.full(layer.channels, float(b.reshape(())) * layer.bias_factor, np.float32)
    if b.size != layer.channels or (b.ndim == 2 and b.shape[0] != 1):
        return f"bias of shape {list(b.shape)} is not per output channel"
    return (b.reshape(-1) * layer.bias_factor).astype(np.float32)


def set_bias(model: Model, layer: Layer, bias: np.ndarray) -> None:
    """Give a Conv / Gemm the per-channel `bias` (as beta * C for a Gemm). MatMul has no
    bias input: callers add an Add node (see `add_bias_after`)."""
    if not layer.has_bias_input:
        raise ValueError(f"{layer.node.op_type} {layer.name!r} has no bias input")
    stored = (bias / layer.bias_factor).astype(np.float32)
    set_input_constant(model, layer.node, 2, stored, f"{layer.weight_value.name}_bias")


def add_bias_after(model: Model, layer: Layer, bias: np.ndarray) -> ir.Node:
    """Insert `y + bias` after the layer's output y (bias along the last axis); consumers
    and graph outputs (names kept) move to the sum."""
    out = layer.output
    name = out.name
    bias_value = new_initializer(model, bias.astype(np.float32), f"{name}_bias")
    add = ir.node("Add", [out, bias_value], name=fresh_name(model, f"{layer.name}_bias_add"))
    model.graph.insert_after(layer.node, add)
    result = add.outputs[0]
    for use in list(out.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, result)
    if out.is_graph_output():
        out.name = fresh_name(model, f"{name}_before_bias")
        for i, o in enumerate(model.graph.outputs):
            if o is out:
                model.graph.outputs[i] = result
        result.name = name
    else:
        result.name = fresh_name(model, f"{name}_biased")
    result.shape, result.type = out.shape, out.type
    return add
