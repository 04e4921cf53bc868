"""The runtime check: what ONNX Runtime really executes for a (quantized) model, where it
falls back to float and why, and which known ORT pitfalls apply, said before running.

1. `cpu_info()`: the architecture and the /proc/cpuinfo flags that decide which integer
   kernels ORT's MLAS picks (VNNI: `avx512_vnni`, `avx_vnni`, `amx_int8`/`amx_tile`).
2. `pitfalls(report)`: warnings read from the graph ORT will execute (its optimized graph;
   no inference run), each derived from the graph and the weights, not from the op name:
   a. S8S8 QOperator on x86: an int8-activation x int8-weight QLinearConv / QLinearMatMul /
      QGemm / MatMulInteger. ORT's x86 s8s8 kernels have no `vpmaddubsw`/VNNI path
      (measured here: a 64-channel 3x3 QLinearConv ran 7x slower than as u8s8).
   b. u8s8 saturation without VNNI: AVX2 kernels multiply uint8 activations by int8 weights
      with `vpmaddubsw`, which adds each adjacent pair of products along the reduction axis
      K into a saturating int16. For each such kernel the worst pair sum over the weights
      in the kernel's K order (NHWC: kh, kw, ci for QLinearConv; rows of B for MatMul/Gemm)
      and the activation range (the dtype's full range, or observed on `data`) is compared
      with 32767. Depthwise QLinearConv and ConvInteger widen to 16 bits first (measured
      exact) and are not checked.
   c. ConvInteger with int8 weights: ORT runs it as a generic im2col + GEMM with a float
      rescale after it, without the pre-packed / NCHWc kernels float Conv gets.
3. `check_runtime(model)`: the pitfalls first (through `on_warning`, before any run), then
   `ort.runtime_report` with a profiling run, and a `RuntimeCheck`: per node the kernel,
   provider, kind, input dtypes, share of profiled time and MACs; every float island with
   the reason for each of its nodes, read from the graph around it (`_node_cause`); the
   share of Conv/Gemm/MatMul MACs in integer kernels; the QuantizeLinear /
   DequantizeLinear nodes at the model's inputs and outputs.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import math
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from slimgraph import data as sg_data
from slimgraph.backends import ort
from slimgraph.backends.op_kinds import OpKind, base_op, integer_kernels, op_kind, signature

logger = logging.getLogger("slimgraph.backends.runtime_check")

INT16_MAX = 32767
INT16_MIN = -32768
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}
_DTYPE_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}
_OBSERVE_SAMPLES = 64


# --- the CPU ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CpuInfo:
    arch: str
    #: the /proc/cpuinfo flags (empty where that file does not exist)
    flags: frozenset[str] = frozenset()
    model: str = ""

    @property
    def x86(self) -> bool:
        return self.arch.lower() in _X86

    @property
    def vnni(self) -> bool | None:
        """True/False from the flags; None when they could not be read."""
        if not self.flags:
            return None
        return any(f in self.flags for f in _VNNI_FLAGS)

    def as_dict(self) -> dict:
        return {"arch": self.arch, "model": self.model, "x86": self.x86, "vnni": self.vnni,
                "vnni_flags": sorted(f for f in self.flags if f in _VNNI_FLAGS)}


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """This machine's architecture and CPU flags (Linux: from `cpuinfo`)."""
    arch = platform.machine() or "unknown"
    flags: set[str] = set()
    model = ""
    try:
        text = Path(cpuinfo).read_text()
    except OSError as e:
        logger.info("cannot read %s (%s): VNNI support unknown", cpuinfo, e)
        return CpuInfo(arch)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return CpuInfo(arch, frozenset(flags), model)


# --- the report's types -------------------------------------------------------------------------
class PitfallKind(str, enum.Enum):
    S8S8_X86 = "s8s8-on-x86"
    U8S8_SATURATION = "u8s8-saturation"
    CONVINTEGER_INT8 = "convinteger-int8-weights"


@dataclasses.dataclass
class Pitfall:
    kind: PitfallKind
    message: str
    nodes: list[str]
    #: per node: what the check computed (worst pair sum, activation range, ...)
    details: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"kind": self.kind.value, "message": self.message, "nodes": self.nodes, "details": self.details}


class Cause(str, enum.Enum):
    """Why a node of a float island runs in float (see `_node_cause`)."""

    NO_INTEGER_KERNEL = "no integer kernel for this op"
    TYPE_COMBINATION = "type combination has no kernel"
    UNFUSED_QDQ = "unfused QDQ pattern"
    DQ_TO_FLOAT = "DequantizeLinear feeding a float op"
    FLOAT_INPUT = "float input"
    FLOAT_RESULT = "float result of an integer kernel"
    FOLLOWS = "follows a float node"


@dataclasses.dataclass
class NodeCause:
    node: str
    op: str
    cause: Cause
    reason: str

    def as_dict(self) -> dict:
        return {"node": self.node, "op": self.op, "cause": self.cause.value, "reason": self.reason}


@dataclasses.dataclass
class Island:
    """Connected float nodes of ORT's optimized main graph."""

    nodes: list[str]
    ops: list[str]
    time_share: float | None
    macs: int
    #: one entry per node; FOLLOWS entries are explained by another node of the island
    causes: list[NodeCause]

    @property
    def reasons(self) -> list[str]:
        """The island's root reasons, one line each, without repeats."""
        roots = [c for c in self.causes if c.cause is not Cause.FOLLOWS] or self.causes
        return list(dict.fromkeys(c.reason for c in roots))

    def as_dict(self) -> dict:
        return {"nodes": self.nodes, "ops": self.ops, "time_share": self.time_share, "macs": self.macs,
                "reasons": self.reasons, "causes": [c.as_dict() for c in self.causes]}


@dataclasses.dataclass
class NodeRow:
    name: str
    op: str
    domain: str
    provider: str | None
    kind: OpKind
    input_dtypes: tuple[str | None, ...]
    time_us: float | None
    time_share: float | None
    macs: int

    @property
    def qualified_op(self) -> str:
        return f"{self.domain}:{self.op}" if self.domain else self.op

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kind"] = self.kind.value
        return d


@dataclasses.dataclass
class RuntimeCheck:
    """What `check_runtime` found (see the module docstring)."""

    source: str
    provider: str
    cpu: CpuInfo
    pitfalls: list[Pitfall]
    nodes: list[NodeRow]
    islands: list[Island]
    #: MACs of Conv/Gemm/MatMul-like kernels, by kind of kernel that ran them
    integer_macs: int
    float_macs: int
    #: nodes that quantize float activations (QuantizeLinear, DynamicQuantizeLinear, an
    #: integer kernel with a float input such as DynamicQuantizeMatMul), and those reading
    #: a model input
    quantize_nodes: int
    quantize_at_inputs: int
    #: nodes that dequantize activations (DequantizeLinear of non-constants, an integer
    #: kernel with a float output such as QGemm without output zero point or
    #: MatMulIntegerToFloat), and those writing a model output
    dequantize_nodes: int
    dequantize_at_outputs: int
    report: ort.RuntimeReport = dataclasses.field(repr=False)

    @property
    def integer_mac_share(self) -> float | None:
        total = self.integer_macs + self.float_macs
        return self.integer_macs / total if total else None

    def as_dict(self) -> dict:
        return {
            "source": self.source, "provider": self.provider, "cpu": self.cpu.as_dict(),
            "pitfalls": [p.as_dict() for p in self.pitfalls],
            "nodes": [n.as_dict() for n in self.nodes],
            "float_islands": [i.as_dict() for i in self.islands],
            "integer_macs": self.integer_macs, "float_macs": self.float_macs,
            "integer_mac_share": self.integer_mac_share,
            "quantize_nodes": self.quantize_nodes, "quantize_at_inputs": self.quantize_at_inputs,
            "dequantize_nodes": self.dequantize_nodes, "dequantize_at_outputs": self.dequantize_at_outputs,
        }


# --- the optimized graph, indexed -----------------------------------------------------------------
class _Graph:
    """Producers, consumers, constants and dtypes of ORT's optimized main graph."""

    def __init__(self, report: ort.RuntimeReport):
        proto = report.optimized_model.graph
        self.nodes = [n for n in report.nodes if not n.graph]
        self.by_name = {n.name: n for n in self.nodes}
        self.producer = {v: n for n in self.nodes for v in n.outputs if v}
        self.consumers: dict[str, list[ort.RuntimeNode]] = collections.defaultdict(list)
        for n in self.nodes:
            for v in n.inputs:
                if v:
                    self.consumers[v].append(n)
        self.proto_nodes: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for i, n in enumerate(proto.node):
            self.proto_nodes[n.name or f"{n.op_type}_{i}"].append(n)
        self.initializers = {t.name: t for t in proto.initializer}
        self.graph_inputs = {v.name for v in proto.input} - set(self.initializers)
        self.graph_outputs = {v.name for v in proto.output}
        self._declared = {
            v.name: onnx.helper.tensor_dtype_to_string(v.type.tensor_type.elem_type).removeprefix("TensorProto.").lower()
            for v in [*proto.input, *proto.value_info, *proto.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type
        }
        self._dtypes: dict[str, str | None] = {}

    def constant(self, name: str) -> np.ndarray | None:
        t = self.initializers.get(name)
        return numpy_helper.to_array(t) if t is not None else None

    def is_constant(self, name: str) -> bool:
        if name in self.initializers:
            return True
        p = self.producer.get(name)  # e.g. a weight's DequantizeLinear ORT left in place
        return p is not None and p.op_type in ("DequantizeLinear", "Constant") and all(
            not v or self.is_constant(v) for v in p.inputs)

    def input_dtype(self, node: ort.RuntimeNode, index: int) -> str | None:
        if index < len(node.input_dtypes) and node.input_dtypes[index]:
            return node.input_dtypes[index]
        return self.dtype(node.inputs[index]) if index < len(node.inputs) else None

    def dtype(self, name: str) -> str | None:
        """A tensor's element type from initializers, declarations, or its producer."""
        if not name:
            return None
        if name not in self._dtypes:
            self._dtypes[name] = None  # cycles (none in a valid graph) end here
            self._dtypes[name] = self._find_dtype(name)
        return self._dtypes[name]

    def _find_dtype(self, name: str) -> str | None:
        """Initializers first, then what the producing op fixes (ORT may have changed a
        tensor's type after the model declared it: QDQ int8 -> uint8), then declarations,
        then the type an op moves or computes in (its first input's)."""
        if name in self.initializers:
            return _dtype_name(self.initializers[name].data_type)
        p = self.producer.get(name)
        if p is None:
            return self._declared.get(name)
        sig = signature(p.op_type, p.domain)
        if p.op_type == "QuantizeLinear":
            return self.dtype(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2] else "uint8"
        if p.op_type == "DynamicQuantizeLinear":
            return "float" if name == p.outputs[1] else "uint8"  # y, y_scale, y_zero_point
        if p.op_type == "DequantizeLinear":
            return "float"
        if sig is not None:
            if sig.y_zero_point is not None and sig.y_zero_point < len(p.inputs) and p.inputs[sig.y_zero_point]:
                return self.dtype(p.inputs[sig.y_zero_point])
            return "int32" if p.op_type in ("MatMulInteger", "ConvInteger") else "float"
        if p.op_type == "Cast":
            to = _int_attr(self, p, "to", 0)
            return _dtype_name(to) if to else None
        if name in self._declared:
            return self._declared[name]
        kind = op_kind(p.op_type, p.domain)
        if kind in (OpKind.MOVEMENT, OpKind.FLOAT) and p.inputs:
            return self.dtype(p.inputs[0])
        return None


def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()


# --- pitfalls -------------------------------------------------------------------------------------
def pitfalls(
    report: ort.RuntimeReport, *, cpu: CpuInfo | None = None,
    activation_ranges: Mapping[str, tuple[int, int]] | None = None,
) -> list[Pitfall]:
    """The known ORT pitfalls that apply to the graph in `report` on `cpu` (this machine by
    default). `activation_ranges`: observed {tensor: (min, max)} of 8-bit activations
    (`observe_activation_ranges`); without them a dtype's full range is assumed."""
    cpu = cpu or cpu_info()
    graph = _Graph(report)
    cpu_nodes = [n for n in graph.nodes if (n.provider or ort.PROVIDERS["cpu"]) == ort.PROVIDERS["cpu"]]
    found = []
    s8s8, saturating, details = [], [], {}
    for node in cpu_nodes:
        sig = signature(node.op_type, node.domain)
        if sig is None or sig.w is None:
            continue
        x_dtype = sig.x_dtype or graph.input_dtype(node, sig.x)
        w_dtype = graph.input_dtype(node, sig.w)
        if cpu.x86 and x_dtype == "int8" and w_dtype == "int8" and node.op_type != "ConvInteger":
            s8s8.append(node.name)
        if cpu.x86 and cpu.vnni is not True and sig.pair_sums and x_dtype == "uint8" and w_dtype == "int8":
            found_pairs = _pair_saturation(graph, node, sig, activation_ranges)
            if found_pairs is not None:
                saturating.append(node.name)
                details[node.name] = found_pairs
    if s8s8:
        found.append(Pitfall(
            PitfallKind.S8S8_X86,
            f"{_count(s8s8, 'kernel')} ({_ops(graph, s8s8)}) run S8S8 (int8 activations x int8 weights) "
            "on x86: ORT has no vpmaddubsw/VNNI path for s8s8 and these kernels are several times slower "
            "than u8s8; quantize activations as uint8, or emit QDQ, which ORT converts to u8s8",
            s8s8))
    if saturating:
        worst = max(saturating, key=lambda n: abs(details[n]["worst_pair_sum"]))
        d = details[worst]
        vnni = ("this CPU has no VNNI" if cpu.vnni is False
                else "VNNI support of this CPU is unknown (no /proc/cpuinfo flags)")
        found.append(Pitfall(
            PitfallKind.U8S8_SATURATION,
            f"{vnni}: u8s8 kernels can saturate int16 pair sums; weights wider than 7 bits at risk: "
            f"{_count(saturating, 'kernel')} ({_ops(graph, saturating)}) can exceed 32767, worst {worst!r} "
            f"(pair sum {d['worst_pair_sum']} from weights {d['worst_pair']} x activations in "
            f"[{d['activation_range'][0]}, {d['activation_range'][1]}]"
            f"{', observed' if d['observed'] else ''}, {d['rows_at_risk']}/{d['rows']} output channels); "
            "limit weights to 7 bits ([-64, 63]) there, or use u8u8",
            saturating, details))
    conv_int = [n.name for n in cpu_nodes if n.op_type == "ConvInteger" and graph.input_dtype(n, 1) == "int8"]
    if conv_int:
        found.append(Pitfall(
            PitfallKind.CONVINTEGER_INT8,
            f"{_count(conv_int, 'ConvInteger node')} with int8 weights: ORT runs them as a generic "
            "im2col + GEMM with a float rescale after it, without the pre-packed/NCHWc kernels a float Conv "
            "gets, usually slower than the float model; quantize Conv statically (QLinearConv) or leave it "
            "out of dynamic quantization",
            conv_int))
    return found


def _count(names: list[str], what: str) -> str:
    return f"{len(names)} {what}{'' if len(names) == 1 else 's'}"


def _ops(graph: _Graph, names: list[str]) -> str:
    counts = collections.Counter(graph.by_name[n].op_type for n in names)
    return ", ".join(f"{op} x{c}" if c > 1 else op for op, c in counts.items())


def _weight_rows(graph: _Graph, node: ort.RuntimeNode, sig, w: np.ndarray) -> np.ndarray | None:
    """The weights as [output, K] in the order the kernel reduces over (adjacent = paired)."""
    if sig.pair_sums == "conv":
        if w.ndim < 3:
            return None
        group = _int_attr(graph, node, "group", 1)
        if group > 1 and w.shape[1] == 1 and w.shape[0] == group:
            return None  # depthwise: MLAS widens to 16 bits, no pair sums
        return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)  # [co, kh, kw, ci]: NHWC K order
    if sig.pair_sums == "gemm" and _int_attr(graph, node, "transB", 0):
        return w.reshape(-1, w.shape[-1])
    if w.ndim < 2:
        return None
    return np.moveaxis(w, -2, -1).reshape(-1, w.shape[-2])  # B [.., K, N] -> rows of K


def _int_attr(graph: _Graph, node: ort.RuntimeNode, name: str, default: int) -> int:
    for n in graph.proto_nodes.get(node.name, ()):
        for a in n.attribute:
            if a.name == name:
                return int(a.i)
    return default


def _pair_saturation(graph: _Graph, node, sig, ranges) -> dict | None:
    """Worst adjacent-pair sum of uint8 activations x int8 weights, if it leaves int16."""
    w = graph.constant(node.inputs[sig.w])
    if w is None or w.dtype != np.int8:
        return None
    rows = _weight_rows(graph, node, sig, w.astype(np.int32))
    if rows is None:
        return None
    x_name = node.inputs[sig.x]
    observed = ranges is not None and x_name in ranges
    lo, hi = ranges[x_name] if observed else _DTYPE_RANGE["uint8"]
    if rows.shape[1] % 2:
        rows = np.pad(rows, ((0, 0), (0, 1)))
    pairs = rows.reshape(rows.shape[0], -1, 2)
    pos, neg = np.clip(pairs, 0, None), np.clip(pairs, None, 0)
    high = (hi * pos + lo * neg).sum(-1)  # the largest sum activations in [lo, hi] can make
    low = (lo * pos + hi * neg).sum(-1)
    excess = np.maximum(high - INT16_MAX, INT16_MIN - low)
    if excess.max() <= 0:
        return None
    r, p = np.unravel_index(int(np.argmax(excess)), excess.shape)
    worst = int(high[r, p]) if high[r, p] - INT16_MAX >= INT16_MIN - low[r, p] else int(low[r, p])
    zp_name = node.inputs[sig.x_zero_point] if sig.x_zero_point is not None and sig.x_zero_point < len(node.inputs) else ""
    zero_point = graph.constant(zp_name) if zp_name else None
    return {
        "worst_pair_sum": worst, "worst_pair": [int(v) for v in pairs[r, p]], "output_channel": int(r),
        "activation": x_name, "activation_range": [int(lo), int(hi)], "observed": bool(observed),
        "activation_zero_point": None if zero_point is None or zero_point.size != 1 else int(zero_point),
        "rows": int(pairs.shape[0]), "rows_at_risk": int((excess > 0).any(-1).sum()),
        "max_abs_weight": int(np.abs(rows).max()),
    }


# --- float islands ---------------------------------------------------------------------------------
#: ORT's own layout conversions around NCHWc float kernels: looked through when reading
#: what feeds a node and what it feeds
_LAYOUT = {("com.microsoft.nchwc", "ReorderInput"), ("com.microsoft.nchwc", "ReorderOutput")}
_BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}


def _is_layout(node: ort.RuntimeNode | None) -> bool:
    return node is not None and (node.domain, node.op_type) in _LAYOUT


def _producer(graph: _Graph, value: str) -> ort.RuntimeNode | None:
    p = graph.producer.get(value)
    while _is_layout(p) and p.inputs:
        p = graph.producer.get(p.inputs[0])
    return p


def _consumers(graph: _Graph, value: str) -> list[ort.RuntimeNode]:
    out = []
    for c in graph.consumers.get(value, []):
        out += [x for o in c.outputs for x in _consumers(graph, o)] if _is_layout(c) else [c]
    return out


def _writes_output(graph: _Graph, node: ort.RuntimeNode) -> bool:
    return any(o in graph.graph_outputs or any(_is_layout(c) and _writes_output(graph, c)
                                               for c in graph.consumers.get(o, []))
               for o in node.outputs)


def _node_cause(graph: _Graph, node: ort.RuntimeNode, island: set[str], cpu: CpuInfo) -> NodeCause:
    """Why `node` (FLOAT, in `island`) runs in float, read from its neighbours (through ORT's
    NCHWc layout conversions). In order:
    1. ORT's NCHWc layout conversion: explained by the node it converts for;
    2. an input is the float result of an integer kernel (MatMulIntegerToFloat, a Cast of
       ConvInteger's int32, DynamicQuantizeLinear's scale): dynamic-quantization glue;
    3. ORT has no integer kernel for the op;
    4. fed by DequantizeLinear and feeding only QuantizeLinear, yet not fused: a non-8-bit
       type; on x86, int8 activations ORT did not convert to uint8 (its s8 -> u8 rewrite
       needs a QuantizeLinear with a single DequantizeLinear consumer, and its x86 QDQ
       fusion takes uint8 activations); a float constant operand; else an unfused pattern;
    5. fed by DequantizeLinear, but its output also goes to float ops or a model output;
    6. reads a model input with no QuantizeLinear before it, or float data from outside;
    7. otherwise its float inputs come from other nodes of the island."""
    op = base_op(node.op_type)
    label = f"{node.qualified_op} {node.name!r}"

    def result(cause: Cause, reason: str) -> NodeCause:
        return NodeCause(node.name, node.qualified_op, cause, reason)

    if _is_layout(node):
        around = [x for x in (_producer(graph, node.inputs[0]), *_consumers(graph, node.outputs[0])) if x]
        names = ", ".join(f"{x.qualified_op} {x.name!r}" for x in around[:2])
        return result(Cause.FOLLOWS, f"{label} converts the layout for ORT's NCHWc float kernels ({names})")
    data = [v for v in node.inputs if v and not graph.is_constant(v)]
    producers = {v: _producer(graph, v) for v in data}
    for v, p in producers.items():
        source = p
        if source is not None and source.op_type == "Cast" and source.inputs and source.inputs[0] in graph.producer:
            source = graph.producer[source.inputs[0]]
        if source is None or source.kind is not OpKind.INTEGER and source.op_type != "DynamicQuantizeLinear":
            continue
        named = f"{source.qualified_op} {source.name!r}"
        if source.op_type == "DynamicQuantizeLinear":
            why = f"computes on the scale of {named} (dynamic quantization works out every scale in float)"
        elif graph.dtype(source.outputs[0]) == "int32":
            why = f"rescales the int32 result of {named} to float (dynamic quantization has no fused kernel for it)"
        elif signature(source.op_type, source.domain) and signature(source.op_type, source.domain).x_dtype or \
                source.op_type == "MatMulIntegerToFloat":
            why = f"computes on the float result of {named} (dynamic quantization returns every result in float)"
        else:
            why = (f"computes on the float result of {named}, which dequantizes its own output (no output "
                   "zero point), so what follows it runs in float")
        return result(Cause.FLOAT_RESULT, f"{label} {why}")

    kernels = integer_kernels(node.op_type, node.domain)
    from_dq = {v: p for v, p in producers.items() if p is not None and p.op_type == "DequantizeLinear"}
    consumers = [c for o in node.outputs[:1] for c in _consumers(graph, o)]
    to_q = bool(consumers) and all(c.op_type == "QuantizeLinear" for c in consumers) and not _writes_output(graph, node)
    if not kernels:
        where = " between DequantizeLinear and QuantizeLinear" if from_dq and to_q else ""
        return result(Cause.NO_INTEGER_KERNEL, f"no integer kernel for {op} in ONNX Runtime: {label} runs in "
                      f"float{where}")
    if from_dq and to_q and len(from_dq) == len(data):
        bias = _BIAS_INPUT.get(op)
        weights = [v for i, v in enumerate(node.inputs) if v and i != bias and v not in from_dq
                   and graph.is_constant(v) and getattr(graph.producer.get(v), "op_type", None) == "DequantizeLinear"]
        float_constants = [v for v in node.inputs if v in graph.initializers
                           and graph.dtype(v) in ("float", "float16", "double")]
        act_types = sorted({graph.input_dtype(p, 0) or "?" for p in from_dq.values()})
        dq_types = sorted({*act_types, *(graph.input_dtype(graph.producer[v], 0) or "?" for v in weights)})
        q_types = sorted({graph.dtype(c.outputs[0]) or "?" for c in consumers})
        odd = [t for t in {*dq_types, *q_types} if t not in _DTYPE_RANGE]
        if odd:
            return result(Cause.TYPE_COMBINATION, f"type combination has no kernel: {label} sits between "
                          f"{'/'.join(dq_types)} DequantizeLinear and {'/'.join(q_types)} QuantizeLinear, but ORT's "
                          f"{' / '.join(kernels[:2])} take 8-bit types only, so it runs DequantizeLinear -> float "
                          f"{op} -> QuantizeLinear")
        if op_kind(op) is OpKind.MOVEMENT:
            mismatch = _qdq_mismatch(graph, list(from_dq.values()), consumers)
            if mismatch:
                return result(Cause.UNFUSED_QDQ, f"unfused QDQ pattern: DequantizeLinear -> {op} -> QuantizeLinear "
                              f"left as float {node.op_type} {node.name!r}: ORT runs {op} in 8 bits by dropping the "
                              f"DequantizeLinear/QuantizeLinear around it, which needs the same type, scale and zero "
                              f"point on both sides; {mismatch}")
        if cpu.x86 and "int8" in act_types:
            return result(Cause.UNFUSED_QDQ, f"unfused QDQ pattern: DequantizeLinear -> {op} -> QuantizeLinear left "
                          f"as float {node.op_type} {node.name!r}: its activations are still int8 in ORT's graph "
                          f"({_int8_why(graph, from_dq.values())}), and on x86 ORT fuses QDQ groups into "
                          f"{kernels[0]} only with uint8 activations")
        why = (f"its input {float_constants[0]!r} is a float constant, not a DequantizeLinear output"
               if float_constants else f"ORT's QDQ fusion into {kernels[0]} did not match it")
        return result(Cause.UNFUSED_QDQ, f"unfused QDQ pattern: DequantizeLinear -> {op} -> QuantizeLinear left "
                      f"as float {node.op_type} {node.name!r} ({why})")
    if from_dq:
        sinks = [f"{c.op_type} {c.name!r}" for c in consumers if c.op_type != "QuantizeLinear"]
        sinks += [f"model output {v!r}" for v in node.outputs if v in graph.graph_outputs]
        if not to_q and sinks:
            return result(Cause.DQ_TO_FLOAT, f"DequantizeLinear feeding a float op: the output of {label} goes to "
                          f"{', '.join(sinks[:3])}{' ...' if len(sinks) > 3 else ''}, not only to QuantizeLinear, "
                          f"so ORT cannot fuse it into {kernels[0]}")
    inputs = [v for v in data if v in graph.graph_inputs]
    if inputs:
        return result(Cause.FLOAT_INPUT, f"{label} reads the float model input {inputs[0]!r}: no QuantizeLinear "
                      "before it")
    outside = [p for p in producers.values() if p is not None and p.name not in island
               and p.op_type != "DequantizeLinear"]
    if outside:
        p = outside[0]
        return result(Cause.FLOAT_INPUT, f"{label} takes float data from {p.qualified_op} {p.name!r}")
    if from_dq:  # some inputs dequantized, the rest float from this island
        return result(Cause.DQ_TO_FLOAT, f"DequantizeLinear feeding a float op: {label} also takes float inputs "
                      f"from this island, so ORT cannot fuse it into {kernels[0]}")
    sources = [p.name for p in producers.values() if p is not None and p.name in island]
    return result(Cause.FOLLOWS, f"{label} takes the float output of {', '.join(map(repr, sources[:2]))}")


def _qdq_mismatch(graph: _Graph, dqs: list[ort.RuntimeNode], qs: list[ort.RuntimeNode]) -> str | None:
    """How the DequantizeLinear before and the QuantizeLinear after a data-movement op
    differ (type, scale, zero point), or None when they agree."""
    def params(node: ort.RuntimeNode, data_dtype: str | None) -> tuple:
        scale, zero = (graph.constant(v) if v else None for v in (list(node.inputs[1:3]) + [""])[:2])
        return (data_dtype, None if scale is None else scale.tolist(), None if zero is None else zero.tolist())

    before = {params(d, graph.input_dtype(d, 0)) for d in dqs}
    after = {params(q, graph.dtype(q.outputs[0])) for q in qs}
    if before == after and len(before) == 1:
        return None
    (t_in, s_in, z_in), (t_out, s_out, z_out) = sorted(before, key=str)[0], sorted(after, key=str)[0]
    if t_in != t_out:
        extra = ""
        for q in qs:
            n = len(graph.consumers.get(q.outputs[0], []))
            if graph.dtype(q.outputs[0]) == "int8" and n > 1:
                extra = (f" (QuantizeLinear {q.name!r} stays int8: it feeds {n} DequantizeLinear nodes, and ORT "
                         "converts int8 pairs to uint8 only one to one)")
        return f"here {t_in} before and {t_out} after{extra}"
    return f"here scale {s_in} / zero point {z_in} before and {s_out} / {z_out} after"


def _int8_why(graph: _Graph, dqs) -> str:
    """Why ORT kept int8 activation Q/DQ: its s8 -> u8 rewrite converts a QuantizeLinear ->
    DequantizeLinear pair only when the QuantizeLinear has that one consumer."""
    for dq in dqs:
        if graph.input_dtype(dq, 0) != "int8":
            continue
        q = graph.producer.get(dq.inputs[0])
        if q is not None and q.op_type == "QuantizeLinear":
            n = len(graph.consumers.get(q.outputs[0], []))
            if n > 1:
                return (f"QuantizeLinear {q.name!r} feeds {n} DequantizeLinear nodes, and ORT converts int8 "
                        "QuantizeLinear/DequantizeLinear pairs to uint8 only one to one")
            return f"ORT did not convert QuantizeLinear {q.name!r} -> DequantizeLinear {dq.name!r} to uint8"
        return f"DequantizeLinear {dq.name!r} reads int8 data that no QuantizeLinear of this graph makes"
    return "int8 DequantizeLinear"


# --- MACs ---------------------------------------------------------------------------------------
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_MATMUL = {"MatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
           "MatMulNBits", "Gemm", "QGemm"}


def _macs(graph: _Graph, node: ort.RuntimeNode) -> int:
    """Multiply-accumulates of a Conv/Gemm/MatMul-like kernel in the profiling run."""
    op = base_op(node.op_type)
    out = node.output_shapes[0] if node.output_shapes else None
    if out is None:
        return 0
    if op in _CONV_WEIGHT:
        i = _CONV_WEIGHT[op]
        w = node.input_shapes[i] if i < len(node.input_shapes) else None
        return math.prod(out) * math.prod(w[1:]) if w and len(w) > 2 else 0
    if op in _MATMUL:
        a = node.input_shapes[0] if node.input_shapes else None
        if not a:
            return 0
        k = a[0] if op in ("Gemm", "QGemm") and _int_attr(graph, node, "transA", 0) else a[-1]
        return math.prod(out) * k
    return 0


# --- the check ------------------------------------------------------------------------------------
def check_runtime(
    model: ort.ModelSource, *, provider: str = "cpu", feeds: Mapping[str, Any] | None = None,
    data: Mapping[str, np.ndarray] | None = None, cpu: CpuInfo | None = None,
    on_warning: Callable[[Pitfall], None] | None = None, profile_runs: int = 3, threads: int | None = None,
) -> RuntimeCheck:
    """Check what ORT runs for `model` on `provider` (see the module docstring). `feeds`:
    one input for the profiling run (random from declared shapes when None); `data`: [N,
    ...] samples (a `slimgraph.data` layout) to observe 8-bit activation ranges on and to
    take the profiling feeds from. Every pitfall goes to `on_warning` (default: a logged
    warning) before the model runs."""
    cpu = cpu or cpu_info()
    static = ort.runtime_report(model, provider=provider, profile=False, threads=threads)
    ranges = observe_activation_ranges(static, data) if data is not None else None
    found = pitfalls(static, cpu=cpu, activation_ranges=ranges)
    for p in found:
        (on_warning or (lambda p: logger.warning("%s", p.message)))(p)
    if feeds is None and data is not None:
        feeds = sg_data.sample(data, _input_ranks(static), 0)
    report = ort.runtime_report(model, provider=provider, feeds=feeds, profile_runs=profile_runs, threads=threads)
    return _assemble(report, found, cpu, provider, _source(model))


def _source(model: ort.ModelSource) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    return getattr(model, "source", None) or f"<{type(model).__name__}>"


def _input_ranks(report: ort.RuntimeReport) -> dict[str, int]:
    graph = report.optimized_model.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in graph.input}


def _assemble(report: ort.RuntimeReport, found: list[Pitfall], cpu: CpuInfo, provider: str, source: str) -> RuntimeCheck:
    graph = _Graph(report)
    total_us = sum(n.time_us or 0.0 for n in report.nodes)

    def share(t: float | None) -> float | None:
        return t / total_us if t is not None and total_us > 0 else None

    rows, macs = [], {}
    for n in report.nodes:
        macs[n.name] = _macs(graph, n) if not n.graph else 0
        rows.append(NodeRow(n.name, n.op_type, n.domain, n.provider, n.kind, n.input_dtypes, n.time_us,
                            share(n.time_us), macs[n.name]))
    islands = []
    for names in report.float_islands():
        members = set(names)
        nodes = [graph.by_name[x] for x in names]
        times = [n.time_us for n in nodes if n.time_us is not None]
        islands.append(Island(
            nodes=names, ops=[n.qualified_op for n in nodes],
            time_share=share(sum(times)) if times else None, macs=sum(macs[x] for x in names),
            causes=[_node_cause(graph, n, members, cpu) for n in nodes]))
    integer = sum(macs[n.name] for n in graph.nodes if n.kind is OpKind.INTEGER)
    floating = sum(macs[n.name] for n in graph.nodes if n.kind is OpKind.FLOAT)
    quantize = [n for n in graph.nodes if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear")
                or getattr(signature(n.op_type, n.domain), "x_dtype", None)]
    dequantize = [n for n in graph.nodes if (n.op_type == "DequantizeLinear" and not graph.is_constant(n.outputs[0]))
                  or (n.kind is OpKind.INTEGER and n.outputs and graph.dtype(n.outputs[0]) == "float")]
    return RuntimeCheck(
        source=source, provider=provider, cpu=cpu, pitfalls=found, nodes=rows, islands=islands,
        integer_macs=integer, float_macs=floating,
        quantize_nodes=len(quantize),
        quantize_at_inputs=sum(1 for n in quantize if n.inputs and n.inputs[0] in graph.graph_inputs),
        dequantize_nodes=len(dequantize),
        dequantize_at_outputs=sum(1 for n in dequantize if set(n.outputs) & graph.graph_outputs),
        report=report,
    )


# --- observed activation ranges ------------------------------------------------------------------
def observe_activation_ranges(
    report: ort.RuntimeReport, data: Mapping[str, np.ndarray], *, samples: int = _OBSERVE_SAMPLES,
) -> dict[str, tuple[int, int]]:
    """{tensor: (min, max)} of the uint8 activations entering u8s8 kernels of `report`'s
    optimized graph, over up to `samples` samples of `data`: the optimized model is run
    again (ORT optimizations off) with those tensors as extra outputs."""
    graph = _Graph(report)
    wanted = set()
    for n in graph.nodes:
        sig = signature(n.op_type, n.domain)
        if sig is not None and sig.pair_sums and sig.x_dtype is None and graph.input_dtype(n, sig.x) == "uint8":
            wanted.add(n.inputs[sig.x])
    if not wanted:
        return {}
    proto = onnx.ModelProto()
    proto.CopyFrom(report.optimized_model)
    outputs = {v.name for v in proto.graph.output}
    for name in sorted(wanted - outputs):
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
    sess = ort.session(proto, optimization="disable")
    names = [o.name for o in sess.get_outputs()]
    lo: dict[str, int] = {}
    hi: dict[str, int] = {}
    n = min(samples, sg_data.count(data))
    ranks = _input_ranks(report)
    for i in range(n):
        feeds = ort.check_feeds(sess, sg_data.sample(data, ranks, i), allow_extra=True)
        for name, value in zip(names, sess.run(names, feeds)):
            if name in wanted and value.size:
                lo[name] = min(lo.get(name, 255), int(value.min()))
                hi[name] = max(hi.get(name, 0), int(value.max()))
    return {k: (lo[k], hi[k]) for k in lo}
