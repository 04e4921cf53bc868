"""quantize.bias_correction: cancel the mean output shift that weight quantization causes.

Rounding a layer's weight W to W_q shifts its output on average:
E[W_q x] - E[W x] = E[(W_q - W) x], one value per output channel, which accumulates
through the network as a bias (Nagel et al., "Data-Free Quantization", 2019, the
empirical variant). This pass measures that shift on the calibration data and subtracts
it from the layer's float bias, so that after quantization the layer's mean output is the
float model's again.

**Contract with quantize.static.** The shift is computed for exactly the weights
quantize.static produces: int8, symmetric, per output channel, `bits` wide
(`_layers.weight_qparams`, i.e. `QParams.from_range(min, max, dtype="int8",
symmetric=True, bits=bits, axis=<output-channel axis>)`), with `bits` chosen per layer
as static's `weight_bits` chooses it (`_layers.weight_bits`: "auto" = 7 bits on an x86
CPU without VNNI except depthwise convolutions, else 8). The weights themselves are left
in float and unchanged, so quantize.static, run next with the same weight settings,
rounds them to the same W_q; only the biases changed. With other weight settings
(another `weight_bits`, per-tensor or uint8 weights) the correction does not match.

How (probe models: copies with ReduceMean nodes reading each layer's output, run over
the data with `observers.stream`, memory independent of the sample count):

- `sequential` (default): the float model's mean output per channel of every layer is
  measured once; then, layer by layer in graph order, the same mean in a copy whose
  weights are all rounded and whose earlier layers are already corrected. The difference
  is E[W_q x_q] - E[W x]: the layer's own rounding plus the mean drift its input picked
  up from the rounded layers before it. One run per layer.
- `sequential=False`: one run computes Op(x, W_q - W) on each layer's float input x,
  i.e. E[W_q x] - E[W x], each layer's own rounding only.

Weight rounding only: the drift that 8-bit activations add is not simulated.

1. Conv / Gemm: the bias input becomes b - shift (a bias is added when there was none);
2. MatMul: its only reader being `Add(y, c)` with a constant c per output channel, c
   becomes c - shift; otherwise an `Add(y, -shift)` is inserted after it.

Lossy in float (the float model moves by the shift, by design); the quantized model moves
closer to the float one.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, int_range, register_pass
from slimgraph.passes.quantize._layers import (
    BITS_CHOICES, LAYER_OPS, Layer, add_bias_after, bias_vector, fake_quantize_weight, find_layers, new_initializer,
    set_bias, set_input_constant, set_weight, weight_bits,
)
from slimgraph.passes.quantize.observers import stream
from slimgraph.passes.rewrite import constant

logger = logging.getLogger("slimgraph.passes.quantize.bias_correction")

PROBE_PREFIX = "slimgraph_bias_probe_"
#: a layer (of a copy) -> its weight bits
BitsOf = Callable[[Layer], int]


def _reduce_mean(model: Model, x: ir.Value, axes: list[int], name: str) -> ir.Node:
    """ReduceMean over `axes` without keeping them (axes as input from opset 18 on)."""
    if model.opset >= 18:
        axes_value = new_initializer(model, np.asarray(axes, np.int64), f"{name}_axes")
        return ir.node("ReduceMean", [x, axes_value], {"keepdims": 0}, name=name)
    return ir.node("ReduceMean", [x], {"axes": axes, "keepdims": 0}, name=name)


def _mean_probe(model: Model, layer: Layer, value: ir.Value, name: str) -> str:
    """Append nodes computing the mean of `value` (an output of `layer`'s shape) per output
    channel; returns the name of that [C] output."""
    if layer.node.op_type == "Conv":
        reduce = _reduce_mean(model, value, [0, *range(2, layer.weight.ndim)], f"{name}_mean")
        nodes = [reduce]
    else:  # [..., N] -> [rows, N] -> [N]
        shape = new_initializer(model, np.asarray([-1, layer.channels], np.int64), f"{name}_shape")
        flat = ir.node("Reshape", [value, shape], name=f"{name}_flat")
        reduce = _reduce_mean(model, flat.outputs[0], [0], f"{name}_mean")
        nodes = [flat, reduce]
    reduce.outputs[0].name = name
    model.graph.extend(nodes)
    return name


def _delta_probe(model: Model, layer: Layer, delta: np.ndarray, name: str) -> str:
    """Append Op(x, delta) (no bias) on the layer's input and its mean per channel."""
    delta_value = new_initializer(model, delta, f"{name}_delta")
    attributes = {key: attr for key, attr in layer.node.attributes.items()}
    shifted = ir.node(layer.node.op_type, [layer.activation, delta_value], attributes, name=f"{name}_op")
    model.graph.append(shifted)
    return _mean_probe(model, layer, shifted.outputs[0], name)


def _means(model: Model, names: list[str], channels: list[int], data, progress: bool,
           description: str) -> list[np.ndarray]:
    """Means over the data of the outputs `names` ([C] each), one run of `model`."""
    sums = [np.zeros(c) for c in channels]
    total = 0
    for count, _, outputs in stream(model, data, names, progress=progress, description=description,
                                    where="quantize.bias_correction"):
        for i, output in enumerate(names):
            sums[i] += outputs[output].astype(np.float64) * count
        total += count
    return [s / total for s in sums]


def _twins(model: Model, copy: Model, layers: list[Layer]) -> list[Layer]:
    """The layers of `copy` (a clone of `model`) at the same places as `layers`."""
    position = {node: i for i, node in enumerate(model.graph)}
    nodes = list(copy.graph)
    return [LAYER_OPS[layer.node.op_type](nodes[position[layer.node]]) for layer in layers]


def own_shifts(model: Model, layers: list[Layer], data, *, bits: BitsOf, progress: bool) -> list[np.ndarray]:
    """E[Op(x, W_q - W)] per channel of each layer, with float inputs x; one run."""
    probe = model.clone()
    names = [_delta_probe(probe, t, fake_quantize_weight(t, bits(t)) - t.weight, f"{PROBE_PREFIX}{i}")
             for i, t in enumerate(_twins(model, probe, layers))]
    shifts = _means(probe, names, [layer.channels for layer in layers], data, progress,
                    f"bias correction: {len(layers)} layers")
    return [shift.astype(np.float32) for shift in shifts]


def sequential_shifts(model: Model, layers: list[Layer], data, *, bits: BitsOf, progress: bool) -> list[np.ndarray]:
    """E[W_q x_q] - E[W x] per channel of each layer, the layers before it rounded and
    corrected; one run for the float means, then one per layer."""
    channels = [layer.channels for layer in layers]
    reference = model.clone()
    names = [_mean_probe(reference, t, t.output, f"{PROBE_PREFIX}{i}")
             for i, t in enumerate(_twins(model, reference, layers))]
    float_means = _means(reference, names, channels, data, progress, "bias correction: float means")
    rounded = model.clone()
    twins = _twins(model, rounded, layers)
    for twin in twins:
        set_weight(rounded, twin, fake_quantize_weight(twin, bits(twin)))
    shifts = []
    for i, twin in enumerate(twins):
        probe = _mean_probe(rounded, twin, twin.output, f"{PROBE_PREFIX}{i}")
        (mean,) = _means(rounded, [probe], [channels[i]], data, progress,
                         f"bias correction: layer {i + 1}/{len(twins)}")
        shift = (mean - float_means[i]).astype(np.float32)
        _apply(rounded, twin, shift)
        shifts.append(shift)
    return shifts


def _correct_matmul(model: Model, layer: Layer, shift: np.ndarray) -> str:
    """Subtract `shift` after a MatMul; returns how ("folded into Add" / "Add inserted")."""
    out = layer.output
    uses = list(out.uses())
    if len(uses) == 1 and not out.is_graph_output():
        add, index = uses[0].node, uses[0].idx
        if add.op_type == "Add" and add.domain in ("", "ai.onnx"):
            c = constant(add.inputs[1 - index])
            if c is not None and (c.size == 1 or c.shape[-1] == layer.channels and c.size == layer.channels):
                new = (np.broadcast_to(c, (layer.channels,)).reshape(-1) - shift).astype(c.dtype)
                set_input_constant(model, add, 1 - index, new.reshape(c.shape if c.size > 1 else (-1,)),
                                   f"{add.name or 'add'}_corrected")
                return "folded into Add"
    add_bias_after(model, layer, -shift)
    return "Add inserted"


def _apply(model: Model, layer: Layer, shift: np.ndarray) -> str:
    """Subtract `shift` from the layer's output; returns how."""
    if layer.has_bias_input:
        set_bias(model, layer, bias_vector(layer) - shift)
        return "bias"
    return _correct_matmul(model, layer, shift)


@register_pass
class BiasCorrection(Pass):
    """Correct biases for the mean output shift of int8 per-channel weights (lossy in float)."""

    name = "quantize.bias_correction"
    exact = False
    requires = ("data",)
    after = ("fold_batchnorm", "fuse_*", "quantize.equalize", "quantize.smoothquant")
    before = ("quantize.static", "quantize.dynamic")

    class Config(PassConfig):
        #: weight bits, as quantize.static's weight_bits ("auto": 7 on x86 without VNNI, else 8)
        bits: str | int = choice(*BITS_CHOICES, default="auto")
        #: calibration samples (the first ones of the data)
        samples: int = int_range(1, 100_000, default=256, log=True)
        #: correct layer by layer for the drift of the rounded layers before (one run per
        #: layer), or each layer for its own rounding only (one run)
        sequential: bool = choice(True, False, default=True)

    def run(self, model: Model, ctx) -> PassResult:
        layers, skipped = find_layers(model)
        usable = []
        for layer in layers:
            reason = bias_vector(layer) if layer.has_bias_input else None
            if isinstance(reason, str):
                skipped[reason] += 1
            else:
                usable.append(layer)
        if not usable:
            return PassResult(model, modified=False, stats={"layers": 0, "skipped": dict(skipped)})
        data = {k: v[: self.config.samples] for k, v in (ctx.data or {}).items()}
        measure = sequential_shifts if self.config.sequential else own_shifts
        setting, target = self.config.bits, ctx.target
        shifts = measure(model, usable, data, bits=lambda layer: weight_bits(layer, setting, target),
                         progress=ctx.progress)
        corrected, how = 0, collections.Counter()
        for layer, shift in zip(usable, shifts):
            if not np.any(shift):
                continue
            how[_apply(model, layer, shift)] += 1
            Model.annotate(layer.node, "quantize.bias_correction.bits", weight_bits(layer, setting, target))
            corrected += 1
        largest = max((float(np.abs(s).max()) for s in shifts), default=0.0)
        logger.info("bias correction: %d layers, largest shift %.3g", corrected, largest)
        return PassResult(model, modified=corrected > 0, stats={
            "layers": corrected, "max_shift": largest, "how": dict(how), "skipped": dict(skipped),
        })
