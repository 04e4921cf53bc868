"""Integer-only lowering for ONNX Runtime's CPU kernels (QOperator format).

Reads the plan `quantize.static` annotated on each node (`_common.read_plan`) and replaces
every planned node by integer ops, in topological order, so activations stay 8-bit from
op to op:

1. MAC: Conv -> QLinearConv; Gemm, and MatMul with a constant B and a 2-D A -> QGemm
   (com.microsoft; float output when no output qparams were planned, i.e. nothing after
   it is quantized); other MatMuls -> QLinearMatMul. Weights become int8 (per channel),
   biases int32 at scale x_scale * w_scale, Gemm's alpha/beta are folded in.
2. BINARY: Add/Sub -> QLinearAdd, Mul/Div -> QLinearMul (com.microsoft); a constant
   operand is stored 8-bit (negated for Sub, inverted for Div).
3. CONCAT: Concat on 8-bit data when every input has the output's qparams, else
   QLinearConcat.
4. POOL: QLinearAveragePool / QLinearGlobalAveragePool; UNARY: QLinearSigmoid /
   QLinearLeakyRelu; SOFTMAX: QLinearSoftmax (all com.microsoft, channels first).
5. SAME: the op itself on the 8-bit tensor (its output keeps the input's qparams); a Pad
   value is quantized with them.
6. FOLD: a Relu/Clip whose bounds the input's qparams imply: no node, the output is the
   input's 8-bit tensor; CLAMP: one the output's qparams imply: QLinearLeakyRelu with
   alpha = 1 (a requantization, whose saturation is the clamp); RESCALE: Mul/Div by a
   positive scalar: no node, the input's bytes read at scale s * c.
7. LUT: a GatherElements lookup of an exact table (`lut.py`); a table applied to another
   table's only output is composed with it into one.
8. COMPOSITE: HardSigmoid(x) = QLinearAdd(x, beta / alpha) requantized to s_y / alpha and
   read at s_y; HardSwish(x) = QLinearMul(x, that HardSigmoid at scale 1/255);
   x sigmoid(alpha x) (SiLU, QuickGelu, Swish) = QLinearMul(x, QLinearSigmoid(x read at
   scale alpha * s)). Each rounding step is an 8-bit requantization: within one output
   step of the exact table, about 5x faster than a lookup in ORT.
9. A Conv whose input channels are not a multiple of 4 (an RGB stem: 3) gets zero weight
   channels and a Pad of its 8-bit input with the zero point: exact, and ORT then runs it
   in its ConvSym kernel, faster for kernels up to 5x5 (MobileNetV2 stem 0.92 -> 0.76 ms).

A float value feeding a planned node gets one QuantizeLinear (shared by all its 8-bit
readers); a lowered value read by a float node or a graph output gets one
DequantizeLinear (graph outputs keep their names). Shape/Size read the 8-bit tensor.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_ir as ir

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes.quantize import lut
from slimgraph.passes.quantize._common import (
    Emitter,
    NodePlan,
    copy_attributes,
    int32_bias,
    read_plan,
    same_qparams,
)
from slimgraph.passes.quantize._ops import (
    COMPOSITE_DEFAULTS,
    MS_DOMAIN,
    UNARY_QOPS,
    Kind,
    binary_constant,
    data_inputs,
    mac_bias,
    mac_weight,
    uses_qgemm,
)
from slimgraph.passes.quantize.qparams import QParams
from slimgraph.passes.rewrite import constant

logger = logging.getLogger("slimgraph.passes.quantize.lower_qoperator")

#: Readers of a tensor's shape only: they take the 8-bit tensor as it is.
SHAPE_READERS = frozenset({"Shape", "Size"})
#: MLAS's fastest QLinearConv path on x86 ("ConvSym": uint8 x symmetric int8, weights
#: packed once) takes input channels in multiples of 4, output channels in multiples of 8,
#: at least 16 of them.
CONV_SYM_INPUT_ALIGNMENT = 4
CONV_SYM_OUTPUT_ALIGNMENT = 8
CONV_SYM_MIN_OUTPUTS = 16
#: Padding pays up to 5x5 kernels (3x3 RGB stem 1.53 -> 1.26 ms, 5x5 6.3 -> 5.4 ms here);
#: a 7x7 RGB stem (ResNet) runs faster as the plain GEMM it is (9.2 vs 12.2 ms).
CONV_SYM_MAX_KERNEL = 25


def _channels_to_pad(node: ir.Node, weight: np.ndarray, wqp: QParams, xqp: QParams) -> int:
    """How many zero input channels make a Conv eligible for the ConvSym kernels (case 9)."""
    out_channels, in_channels = weight.shape[:2]
    if (node.op_type != "Conv" or node.attributes.get_int("group", 1) != 1 or weight.ndim != 4
            or xqp.dtype != "uint8" or wqp.dtype != "int8" or np.any(wqp.zero_point != 0)
            or out_channels % CONV_SYM_OUTPUT_ALIGNMENT or out_channels < CONV_SYM_MIN_OUTPUTS
            or np.prod(weight.shape[2:]) > CONV_SYM_MAX_KERNEL):
        return 0
    return -in_channels % CONV_SYM_INPUT_ALIGNMENT


def lower(model: Model, owner: str = "quantize.static") -> dict[str, int]:
    """Lower every planned node of `model` (in place); returns counts of what was emitted."""
    return _QOperator(model, owner).run()


class _QOperator:
    def __init__(self, model: Model, owner: str):
        self.model = model
        self.owner = owner
        self.emit = Emitter(model)
        self.qval: dict[ir.Value, ir.Value] = {}  # float value -> its 8-bit tensor
        self.qps: dict[ir.Value, QParams] = {}  # float value -> qparams of that tensor
        self.fval: dict[ir.Value, ir.Value] = {}  # float value -> float output of an integer op
        self.indices: dict = {}  # 8-bit tensor -> its lookup index (lut.emit's cache)
        self.padded: dict[tuple[ir.Value, int], ir.Value] = {}
        self.tables: dict[ir.Node, np.ndarray] = {}
        #: 8-bit output of a lookup -> (its table, the 8-bit tensor it looks up)
        self.lookups: dict[ir.Value, tuple[np.ndarray, ir.Value]] = {}
        self.counts: collections.Counter = collections.Counter()

    # -- the walk ---------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        graph = self.model.graph
        graph.sort()
        planned = [(node, plan) for node in list(graph) if (plan := read_plan(node)) is not None]
        specs = [lut.LutSpec(n, data_inputs(n, p.kind)[0], p.inputs[data_inputs(n, p.kind)[0]], p.outputs[0])
                 for n, p in planned if p.kind is Kind.LUT]
        self.tables = dict(zip((s.node for s in specs), lut.tables(self.model, specs)))
        handlers = {
            Kind.MAC: self._mac, Kind.BINARY: self._binary, Kind.CONCAT: self._concat,
            Kind.POOL: self._pool, Kind.UNARY: self._unary, Kind.SOFTMAX: self._softmax,
            Kind.SAME: self._same, Kind.FOLD: self._fold, Kind.LUT: self._lut, Kind.CLAMP: self._clamp,
            Kind.RESCALE: self._rescale, Kind.COMPOSITE: self._composite,
        }
        for node, plan in planned:
            if plan.kind not in handlers:
                raise PassError(self.owner, f"node {node.name!r} ({node.op_type}) has plan kind "
                                f"{plan.kind.value!r}, which this lowering does not take")
            handlers[plan.kind](node, plan)
        lowered = [node for node, _ in planned]
        self._reconnect(lowered)
        old_constants = [v for node in lowered for v in node.inputs if v is not None and v.is_initializer()]
        graph.remove(lowered, safe=True)
        self.emit.remove_unused_initializers(old_constants)
        self.counts["dead nodes removed"] = self.emit.remove_dead()
        graph.sort()
        self.counts["lowered"] = len(lowered)
        return dict(self.counts)

    # -- values -------------------------------------------------------------------------------
    def quantized(self, value: ir.Value, qp: QParams, at: ir.Node) -> ir.Value:
        """The 8-bit tensor of a float value, quantized before `at` on first need."""
        if value in self.qval:
            if not same_qparams(self.qps[value], qp):
                raise PassError(self.owner, f"tensor {value.name!r}: node {at.name!r} expects other qparams "
                                "than its producer's output (the annotations disagree; re-run quantize.static)")
            return self.qval[value]
        scale, zero = self.emit.qparams(qp, value.name)
        node = self.emit.node("QuantizeLinear", [self.fval.get(value, value), scale, zero],
                              [(f"{value.name}_quantized", qp.ir_dtype, value.shape)], before=at)
        self.counts["QuantizeLinear"] += 1
        self.qval[value], self.qps[value] = node.outputs[0], qp
        return node.outputs[0]

    def _weight(self, array: np.ndarray, qp: QParams, base: str) -> tuple[ir.Value, ir.Value, ir.Value]:
        scale, zero = self.emit.qparams(qp, base)
        return self.emit.constant(qp.quantize(array), f"{base}_quantized"), scale, zero

    def _result(self, node: ir.Node, index: int, value: ir.Value, qp: QParams) -> None:
        original = node.outputs[index]
        self.qval[original], self.qps[original] = value, qp

    def _op(self, node: ir.Node, op_type: str, inputs, qp: QParams | None, *, domain: str = "",
            attributes=(), index: int = 0) -> ir.Value:
        """Emit one integer op replacing `node`'s output `index`, quantized by `qp` (float when None)."""
        out = node.outputs[index]
        dtype = qp.ir_dtype if qp is not None else out.dtype
        new = self.emit.node(op_type, inputs, [(f"{out.name}_quantized" if qp else out.name, dtype, out.shape)],
                             domain=domain, attributes=attributes, source=node, before=node)
        self.counts[f"{domain}:{op_type}" if domain else op_type] += 1
        if qp is None:
            self.fval[out] = new.outputs[0]
        else:
            self._result(node, index, new.outputs[0], qp)
        return new.outputs[0]

    # -- handlers (cases of the module docstring) --------------------------------------------------
    def _mac(self, node: ir.Node, plan: NodePlan) -> None:  # case 1
        x = node.inputs[0]
        xqp, yqp = plan.inputs[0], plan.outputs.get(0)
        xq = self.quantized(x, xqp, node)
        xs, xz = self.emit.qparams(xqp, x.name)
        ys_yz = list(self.emit.qparams(yqp, node.outputs[0].name)) if yqp is not None else []
        if node.op_type == "MatMul" and constant(node.inputs[1]) is None:
            bqp = plan.inputs[1]
            bq = self.quantized(node.inputs[1], bqp, node)
            self._op(node, "QLinearMatMul", [xq, xs, xz, bq, *self.emit.qparams(bqp, node.inputs[1].name), *ys_yz], yqp)
            return
        wqp = plan.inputs[1]
        weight = mac_weight(node)
        extra = _channels_to_pad(node, weight, wqp, xqp)
        if extra:  # case 9
            weight = np.concatenate([weight, np.zeros((weight.shape[0], extra, *weight.shape[2:]), weight.dtype)], 1)
            xq = self._pad_channels(node, xq, xqp, extra)
        w, ws, wz = self._weight(weight, wqp, node.inputs[1].name)
        bias = mac_bias(node)
        b = None if bias is None else self.emit.constant(
            int32_bias(bias, xqp, wqp, f"node {node.name!r}", logger), f"{node.name}_bias_int32")
        if node.op_type == "Conv":
            self._op(node, "QLinearConv", [xq, xs, xz, w, ws, wz, *ys_yz, *([b] if b is not None else [])],
                     yqp, attributes=copy_attributes(node))
        elif uses_qgemm(node):
            trans_b = node.attributes.get_int("transB", 0) if node.op_type == "Gemm" else 0
            self._op(node, "QGemm", [xq, xs, xz, w, ws, wz, b, *ys_yz], yqp, domain=MS_DOMAIN,
                     attributes={"transB": trans_b})
        else:
            if yqp is None:
                raise PassError(self.owner, f"node {node.name!r}: QLinearMatMul needs output qparams")
            self._op(node, "QLinearMatMul", [xq, xs, xz, w, ws, wz, *ys_yz], yqp)

    def _pad_channels(self, node: ir.Node, xq: ir.Value, xqp: QParams, extra: int) -> ir.Value:
        """`xq` with `extra` more channels holding the zero point (so they add nothing)."""
        key = (xq, extra)
        if key not in self.padded:
            rank = len(node.inputs[1].shape)
            pads = np.zeros(2 * rank, np.int64)
            pads[rank + 1] = extra
            pad = self.emit.node("Pad", [xq, self.emit.constant(pads, f"{xq.name}_channel_pads"),
                                         self.emit.constant(xqp.zero_point, f"{xq.name}_zero_point")],
                                 [(f"{xq.name}_padded", xqp.ir_dtype, None)], source=node, before=node)
            self.padded[key] = pad.outputs[0]
            self.counts["channel pads"] += 1
        return self.padded[key]

    def _binary(self, node: ir.Node, plan: NodePlan) -> None:  # case 2
        operands = []
        for i in (0, 1):
            value, qp = node.inputs[i], plan.inputs[i]
            if constant(value) is None:
                q = self.quantized(value, qp, node)
            else:
                q = self.emit.constant(qp.quantize(binary_constant(node, i)), f"{value.name}_quantized")
            operands += [q, *self.emit.qparams(qp, value.name)]
        op = "QLinearAdd" if node.op_type in ("Add", "Sub") else "QLinearMul"
        yqp = plan.outputs[0]
        self._op(node, op, [*operands, *self.emit.qparams(yqp, node.outputs[0].name)], yqp, domain=MS_DOMAIN)

    def _concat(self, node: ir.Node, plan: NodePlan) -> None:  # case 3
        yqp = plan.outputs[0]
        parts = []
        for i, value in enumerate(node.inputs):
            qp = plan.inputs[i]
            array = constant(value)
            q = self.quantized(value, qp, node) if array is None else self.emit.constant(
                qp.quantize(array), f"{value.name}_quantized")
            parts.append((q, qp, value.name))
        axis = {"axis": node.attributes.get_int("axis", 0)}
        if all(same_qparams(qp, yqp) for _, qp, _ in parts):
            self._op(node, "Concat", [q for q, _, _ in parts], yqp, attributes=axis)
            return
        inputs = [*self.emit.qparams(yqp, node.outputs[0].name)]
        for q, qp, name in parts:
            inputs += [q, *self.emit.qparams(qp, name)]
        self._op(node, "QLinearConcat", inputs, yqp, domain=MS_DOMAIN, attributes=axis)

    def _single(self, node: ir.Node, plan: NodePlan, op_type: str, attributes) -> None:
        x = node.inputs[0]
        xqp, yqp = plan.inputs[0], plan.outputs[0]
        xq = self.quantized(x, xqp, node)
        inputs = [xq, *self.emit.qparams(xqp, x.name), *self.emit.qparams(yqp, node.outputs[0].name)]
        self._op(node, op_type, inputs, yqp, domain=MS_DOMAIN, attributes=attributes)

    def _pool(self, node: ir.Node, plan: NodePlan) -> None:  # case 4
        attributes = [*copy_attributes(node), ir.AttrInt64("channels_last", 0)]
        self._single(node, plan, f"QLinear{node.op_type}", attributes)

    def _unary(self, node: ir.Node, plan: NodePlan) -> None:  # case 4
        self._single(node, plan, UNARY_QOPS[node.op_type], copy_attributes(node))

    def _softmax(self, node: ir.Node, plan: NodePlan) -> None:  # case 4
        default_axis = -1 if self.model.opset >= 13 else 1
        attributes = {"axis": node.attributes.get_int("axis", default_axis), "opset": self.model.opset}
        self._single(node, plan, "QLinearSoftmax", attributes)

    def _same(self, node: ir.Node, plan: NodePlan) -> None:  # case 5
        data = data_inputs(node, Kind.SAME)
        qp = plan.inputs[data[0]]
        inputs = list(node.inputs)
        for i in data:
            inputs[i] = self.quantized(node.inputs[i], plan.inputs[i], node)
        if node.op_type == "Pad" and len(inputs) > 2 and inputs[2] is not None:
            pad_value = constant(node.inputs[2]).reshape(())
            inputs[2] = self.emit.constant(qp.quantize(pad_value), f"{node.inputs[2].name}_quantized")
        count = 1 if node.op_type == "MaxPool" else len(node.outputs)  # MaxPool's Indices are unused
        new = self.emit.node(
            node.op_type, inputs,
            [(f"{v.name}_quantized", plan.outputs[i].ir_dtype, v.shape) for i, v in enumerate(node.outputs[:count])],
            domain=node.domain, attributes=copy_attributes(node), source=node, before=node)
        self.counts[node.op_type] += 1
        for i in range(count):
            self._result(node, i, new.outputs[i], plan.outputs[i])

    def _fold(self, node: ir.Node, plan: NodePlan) -> None:  # case 6
        xq = self.quantized(node.inputs[0], plan.inputs[0], node)
        self.qval[node.outputs[0]], self.qps[node.outputs[0]] = xq, plan.inputs[0]
        self.counts["folded clamps"] += 1

    def _clamp(self, node: ir.Node, plan: NodePlan) -> None:  # case 6
        """Requantize to the output range, which implies the bounds (saturation clamps)."""
        self._single(node, plan, "QLinearLeakyRelu", {"alpha": 1.0})

    def _rescale(self, node: ir.Node, plan: NodePlan) -> None:  # case 6
        i = data_inputs(node, Kind.RESCALE)[0]
        xq = self.quantized(node.inputs[i], plan.inputs[i], node)
        self.qval[node.outputs[0]], self.qps[node.outputs[0]] = xq, plan.outputs[0]
        self.counts["rescaled"] += 1

    def _composite(self, node: ir.Node, plan: NodePlan) -> None:  # case 8
        x, out = node.inputs[0], node.outputs[0]
        xqp, yqp = plan.inputs[0], plan.outputs[0]
        xq = self.quantized(x, xqp, node)
        op = node.op_type
        if op == "HardSigmoid":
            alpha = node.attributes.get_float("alpha", COMPOSITE_DEFAULTS[op])
            beta = node.attributes.get_float("beta", 0.5)
            self._result(node, 0, self._hard_sigmoid(node, xq, xqp, alpha, beta, yqp), yqp)
            return
        unit = QParams.from_range(0.0, 1.0, dtype=yqp.dtype)
        if op == "HardSwish":
            gate = self._hard_sigmoid(node, xq, xqp, 1.0 / 6.0, 0.5, unit)
        else:  # x sigmoid(alpha x): QLinearSigmoid reads x at scale alpha * s
            alpha = node.attributes.get_float("alpha", COMPOSITE_DEFAULTS[op])
            scaled = QParams(xqp.scale * np.float32(alpha), xqp.zero_point, xqp.dtype)
            gate = self.emit.node(
                "QLinearSigmoid", [xq, *self.emit.qparams(scaled, f"{x.name}_scaled"),
                                   *self.emit.qparams(unit, f"{out.name}_gate")],
                [(f"{out.name}_gate", unit.ir_dtype, x.shape)], domain=MS_DOMAIN, source=node, before=node).outputs[0]
            self.counts["com.microsoft:QLinearSigmoid"] += 1
        inputs = [xq, *self.emit.qparams(xqp, x.name), gate, *self.emit.qparams(unit, f"{out.name}_gate"),
                  *self.emit.qparams(yqp, out.name)]
        self._op(node, "QLinearMul", inputs, yqp, domain=MS_DOMAIN)

    def _hard_sigmoid(self, node: ir.Node, xq: ir.Value, xqp: QParams, alpha: float, beta: float,
                      yqp: QParams) -> ir.Value:
        """clip(alpha x + beta, 0, 1) at `yqp`: x + beta / alpha requantized to scale
        s_y / alpha (its saturation is the clip), then read at s_y."""
        shift = np.float32(beta / alpha)
        cqp = QParams.from_range(min(float(shift), 0.0), max(float(shift), 0.0), dtype=xqp.dtype)
        c = self.emit.constant(cqp.quantize(shift), f"{node.name}_shift")
        tqp = QParams(yqp.scale / np.float32(alpha), yqp.zero_point, yqp.dtype)
        inputs = [xq, *self.emit.qparams(xqp, node.inputs[0].name), c, *self.emit.qparams(cqp, f"{node.name}_shift"),
                  *self.emit.qparams(tqp, f"{node.outputs[0].name}_shifted")]
        added = self.emit.node("QLinearAdd", inputs, [(f"{node.outputs[0].name}_hard_sigmoid", yqp.ir_dtype,
                                                       node.inputs[0].shape)],
                               domain=MS_DOMAIN, source=node, before=node)
        self.counts["com.microsoft:QLinearAdd"] += 1
        return added.outputs[0]

    def _lut(self, node: ir.Node, plan: NodePlan) -> None:  # case 7
        i = data_inputs(node, Kind.LUT)[0]
        x = node.inputs[i]
        xq = self.quantized(x, plan.inputs[i], node)
        table = self.tables[node]
        if xq in self.lookups and len(x.uses()) == 1 and not x.is_graph_output():
            first, xq = self.lookups[xq]  # a table of a table: one lookup (the first one goes dead)
            table = lut.compose(first, table)
            self.counts["tables composed"] += 1
        out = lut.emit(self.emit, node, xq, table, node.outputs[0], self.indices)
        self.lookups[out] = (table, xq)
        self.qval[node.outputs[0]], self.qps[node.outputs[0]] = out, plan.outputs[0]
        self.counts["tables"] += 1

    # -- back to float where needed -----------------------------------------------------------------
    def _reconnect(self, lowered: list[ir.Node]) -> None:
        """Give float readers and graph outputs of lowered values a float tensor again."""
        gone = set(lowered)
        for node in lowered:
            for value in node.outputs:
                uses = [u for u in value.uses() if u.node not in gone]
                if not uses and not value.is_graph_output():
                    continue
                replacement = self.fval.get(value)
                if replacement is None and value in self.qval:
                    for use in [u for u in uses if u.node.op_type in SHAPE_READERS and not u.node.domain]:
                        use.node.replace_input_with(use.idx, self.qval[value])
                        uses.remove(use)
                    if not uses and not value.is_graph_output():
                        continue
                    replacement = self._dequantize(value)
                if replacement is None:
                    raise PassError(self.owner, f"output {value.name!r} of node {node.name!r} is read "
                                    "but was not lowered")
                for use in uses:
                    use.node.replace_input_with(use.idx, replacement)
                if value.is_graph_output():
                    self.emit.take_output(value, replacement)

    def _dequantize(self, value: ir.Value) -> ir.Value:
        q, qp = self.qval[value], self.qps[value]
        scale, zero = self.emit.qparams(qp, value.name)
        producer = q.producer()
        node = self.emit.node("DequantizeLinear", [q, scale, zero],
                              [(f"{value.name}_dequantized", value.dtype, value.shape)], after=producer)
        self.counts["DequantizeLinear"] += 1
        return node.outputs[0]
