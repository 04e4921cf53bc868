"""QDQ lowering: the plan of `quantize.static` as QuantizeLinear/DequantizeLinear pairs,
for runtimes that fuse QDQ patterns themselves (ORT's QDQ transformers, TensorRT, ...).

The ops stay as they are; the parameters are the ones `lower_qoperator` uses, so both
formats compute the same integer model where the runtime fuses:

1. every planned 8-bit tensor (activation) gets `Q -> DQ` right after its producer (graph
   inputs: at the start); all its readers read the DQ output (graph outputs keep their
   names);
2. MAC weights become int8 initializers + DequantizeLinear (per channel, `axis`), biases
   int32 at scale x_scale * w_scale + DequantizeLinear; Gemm's alpha and beta are folded
   into them (the Gemm then has alpha = beta = 1);
3. BINARY constants become 8-bit + DequantizeLinear; Sub/Div by a constant become Add/Mul
   by its negation/reciprocal, as in the QOperator form; CONCAT constants take the
   output's qparams;
4. a FOLD clamp (Relu/Clip implied by its input's range) is removed: the DQ of its input
   already holds only values within its bounds (a graph output passes to the input, under
   its name; the clamp stays where its input is a graph input or output too).
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.quantize._common import Emitter, NodePlan, int32_bias, read_plan
from slimgraph.passes.quantize._ops import Kind, binary_constant, data_inputs, mac_bias, mac_weight
from slimgraph.passes.quantize.qparams import QParams
from slimgraph.passes.rewrite import constant

logger = logging.getLogger("slimgraph.passes.quantize.lower_qdq")


def lower(model: Model, owner: str = "quantize.static") -> dict[str, int]:
    """Insert the QDQ form of every planned node of `model` (in place); returns counts."""
    graph = model.graph
    graph.sort()
    emit = Emitter(model)
    counts: collections.Counter = collections.Counter()
    planned = [(node, plan) for node in list(graph) if (plan := read_plan(node)) is not None]
    tensors: dict[ir.Value, QParams] = {}
    old_constants = [v for node, _ in planned for v in node.inputs if v is not None and v.is_initializer()]
    for node, plan in planned:
        if plan.kind is Kind.FOLD and _remove_clamp(node):  # case 4
            counts["folded clamps"] += 1
            continue
        for i in data_inputs(node, plan.kind):
            tensors.setdefault(node.inputs[i], plan.inputs[i])
        for j, qp in plan.outputs.items():
            tensors.setdefault(node.outputs[j], qp)
        if plan.kind is Kind.MAC and constant(node.inputs[1]) is not None:
            _weights(emit, node, plan, counts)
        elif plan.kind in (Kind.BINARY, Kind.CONCAT):
            _constants(emit, node, plan, counts)
    first = next(iter(graph))
    for value, qp in tensors.items():  # case 1
        _pair(emit, value, qp, first)
        counts["QuantizeLinear"] += 1
        counts["DequantizeLinear"] += 1
    emit.remove_unused_initializers(old_constants)
    graph.sort()
    counts["lowered"] = len(planned)
    return dict(counts)


def _remove_clamp(node: ir.Node) -> bool:
    """Replace a folded clamp's output by its input; False where that would merge a graph
    input or output with another output."""
    x, y = node.inputs[0], node.outputs[0]
    if y.is_graph_output():
        if x.producer() is None or x.is_graph_output():
            return False
        name = y.name
        y.replace_all_uses_with(x, replace_graph_outputs=True)
        y.name, x.name = f"{name}_clamped", name
    else:
        y.replace_all_uses_with(x)
    node.graph.remove(node, safe=True)
    return True


def _dq(emit: Emitter, array: np.ndarray, qp: QParams, base: str, like: ir.Value, before: ir.Node) -> ir.Value:
    q = emit.constant(array, f"{base}_quantized")
    scale, zero = emit.qparams(qp, base)
    attributes = {"axis": qp.axis} if qp.axis is not None and qp.scale.ndim else {}
    node = emit.node("DequantizeLinear", [q, scale, zero], [(f"{base}_dequantized", ir.DataType.FLOAT, like.shape)],
                     attributes=attributes, before=before)
    return node.outputs[0]


def _weights(emit: Emitter, node: ir.Node, plan: NodePlan, counts) -> None:  # case 2
    wqp, xqp = plan.inputs[1], plan.inputs[0]
    w, weight, bias = node.inputs[1], mac_weight(node), mac_bias(node)
    node.replace_input_with(1, _dq(emit, wqp.quantize(weight), wqp, w.name, w, node))
    if bias is not None:
        scale = (xqp.scale.astype(np.float64) * wqp.scale.astype(np.float64)).astype(np.float32)
        b_int = int32_bias(bias, xqp, wqp, f"node {node.name!r}", logger)
        node.replace_input_with(2, _dq_int32(emit, b_int, scale, node.inputs[2].name, node))
    if node.op_type == "Gemm":
        for name in ("alpha", "beta"):
            if name in node.attributes:
                node.attributes[name] = ir.AttrFloat32(name, 1.0)
    counts["weights"] += 1


def _dq_int32(emit: Emitter, array: np.ndarray, scale: np.ndarray, base: str, before: ir.Node) -> ir.Value:
    """An int32 bias (zero point 0) and its DequantizeLinear, per channel when `scale` is."""
    q = emit.constant(array.astype(np.int32), f"{base}_quantized")
    s = emit.constant(scale, f"{base}_scale")
    zero = emit.constant(np.zeros(scale.shape, np.int32), f"{base}_zero_point")
    attributes = {"axis": 0} if scale.ndim else {}
    node = emit.node("DequantizeLinear", [q, s, zero], [(f"{base}_dequantized", ir.DataType.FLOAT, [array.size])],
                     attributes=attributes, before=before)
    return node.outputs[0]


def _constants(emit: Emitter, node: ir.Node, plan: NodePlan, counts) -> None:  # case 3
    for i, value in enumerate(node.inputs):
        array = constant(value)
        if array is None or i not in plan.inputs:
            continue
        if plan.kind is Kind.BINARY:
            array = binary_constant(node, i)
        node.replace_input_with(i, _dq(emit, plan.inputs[i].quantize(array), plan.inputs[i], value.name, value, node))
        counts["constants"] += 1
    if plan.kind is Kind.BINARY and node.op_type in ("Sub", "Div"):
        node.op_type = "Add" if node.op_type == "Sub" else "Mul"


def _pair(emit: Emitter, value: ir.Value, qp: QParams, first: ir.Node) -> None:
    """`value -> Q -> DQ`, every reader (and the graph output) moved to the DQ output."""
    scale, zero = emit.qparams(qp, value.name)
    producer = value.producer()
    where = {"after": producer} if producer is not None else {"before": first}
    q = emit.node("QuantizeLinear", [value, scale, zero], [(f"{value.name}_quantized", qp.ir_dtype, value.shape)],
                  **where)
    dq = emit.node("DequantizeLinear", [q.outputs[0], scale, zero],
                   [(f"{value.name}_dequantized", ir.DataType.FLOAT, value.shape)], after=q)
    for use in list(value.uses()):
        if use.node is not q:
            use.node.replace_input_with(use.idx, dq.outputs[0])
    if value.is_graph_output():
        emit.take_output(value, dq.outputs[0])
