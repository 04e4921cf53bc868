"""quantize.static: post-training static quantization, lowered to integer kernels (lossy).

What it does, in order:

1. **Select** (`_ops.classify`, one table): each node of the main graph gets a kind (MAC,
   BINARY, CONCAT, POOL, UNARY, SOFTMAX, SAME, CLAMP, RESCALE, COMPOSITE, LUT) or a
   reason to stay float (no integer kernel, weight not constant, excluded, not float32).
   MACs (Conv, Gemm, MatMul) are always quantized; the other ops only where an input
   already is 8-bit (no QuantizeLinear is spent on them), and the rounding ones not at a
   dead end (read only by float nodes or as a graph output: the 8-bit result would be
   dequantized at once, one rounding more for nothing; a hand-built LayerNorm's x * x
   feeding a float ReduceSum is the classic case). `exclude` (fnmatch patterns of node
   names, op types or torch module paths), `op_types` and the `quantize.skip` annotations
   of `quantize.mixed_precision` narrow the selection. Nodes of `If`/`Loop` bodies are
   not quantized.
2. **Calibrate** the float tensors around the selected nodes on the context data
   (`observers.calibrate`, streaming, `calibration` method, first `samples` samples).
3. **Choose qparams** (`qparams.QParams`): activations `activation_dtype` (uint8,
   asymmetric by default), weights `weight_dtype` (int8, symmetric, per output channel by
   default) with `weight_bits` bits; then
   - a tensor read only by a Relu/Clip takes the clamp's output range, so the clamp is
     implied by the 8-bit range and disappears (FOLD: zero point at 0 for Relu);
   - a tensor read only by a Concat takes the Concat's range, so the Concat copies bytes;
   - data-movement ops (MaxPool, Reshape, Transpose, Slice, Pad, ...) keep their input's
     qparams and run on 8-bit data; Mul/Div by a positive scalar only rescales them;
   - a Relu/Clip whose input range does not imply it is a requantization to its output
     range when that range implies it, else a lookup table.
   The result is **recorded as annotations** on each node (`quantize` = kind,
   `qparams.input.<i>` / `qparams.output.<i>`), the contract with the lowerings.
4. **Lower**: `format=qoperator` (default) -> `lower_qoperator` (QLinearConv, QGemm,
   QLinearAdd, ..., 8-bit movement ops, QLinear recipes for HardSwish/HardSigmoid/SiLU,
   exact 256-entry tables for every other elementwise function); `format=qdq` ->
   `lower_qdq` (QuantizeLinear/DequantizeLinear pairs around the same ops with the same
   parameters, for runtimes that fuse QDQ). Nodes that stay float between 8-bit tensors
   are listed in a WARNING (and in the `float_nodes` statistic).

**u8s8 saturation without VNNI** (`weight_bits="auto"`, the default). ORT's x86 kernels
for uint8 x int8 add pairs of products in a saturating int16 (`pmaddubsw`) unless the
CPU has VNNI: with activations near 255 and 8-bit weights near 127, 2 * 255 * 127 = 64770
overflows 32767 and the layer's output is silently wrong (see `_cpu.py`). Strategy:
when the pass runs on an x86 CPU without `avx512_vnni`/`avx_vnni` (and `ctx.target` is
the CPU), int8 weights of every Conv/Gemm/MatMul that runs in the u8s8 GEMM get **7
bits** (-63..63): 2 * 255 * 63 = 32130 <= 32767, so no pair can saturate, whatever the
data. Depthwise convolutions keep 8 bits (their kernel widens first), and so do uint8
weights (u8u8 kernels widen; they are 1.2-1.8x slower here, which is why they are not
the default). Per-channel scales keep the 7-bit error small. Per-layer detection from
calibrated ranges cannot help: symmetric per-channel 8-bit weights always reach +-127,
and asymmetric activations always reach 255. Set `weight_bits: 8` for a model that
will run on a VNNI CPU or a GPU; 7 for one built on a VNNI machine for older CPUs.

Lossy: the error is the quantization error (about one step of each tensor's scale per
op); the manager measures and reports it.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from slimgraph import data as sgdata
from slimgraph.backends.op_kinds import OpKind, op_kind
from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes.base import (
    Pass,
    PassConfig,
    PassContext,
    PassResult,
    choice,
    float_range,
    int_range,
    register_pass,
)
from slimgraph.passes.quantize import lower_qdq, lower_qoperator
from slimgraph.passes.quantize._common import NodePlan, clear_plan, weight_axis, write_plan
from slimgraph.passes.quantize._cpu import auto_weight_bits, u8s8_saturates
from slimgraph.passes.quantize._ops import (
    Kind,
    binary_constant,
    classify,
    clip_bounds,
    data_inputs,
    mac_weight,
    rescale_factor,
    uses_qgemm,
)
from slimgraph.passes.quantize.mixed_precision import SKIP_KEY
from slimgraph.passes.quantize.qparams import QParams
from slimgraph.passes.rewrite import constant

logger = logging.getLogger("slimgraph.passes.quantize.static")

MAC_OPS = ("Conv", "Gemm", "MatMul")
#: QOperator: QLinearConv arrives in opset 10, GatherElements and Pad with its pads as inputs
#: in 11; QDQ: per-channel DequantizeLinear (axis) in 13.
MIN_OPSET = {"qoperator": 11, "qdq": 13}
#: Kinds that round once more; not worth it at a dead end (only float readers): the
#: result would be dequantized right away, with the extra error and no integer op gained.
#: (Not CLAMP: it mostly folds into its producer's range, free and more precise.)
ROUNDING_KINDS = frozenset({Kind.BINARY, Kind.CONCAT, Kind.POOL, Kind.UNARY, Kind.SOFTMAX, Kind.LUT,
                            Kind.COMPOSITE})


@dataclasses.dataclass
class Selection:
    """Step 1: the kind of each selected node, and why each other node stays float."""

    kinds: dict[ir.Node, Kind]
    reasons: dict[ir.Node, str]

    def islands(self) -> list[tuple[ir.Node, str]]:
        """Float nodes between 8-bit tensors, with why: nodes that could not be quantized on
        a float path from an 8-bit tensor (dequantized for them) back into a selected node
        (quantized again after them)."""
        produced = {v for n in self.kinds for v in n.outputs}
        leads_back: dict[ir.Node, bool] = {}

        def returns(node: ir.Node) -> bool:  # a selected node is reachable through float nodes
            if node not in leads_back:
                leads_back[node] = False  # (a DAG: no cycles, this only guards re-entry)
                leads_back[node] = any(
                    u.node in self.kinds or returns(u.node) for v in node.outputs for u in v.uses())
            return leads_back[node]

        starts = [n for n in self.reasons if op_kind(n.op_type, n.domain) is not OpKind.SHAPE
                  and any(v in produced for v in n.inputs if v is not None)]  # (Shape reads 8-bit)
        between: set[ir.Node] = set()
        stack = [n for n in starts if returns(n)]
        while stack:
            node = stack.pop()
            if node in between:
                continue
            between.add(node)
            stack += [u.node for v in node.outputs if v.dtype == ir.DataType.FLOAT for u in v.uses()
                      if u.node not in self.kinds and returns(u.node)]
        return [(n, r) for n, r in self.reasons.items() if n in between]

def _matches(node: ir.Node, patterns: tuple[str, ...]) -> str | None:
    path = Model.provenance(node) or ""
    for pattern in patterns:
        if fnmatch.fnmatchcase(node.name or "", pattern) or fnmatch.fnmatchcase(node.op_type, pattern) or (
                path and fnmatch.fnmatchcase(path, pattern)):
            return pattern
    return None


def select(model: Model, exclude: tuple[str, ...] = (), op_types: tuple[str, ...] | None = None) -> Selection:
    """Step 1 (see module docstring). The graph must be topologically sorted."""
    kinds: dict[ir.Node, Kind] = {}
    reasons: dict[ir.Node, str] = {}
    available: set[ir.Value] = set()  # float tensors that will exist in 8-bit
    for node in model.graph:
        kind = classify(node)
        if not isinstance(kind, Kind):
            reasons[node] = kind
            continue
        if (pattern := _matches(node, exclude)) is not None:
            reasons[node] = f"excluded by {pattern!r}"
            continue
        if Model.annotation(node, SKIP_KEY) is True:
            reasons[node] = "kept in float by quantize.mixed_precision"
            continue
        if op_types is not None and node.op_type not in op_types:
            reasons[node] = "its op type is not in op_types"
            continue
        if not kind.heavy and not any(node.inputs[i] in available for i in data_inputs(node, kind)):
            continue  # its input arrives in float: quantizing it would only add a QuantizeLinear
        kinds[node] = kind
        available.update(v for v in node.outputs if v.dtype == ir.DataType.FLOAT)
    for node in reversed(list(model.graph)):  # dead ends, last first: a chain of them goes
        if kinds.get(node) in ROUNDING_KINDS and not any(u.node in kinds for v in node.outputs for u in v.uses()):
            del kinds[node]
    return Selection(kinds, reasons)


def calibration_tensors(selection: Selection) -> list[str]:
    """Every float activation read or written by a selected node."""
    names: dict[str, None] = {}
    for node, kind in selection.kinds.items():
        for i in data_inputs(node, kind):
            names[node.inputs[i].name] = None
        for v in node.outputs:
            if v.dtype == ir.DataType.FLOAT and (v.uses() or v.is_graph_output()):
                names[v.name] = None
    return list(names)


def implies(qp: QParams, low: float, high: float) -> bool:
    """Whether every value `qp` can represent lies within [low, high] (half a step of slack:
    the clamp then changes nothing beyond rounding)."""
    qmin, qmax = qp.qmin_qmax
    scale, zero = float(qp.scale), int(qp.zero_point)
    return (qmin - zero) * scale >= low - scale / 2 and (qmax - zero) * scale <= high + scale / 2


class _Planner:
    """Step 3 for one run: ranges -> qparams -> a NodePlan per selected node."""

    def __init__(self, selection: Selection, ranges: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 config: StaticQuantize.Config, saturating_cpu: bool):
        self.kinds = selection.kinds
        self.ranges = ranges
        self.config = config
        self.saturating_cpu = saturating_cpu
        self.qp: dict[ir.Value, QParams] = {}
        self.bits: collections.Counter = collections.Counter()
        self._ranges: dict[ir.Value, tuple[float, float]] = {}

    def _free(self, value: ir.Value) -> bool:
        """Whether a tensor's qparams may be chosen (its producer requantizes, or it is
        quantized from float by a QuantizeLinear)."""
        producer = value.producer()
        return producer is None or producer not in self.kinds or self.kinds[producer].requantizes

    def range_of(self, value: ir.Value) -> tuple[float, float]:
        """The calibrated range of a tensor, or of the clamp / Concat it feeds (see module docstring)."""
        if value not in self._ranges:
            self._ranges[value] = self._range(value)
        return self._ranges[value]

    def _range(self, value: ir.Value) -> tuple[float, float]:
        readers = [u.node for u in value.uses()]
        if readers and not value.is_graph_output() and self._free(value):
            if all(self.kinds.get(r) is Kind.CLAMP for r in readers):
                bounds = {clip_bounds(r) for r in readers}
                if len(bounds) == 1:
                    (low, high), = bounds
                    lo, hi = self.range_of(readers[0].outputs[0])
                    return max(lo, low), min(hi, high)
            if len(readers) == 1 and self.kinds.get(readers[0]) is Kind.CONCAT:
                return self.range_of(readers[0].outputs[0])
        if value.name not in self.ranges:
            raise PassError(StaticQuantize.name, f"calibration returned no range for tensor {value.name!r}")
        low, high = self.ranges[value.name]
        return float(np.min(low)), float(np.max(high))

    def activation(self, value: ir.Value) -> QParams:
        low, high = self.range_of(value)
        return QParams.from_range(low, high, dtype=self.config.activation_dtype,
                                  symmetric=self.config.activation_symmetric)

    def constant_qparams(self, array: np.ndarray) -> QParams:
        return QParams.from_range(float(array.min()), float(array.max()), dtype=self.config.activation_dtype,
                                  symmetric=self.config.activation_symmetric)

    def weight_bits(self, node: ir.Node) -> int:
        setting = self.config.weight_bits
        if setting != "auto":
            return int(setting)
        if not self.saturating_cpu:
            return 8
        return auto_weight_bits(node, weight_dtype=self.config.weight_dtype)

    def weight(self, node: ir.Node) -> QParams:
        w = mac_weight(node)
        bits = self.weight_bits(node)
        self.bits[bits] += 1
        dtype = self.config.weight_dtype
        if not self.config.per_channel:
            return QParams.from_range(float(w.min()), float(w.max()), dtype=dtype, symmetric=True, bits=bits)
        axis = weight_axis(node)
        others = tuple(a for a in range(w.ndim) if a != axis)
        return QParams.from_range(w.min(axis=others), w.max(axis=others), dtype=dtype, symmetric=True,
                                  bits=bits, axis=axis)

    def plan(self, node: ir.Node) -> NodePlan:
        kind = self.kinds[node]
        inputs: dict[int, QParams] = {}
        for i in data_inputs(node, kind):
            value = node.inputs[i]
            if value not in self.qp:
                self.qp[value] = self.activation(value)
            inputs[i] = self.qp[value]
        outputs: dict[int, QParams] = {}
        out = node.outputs[0]
        if kind is Kind.MAC:
            if constant(node.inputs[1]) is not None:
                inputs[1] = self.weight(node)
            read_8bit = any(u.node in self.kinds for u in out.uses())
            if read_8bit or not uses_qgemm(node):
                outputs[0] = self.activation(out)
        elif kind is Kind.BINARY:
            for i in (0, 1):
                if i not in inputs:
                    inputs[i] = self.constant_qparams(binary_constant(node, i))
            outputs[0] = self.activation(out)
        elif kind is Kind.CONCAT:
            outputs[0] = self.activation(out)
            for i in range(len(node.inputs)):
                inputs.setdefault(i, outputs[0])
        elif kind is Kind.SAME:
            count = 1 if node.op_type == "MaxPool" else len(node.outputs)
            for j in range(count):
                outputs[j] = inputs[data_inputs(node, kind)[0]]
        elif kind is Kind.CLAMP:
            low, high = clip_bounds(node)
            if implies(inputs[0], low, high):
                kind, outputs[0] = Kind.FOLD, inputs[0]
            else:
                outputs[0] = self.activation(out)
                kind = Kind.CLAMP if implies(outputs[0], low, high) else Kind.LUT
        elif kind is Kind.RESCALE:
            qp = inputs[data_inputs(node, kind)[0]]
            outputs[0] = QParams((qp.scale * np.float32(rescale_factor(node))).astype(np.float32),
                                 qp.zero_point, qp.dtype, qp.axis, qp.bits)
        else:  # POOL, UNARY, SOFTMAX, LUT, COMPOSITE
            outputs[0] = self.activation(out)
        for j, qp in outputs.items():
            self.qp[node.outputs[j]] = qp
        return NodePlan(kind, inputs, outputs)


@register_pass
class StaticQuantize(Pass):
    """Static int8 quantization: calibrate, annotate qparams, lower to integer kernels (lossy).

    See the module docstring for the steps, the qparams rules and the u8s8 saturation
    strategy (`weight_bits="auto"`: 7-bit weights on x86 CPUs without VNNI).
    """

    name = "quantize.static"
    exact = False
    requires = ("data",)
    after = ("fold_batchnorm", "fuse_*", "prune.*", "cluster.*", "upgrade_opset")
    version = 1

    class Config(PassConfig):
        #: calibration method of `observers.calibrate`
        calibration: str = choice("minmax", "percentile", "entropy", "mse", default="minmax")
        #: percentile kept by `calibration: percentile`
        percentile: float = float_range(99.0, 100.0, default=99.99)
        #: calibration samples taken from the data (the first ones)
        samples: int = int_range(1, 100_000, default=256, log=True)
        #: one weight scale per output channel (else one per tensor)
        per_channel: bool = choice(True, False, default=True)
        activation_dtype: str = choice("uint8", "int8", default="uint8")
        activation_symmetric: bool = choice(False, True, default=False)
        weight_dtype: str = choice("int8", "uint8", default="int8")
        #: "auto": 7 on x86 CPUs without VNNI for kernels that would saturate, else 8; 4: 4-bit
        #: values in int8 containers (what train.qat with bits=4 trains for)
        weight_bits: str | int = choice("auto", 4, 7, 8, default="auto")
        format: str = choice("qoperator", "qdq", default="qoperator")
        #: op types to quantize (None: every op slimgraph can lower)
        op_types: tuple[str, ...] | None = None
        #: fnmatch patterns of node names, op types or torch module paths kept in float
        exclude: tuple[str, ...] = ()

    def plan(self, model: Model, ctx: PassContext) -> dict | None:
        """Steps 1-3: select, calibrate and annotate the plan on the nodes (no lowering).
        Returns statistics, or None when nothing in the model can be quantized."""
        cfg = self.config
        if not ctx.data:
            raise PassError(self.name, "needs calibration data (--data D.npz)")
        needed = MIN_OPSET[cfg.format]
        if model.opset < needed:
            raise PassError(self.name, f"format {cfg.format!r} needs opset >= {needed} (the model has "
                            f"{model.opset}); run upgrade_opset first, as the int8 recipes do")
        data = sgdata.check(ctx.data, model, where="calibration data")
        n = min(cfg.samples, sgdata.count(data))
        data = {k: a[:n] for k, a in data.items()}
        _infer_shapes(model)
        model.graph.sort()
        for node in model.graph:
            clear_plan(node)
        selection = select(model, cfg.exclude, cfg.op_types)
        if not any(kind is not Kind.SAME for kind in selection.kinds.values()):
            reasons = collections.Counter(selection.reasons.values()).most_common(3)
            logger.warning("%s: nothing to quantize in this model (%s); it stays float", self.name,
                           "; ".join(f"{r} ({k} nodes)" for r, k in reasons) or "no nodes")
            return None
        from slimgraph.passes.quantize.observers import calibrate

        ranges = calibrate(model, data, calibration_tensors(selection), method=cfg.calibration,
                           percentile=cfg.percentile, symmetric=cfg.activation_symmetric,
                           progress=ctx.progress)
        planner = _Planner(selection, ranges, cfg, saturating_cpu=ctx.target == "cpu" and u8s8_saturates())
        kinds = collections.Counter()
        for node in selection.kinds:
            plan = planner.plan(node)
            write_plan(node, plan)
            kinds[plan.kind.value] += 1
        islands = selection.islands()
        if islands:
            logger.warning(
                "%s: %d node(s) stay float between 8-bit tensors (DequantizeLinear/QuantizeLinear around them): %s",
                self.name, len(islands), "; ".join(f"{n.name or '?'} ({n.op_type}: {r})" for n, r in islands))
        return {
            "calibration": cfg.calibration, "samples": n, "quantized": len(selection.kinds),
            "kinds": dict(kinds), "float_nodes": [f"{n.name} ({n.op_type})" for n, _ in islands],
            "weight_bits": dict(planner.bits), "integer_mac_fraction": _mac_coverage(model, selection),
        }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        stats = self.plan(model, ctx)
        if stats is None:
            return PassResult(model, modified=False, stats={"quantized": 0})
        lowering = lower_qdq.lower if self.config.format == "qdq" else lower_qoperator.lower
        stats["emitted"] = lowering(model, owner=self.name)
        stats["format"] = self.config.format
        return PassResult(model, modified=True, stats=stats)


def _infer_shapes(model: Model) -> None:
    """Element types decide what can be quantized: make sure every value has one."""
    from slimgraph.passes.cleanup.infer_shapes import InferShapes

    missing = any(v.dtype is None for n in model.graph for v in n.outputs)
    if missing:
        InferShapes()(model)


def _mac_coverage(model: Model, selection: Selection) -> float:
    """Fraction of the Conv/Gemm/MatMul multiply-accumulates in selected nodes."""
    macs = model.analysis("macs")  # keyed by node name, or op_index for unnamed nodes
    keys = {node: node.name or f"{node.op_type}_{i}" for i, node in enumerate(model.nodes(recursive=True))}
    mac_nodes = [n for n in model.graph if n.op_type in MAC_OPS]
    total = sum(macs.get(keys[n], 0) for n in mac_nodes)
    done = sum(macs.get(keys[n], 0) for n in mac_nodes if selection.kinds.get(n) is Kind.MAC)
    return round(done / total, 6) if total else (1.0 if not mac_nodes else 0.0)
