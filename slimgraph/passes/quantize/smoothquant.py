"""quantize.smoothquant: migrate activation outliers into the weights (Xiao et al., 2023).

A MatMul / Gemm `X @ W` (W constant [K, N]) whose input X has a few channels with huge
values quantizes badly: one per-tensor activation scale serves all K channels. With a
per-channel s > 0,

    X @ W = (X / s) @ (s[:, None] * W),   s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

moves part of each channel's range into row j of the weight (quantized per output
channel, which absorbs it). alpha = 0.5 splits the difficulty evenly; higher alpha moves
more of it into the weights.

The layers reading the same X (the Q, K and V projections of one LayerNorm) share one s,
computed from all their weights. The 1/s goes into X's producer when that node's only
readers are those layers and it can take it exactly:

1. `LayerNormalization` over the last axis with constant scale (and bias): both / s;
2. `Mul(z, gamma)` with a constant gamma per last-axis channel (or a scalar): gamma / s;
3. `Add(Mul(z, gamma), beta)` (a LayerNorm written out) with both constants per channel:
   gamma / s and beta / s;
4. otherwise, with `insert_mul` (the default), a new `Mul(X, 1/s)` feeds the layers
   (it runs on 8-bit data once quantized; the layers' input is then the smooth tensor);
   without it, the group is skipped and counted.

max|X_j| comes from calibration (`observers.calibrate`, min-max per channel of the last
axis) on the first `samples` samples of the context's data.

Exact in float: only multiplications by s and 1/s (~1e-7 relative).
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from slimgraph import data as sg_data
from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, float_range, int_range, register_pass
from slimgraph.passes.quantize._layers import (
    Layer, exclusive, find_layers, fresh_name, new_initializer, set_input_constant, set_weight,
)
from slimgraph.passes.quantize.observers import calibrate
from slimgraph.passes.rewrite import constant

logger = logging.getLogger("slimgraph.passes.quantize.smoothquant")

_MAX_SCALE = 1e5


@dataclasses.dataclass
class Group:
    """The layers that read one activation X."""

    activation: ir.Value
    layers: list[Layer]


def _per_last_axis(c: np.ndarray | None, k: int) -> bool:
    return c is not None and (c.size == 1 or (c.shape[-1] == k and c.size == k))


def _fold_plan(x: ir.Value, group: Group, k: int) -> list[tuple[ir.Node, int]] | str:
    """The (node, input index) constants that 1/s can be folded into, or why not."""
    readers = {layer.node for layer in group.layers}
    if x.is_graph_output() or any(use.node not in readers for use in x.uses()):
        return "the activation has other readers"
    node = x.producer()
    if node is None:
        return "the activation is a graph input"
    if node.op_type == "LayerNormalization":
        if node.attributes.get_int("axis", -1) != -1 and len(node.inputs[1].shape or []) != 1:
            return "LayerNormalization not over the last axis"
        plan = [(node, 1)] + ([(node, 2)] if len(node.inputs) > 2 and node.inputs[2] is not None else [])
    elif node.op_type == "Mul":
        plan = _mul_plan(node, k)
    elif node.op_type == "Add":
        plan = _add_plan(node, k)
    else:
        return f"{node.op_type} cannot absorb the scale"
    if isinstance(plan, str):
        return plan
    for n, i in plan:
        if not _per_last_axis(constant(n.inputs[i]), k):
            return f"{n.op_type}'s constant is not per channel"
    return plan


def _mul_plan(node: ir.Node, k: int) -> list[tuple[ir.Node, int]] | str:
    consts = [i for i, v in enumerate(node.inputs) if constant(v) is not None]
    if len(consts) != 1:
        return "Mul without exactly one constant"
    return [(node, consts[0])]


def _add_plan(node: ir.Node, k: int) -> list[tuple[ir.Node, int]] | str:
    consts = [i for i, v in enumerate(node.inputs) if constant(v) is not None]
    if len(consts) != 1:
        return "Add without exactly one constant"
    other = node.inputs[1 - consts[0]]
    mul = other.producer()
    if mul is None or mul.op_type != "Mul" or not exclusive(other, node):
        return "Add of a constant to something else than a Mul by a constant"
    inner = _mul_plan(mul, k)
    return inner if isinstance(inner, str) else [(node, consts[0]), *inner]


def find_groups(model: Model) -> tuple[list[Group], collections.Counter]:
    layers, _ = find_layers(model)
    by_activation: dict[ir.Value, list[Layer]] = collections.defaultdict(list)
    skipped: collections.Counter = collections.Counter()
    for layer in layers:
        if layer.node.op_type == "Conv":
            continue
        if not exclusive(layer.weight_value, layer.node):
            skipped["weight is shared or a graph input"] += 1
            continue
        by_activation[layer.activation].append(layer)
    return [Group(x, group) for x, group in by_activation.items()], skipped


def _scale_rows(layer: Layer, s: np.ndarray) -> np.ndarray:
    shape = [1] * layer.weight.ndim
    shape[layer.in_axis] = -1
    return layer.weight * s.reshape(shape)


def _insert_mul(model: Model, group: Group, inverse: np.ndarray) -> None:
    x = group.activation
    factor = new_initializer(model, inverse.astype(np.float32), f"{x.name}_smooth_scale")
    mul = ir.node("Mul", [x, factor], name=fresh_name(model, f"{x.name}_smooth"))
    mul.outputs[0].name = fresh_name(model, f"{x.name}_smoothed")
    mul.outputs[0].type, mul.outputs[0].shape = x.type, x.shape
    first = min((layer.node for layer in group.layers), key=list(model.graph).index)
    model.graph.insert_before(first, mul)
    for layer in group.layers:
        layer.node.replace_input_with(0, mul.outputs[0])
    Model.annotate(mul, "rule", "quantize.smoothquant")


@register_pass
class SmoothQuant(Pass):
    """SmoothQuant for MatMul/Gemm: move activation outliers into the weights (exact)."""

    name = "quantize.smoothquant"
    exact = True
    requires = ("data",)
    after = ("fold_batchnorm", "fuse_*", "quantize.equalize")
    before = ("quantize.static", "quantize.dynamic", "quantize.bias_correction", "quantize.sensitivity",
              "quantize.mixed_precision")

    class Config(PassConfig):
        #: share of each channel's range moved into the weights
        alpha: float = float_range(0.0, 1.0, default=0.5)
        #: calibration samples (the first ones of the data)
        samples: int = int_range(1, 100_000, default=128, log=True)
        #: insert Mul(X, 1/s) when X's producer cannot absorb 1/s
        insert_mul: bool = choice(True, False, default=True)

    def run(self, model: Model, ctx) -> PassResult:
        groups, skipped = find_groups(model)
        if not groups:
            return PassResult(model, modified=False, stats={"layers": 0, "skipped": dict(skipped)})
        data = {k: v[: self.config.samples] for k, v in ctx.data.items() if k in sg_data.input_ranks(model)}
        names = [g.activation.name for g in groups]
        ranges = calibrate(model, data, names, method="minmax", per_channel_axis={n: -1 for n in names},
                           progress=ctx.progress)
        alpha, smoothed, folded, inserted = self.config.alpha, 0, 0, 0
        for group in groups:
            lo, hi = ranges[group.activation.name]
            act = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
            k = act.size
            if any(layer.weight.shape[layer.in_axis] != k for layer in group.layers):
                skipped["activation channels do not match the weight rows"] += 1
                continue
            wmax = np.max([np.abs(np.moveaxis(layer.weight, layer.in_axis, 0)).reshape(k, -1).max(axis=1)
                           for layer in group.layers], axis=0).astype(np.float64)
            ok = (act > 0) & (wmax > 0)
            s = np.ones(k)
            s[ok] = act[ok] ** alpha / wmax[ok] ** (1 - alpha)
            s = np.clip(s, 1 / _MAX_SCALE, _MAX_SCALE).astype(np.float32)
            if np.all(s == 1):
                continue
            plan = _fold_plan(group.activation, group, k)
            if isinstance(plan, str) and not self.config.insert_mul:
                skipped[plan] += 1
                continue
            for layer in group.layers:
                set_weight(model, layer, _scale_rows(layer, s))
            if isinstance(plan, str):
                _insert_mul(model, group, 1.0 / s)
                inserted += 1
            else:
                for node, index in plan:
                    c = constant(node.inputs[index])
                    new = (np.broadcast_to(c, np.broadcast_shapes(c.shape, s.shape)) / s).astype(c.dtype)
                    set_input_constant(model, node, index, new, f"{node.name or node.op_type}_smoothed")
                folded += 1
            smoothed += len(group.layers)
        logger.info("smoothquant: %d layers smoothed (%d scales folded, %d Mul inserted)", smoothed, folded, inserted)
        return PassResult(model, modified=smoothed > 0, stats={
            "layers": smoothed, "folded": folded, "inserted_mul": inserted, "skipped": dict(skipped),
        })
