"""What the static quantizer's planning and its two lowerings share:

1. the per-node plan, stored as annotations (`Model.annotate`): `quantize` = the node's
   `Kind`, and `qparams.input.<i>` / `qparams.output.<i>` = `QParams.to_json()` for each
   8-bit input (activations, weights, quantized constants) and output. An output with no
   annotation stays float (a QGemm that dequantizes itself);
2. `Emitter`: builds nodes and initializers in the graph with fresh names, one initializer
   per distinct small constant (the same scale or zero point is stored once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.ir.model import ANNOTATION_PREFIX, Model
from slimgraph.passes.quantize._ops import Kind
from slimgraph.passes.quantize.qparams import QParams

KIND_KEY = "quantize"
#: Tag on every node a lowering creates: the name (and op) of the float node it replaced.
SOURCE_KEY = "quantize.source"
#: Constants up to this many elements are stored once however often they are used.
_DEDUP_ELEMENTS = 4096


@dataclasses.dataclass
class NodePlan:
    kind: Kind
    inputs: dict[int, QParams]
    outputs: dict[int, QParams]


def write_plan(node: ir.Node, plan: NodePlan) -> None:
    Model.annotate(node, KIND_KEY, plan.kind.value)
    for i, qp in plan.inputs.items():
        Model.annotate(node, f"qparams.input.{i}", qp.to_json())
    for i, qp in plan.outputs.items():
        Model.annotate(node, f"qparams.output.{i}", qp.to_json())


def read_plan(node: ir.Node) -> NodePlan | None:
    kind = Model.annotation(node, KIND_KEY)
    if kind is None:
        return None

    def side(which: str, count: int) -> dict[int, QParams]:
        out = {}
        for i in range(count):
            data = Model.annotation(node, f"qparams.{which}.{i}")
            if data is not None:
                out[i] = QParams.from_json(data)
        return out

    return NodePlan(Kind(kind), side("input", len(node.inputs)), side("output", len(node.outputs)))


def clear_plan(node: ir.Node) -> None:
    """Remove a plan's annotations (only those: other passes' `quantize.*` keys stay)."""
    kind_key = f"{ANNOTATION_PREFIX}{KIND_KEY}"
    for key in [k for k in node.metadata_props if k == kind_key or k.startswith(f"{ANNOTATION_PREFIX}qparams.")]:
        del node.metadata_props[key]


def same_qparams(a: QParams, b: QParams) -> bool:
    return (a.dtype == b.dtype and a.axis == b.axis and a.scale.shape == b.scale.shape
            and np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point))


def copy_attributes(node: ir.Node, *, drop: Iterable[str] = ()) -> list[ir.Attr]:
    skip = set(drop)
    return [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values() if a.name not in skip]


class Emitter:
    """Creates nodes and initializers in a graph. Per-run state: build one per lowering."""

    def __init__(self, model: Model):
        self.model = model
        self.graph = model.graph
        graphs = [self.graph, *self.graph.subgraphs()]
        self._names = {v.name for g in graphs for v in [*g.inputs, *g.initializers.values()]}
        self._names |= {v.name for g in graphs for n in g for v in n.outputs if v.name}
        self._names |= {n.name for g in graphs for n in g if n.name}
        self._constants: dict[tuple, ir.Value] = {}
        self.created: list[ir.Node] = []

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def constant(self, array: np.ndarray, base: str) -> ir.Value:
        """An initializer holding `array`; small ones are shared between uses."""
        array = np.array(array, order="C", copy=True)  # ascontiguousarray would make 0-d arrays 1-d
        key = None
        if array.size <= _DEDUP_ELEMENTS:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key in self._constants:
                return self._constants[key]
        value = ir.Value(name=self.fresh(base), const_value=ir.tensor(array))
        value.dtype = value.const_value.dtype
        value.shape = ir.Shape(array.shape)
        self.graph.register_initializer(value)
        if key is not None:
            self._constants[key] = value
        return value

    def qparams(self, qp: QParams, base: str) -> tuple[ir.Value, ir.Value]:
        """Initializers for (scale, zero point)."""
        return (self.constant(qp.scale.astype(np.float32), f"{base}_scale"),
                self.constant(qp.zero_point.astype(qp.np_dtype), f"{base}_zero_point"))

    def node(
        self, op_type: str, inputs: Sequence[ir.Value | None], outputs: Sequence[tuple[str, ir.DataType | None, Any]],
        *, domain: str = "", attributes: Mapping[str, Any] | Sequence[ir.Attr] = (), source: ir.Node | None = None,
        before: ir.Node | None = None, after: ir.Node | None = None,
    ) -> ir.Node:
        """A new node (outputs given as (name base, dtype, shape)), inserted before `before`,
        after `after`, or appended; tagged with the float node it comes from."""
        if domain and domain not in self.model.ir.opset_imports:
            self.model.ir.opset_imports[domain] = 1
            self.graph.opset_imports[domain] = 1
        attrs = ir.convenience.convert_attributes(attributes) if isinstance(attributes, Mapping) else list(attributes)
        inputs = list(inputs)
        while inputs and inputs[-1] is None:  # trailing optional inputs left out
            inputs.pop()
        base = source.name if source is not None and source.name else op_type
        node = ir.Node(domain, op_type, inputs, attrs, num_outputs=len(outputs),
                       name=self.fresh(f"{base}_{op_type}" if source is not None else op_type))
        for value, (name, dtype, shape) in zip(node.outputs, outputs):
            value.name = self.fresh(name)
            if dtype is not None:
                value.dtype = dtype
            if shape is not None:
                value.shape = ir.Shape(shape) if not isinstance(shape, ir.Shape) else shape.copy()
        if source is not None:
            Model.annotate(node, SOURCE_KEY, f"{source.op_type}:{source.name}")
            for key in ("slimgraph.provenance", "namespace", "pkg.torch.onnx.name_scopes"):
                if key in source.metadata_props:
                    node.metadata_props[key] = source.metadata_props[key]
        if before is not None:
            self.graph.insert_before(before, node)
        elif after is not None:
            self.graph.insert_after(after, node)
        else:
            self.graph.append(node)
        self.created.append(node)
        return node

    def take_output(self, value: ir.Value, replacement: ir.Value) -> None:
        """`replacement` becomes the graph output `value` was, under its name."""
        outputs = self.graph.outputs
        name = value.name
        value.name = self.fresh(f"{name}_float")
        replacement.name = name
        for i, v in enumerate(outputs):
            if v is value:
                outputs[i] = replacement

    def remove_dead(self) -> int:
        """Remove nodes this emitter created whose outputs nothing reads; returns how many."""
        removed = 0
        for node in reversed(self.created):
            if node.graph is self.graph and not any(v.uses() or v.is_graph_output() for v in node.outputs):
                inputs = [v for v in node.inputs if v is not None]
                self.graph.remove(node, safe=True)
                self.remove_unused_initializers(inputs)
                removed += 1
        return removed

    def remove_unused_initializers(self, candidates: Iterable[ir.Value]) -> int:
        """Drop those of `candidates` (initializers) nothing reads any more."""
        removed = 0
        for value in set(candidates):
            if (value.is_initializer() and not value.uses() and not value.is_graph_output()
                    and not value.is_graph_input() and value.name in self.graph.initializers):
                del self.graph.initializers[value.name]
                removed += 1
        return removed


def weight_axis(node: ir.Node) -> int:
    """The output-channel axis of a MAC node's constant weight (input 1)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1  # MatMul: B is [K, N]


def int32_bias(bias: np.ndarray, x: QParams, w: QParams, what: str, logger) -> np.ndarray:
    """`bias` in int32 at scale x_scale * w_scale (zero point 0), as the integer kernels add it."""
    scale = (x.scale.astype(np.float64) * w.scale.astype(np.float64)).reshape(-1)
    q = np.round(bias.astype(np.float64).reshape(-1) / scale)
    limit = np.iinfo(np.int32)
    if np.any((q < limit.min) | (q > limit.max)):
        logger.warning("%s: bias clipped to int32 (|bias| / (x_scale * w_scale) > 2^31)", what)
    return np.clip(q, limit.min, limit.max).astype(np.int32)
