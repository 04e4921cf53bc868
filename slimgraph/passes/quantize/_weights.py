"""What the weight quantizers (`quantize.dynamic`, `quantize.weight_only`, `quantize.fp8`)
share: finding the layers whose weights are constants, matching user exclusions, and
editing the graph with fresh names.

1. `find_linears(model, op_types, exclude)` finds every MatMul / Gemm whose weight is a
   constant 2-D float32 matrix, as a `Linear`: the activation A, the weight oriented as
   `W [K, N]` so that the layer is `A @ W (+ bias)`, and the bias when one can be folded
   (a Gemm's C, or the only consumer of a MatMul being `Add(., constant [N])`). Each node
   that is not taken is counted under its reason (`skipped`), e.g. "weight is computed"
   for attention's activation x activation MatMuls.
2. `find_gathers(model, exclude)`: Gather nodes reading rows of a constant 2-D float32
   table (embeddings) with axis 0.
3. `matches(node, patterns)`: fnmatch of the node's name, its output's name, its
   provenance (torch module path) and its weight's name against user patterns (`exclude: ["*attention*"]`).
4. `GraphEditor`: new initializers and nodes with names unique in the model, inserted
   before the node they replace, the replaced output's consumers (and graph outputs,
   names kept) moved to the new value, the old nodes and float weights nobody reads any
   more removed.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.ir.model import PROVENANCE_KEY, Model
from slimgraph.passes.rewrite import constant, rank

MS_DOMAIN = "com.microsoft"
#: Annotation on every node a weight quantizer creates: the name of the node it replaced.
SOURCE_KEY = "quantize.source"


def matches(node: ir.Node, patterns: Sequence[str], weight: ir.Value | None = None) -> str | None:
    """The first pattern matching the node's name, its first output's name, its provenance
    or its weight's name, if any."""
    names = [node.name or "", node.outputs[0].name or "", Model.provenance(node) or ""]
    if weight is not None and weight.name:
        names.append(weight.name)
    for pattern in patterns:
        if any(name and fnmatch.fnmatchcase(name, pattern) for name in names):
            return pattern
    return None


@dataclasses.dataclass
class Linear:
    """One layer `A @ W (+ bias)` with a constant weight."""

    node: ir.Node
    weight_value: ir.Value
    #: float32 [K, N], oriented so that the layer computes A @ weight
    weight: np.ndarray
    bias: np.ndarray | None
    #: the Add folded into the layer (the MatMul's only consumer), if any
    bias_node: ir.Node | None

    @property
    def activation(self) -> ir.Value:
        """A, read from the node (an earlier replacement may have moved it to a new value)."""
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        """The value the layer's replacement must produce."""
        return (self.bias_node or self.node).outputs[0]

    @property
    def nodes(self) -> list[ir.Node]:
        return [self.node] + ([self.bias_node] if self.bias_node is not None else [])

    @property
    def name(self) -> str:
        return self.node.name or self.output.name or self.node.op_type

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape  # type: ignore[return-value]


def _float_weight(value: ir.Value | None) -> np.ndarray | str:
    array = constant(value)
    if array is None:
        return "weight is computed" if value is not None and value.producer() is not None else "weight is not a constant"
    if array.dtype != np.float32:
        return f"weight is {array.dtype}, not float32"
    if array.ndim != 2:
        return f"weight is {array.ndim}-D, not 2-D"
    return array


def _foldable_bias(out: ir.Value, n: int) -> tuple[np.ndarray, ir.Node] | None:
    """(bias [N], the Add) when `out`'s only consumer adds a constant that broadcasts as [N]."""
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    b = constant(other)
    if b is None or b.dtype != np.float32 or b.size != n or (b.ndim and b.shape[-1] != n):
        return None
    out_rank = rank(out)
    if b.ndim > 1 and (out_rank is None or out_rank < b.ndim):
        return None  # a [1, 1, N] bias could raise the rank of a lower-rank product
    return b.reshape(n), add


def _matmul(node: ir.Node) -> Linear | str:
    w = _float_weight(node.inputs[1])
    if isinstance(w, str):
        return w
    a_rank = rank(node.inputs[0])
    if a_rank is not None and a_rank < 2:
        return "activation is 1-D"
    folded = _foldable_bias(node.outputs[0], w.shape[1])
    bias, add = folded if folded is not None else (None, None)
    return Linear(node, node.inputs[1], w, bias, add)


def _gemm(node: ir.Node) -> Linear | str:
    attrs = node.attributes
    if attrs.get_int("transA", 0):
        return "Gemm with transA=1"
    w = _float_weight(node.inputs[1])
    if isinstance(w, str):
        return w
    if attrs.get_int("transB", 0):
        w = w.T
    alpha = attrs.get_float("alpha", 1.0)
    w = np.ascontiguousarray(w * np.float32(alpha) if alpha != 1.0 else w)
    n = w.shape[1]
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = constant(node.inputs[2])
        if c is None:
            return "Gemm bias is not a constant"
        if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
            return "Gemm bias does not broadcast as [N]"
        bias = np.broadcast_to(c.reshape(-1) * np.float32(attrs.get_float("beta", 1.0)), (n,)).astype(np.float32)
    return Linear(node, node.inputs[1], w, bias, None)


_LINEAR_OPS = {"MatMul": _matmul, "Gemm": _gemm}


def find_linears(model: Model, op_types: Iterable[str], exclude: Sequence[str] = ()
                 ) -> tuple[list[Linear], collections.Counter]:
    """Every MatMul/Gemm in `op_types` with a constant float32 weight, in graph order,
    and a count of the reasons other candidates were left alone."""
    wanted = set(op_types) & set(_LINEAR_OPS)
    found: list[Linear] = []
    skipped: collections.Counter = collections.Counter()
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in wanted:
            continue
        if matches(node, exclude, node.inputs[1]):
            skipped["excluded by pattern"] += 1
            continue
        linear = _LINEAR_OPS[node.op_type](node)
        if isinstance(linear, str):
            skipped[linear] += 1
        else:
            found.append(linear)
    return found, skipped


@dataclasses.dataclass
class Embedding:
    """`Gather(table [V, D], indices)` with a constant float32 table and axis 0."""

    node: ir.Node
    table_value: ir.Value
    table: np.ndarray

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name or "Gather"


def find_gathers(model: Model, exclude: Sequence[str] = ()) -> tuple[list[Embedding], collections.Counter]:
    found: list[Embedding] = []
    skipped: collections.Counter = collections.Counter()
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type != "Gather":
            continue
        table = constant(node.inputs[0])
        if table is None:
            continue  # a Gather on activations (shape arithmetic, token selection)
        if matches(node, exclude, node.inputs[0]):
            skipped["excluded by pattern"] += 1
        elif table.dtype != np.float32 or table.ndim != 2:
            skipped["table is not a 2-D float32 constant"] += 1
        elif node.attributes.get_int("axis", 0) != 0:
            skipped["Gather axis is not 0"] += 1
        else:
            found.append(Embedding(node, node.inputs[0], table))
    return found, skipped


class GraphEditor:
    """Builds replacement nodes in the main graph with model-unique names."""

    def __init__(self, model: Model, owner: str):
        self.model = model
        self.graph = model.graph
        self.owner = owner
        self._names: set[str] = set()
        for graph in model.ir.graphs():
            self._names.update(v.name for v in graph.inputs if v.name)
            self._names.update(graph.initializers)
            for node in graph:
                self._names.add(node.name or "")
                self._names.update(v.name for v in node.outputs if v.name)
        self._replaced_weights: set[ir.Value] = set()

    def fresh(self, base: str) -> str:
        base = base or self.owner
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def initializer(self, array: np.ndarray | ir.TensorProtocol, base: str,
                    dtype: ir.DataType | None = None) -> ir.Value:
        tensor = array if isinstance(array, ir.TensorProtocol) else ir.Tensor(np.ascontiguousarray(array), dtype=dtype)
        name = self.fresh(base)
        tensor.name = name
        value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
        self.graph.register_initializer(value)
        return value

    def node(self, domain: str, op_type: str, inputs: Sequence[ir.Value | None], *, source: ir.Node,
             num_outputs: int = 1, **attributes) -> ir.Node:
        """A new node (not yet in the graph) tagged with the node it replaces."""
        attrs = [_attr(k, v) for k, v in attributes.items()]
        node = ir.Node(domain, op_type, list(inputs), attrs, num_outputs=num_outputs,
                       name=self.fresh(f"{source.name or op_type}/{op_type}"))
        for i, out in enumerate(node.outputs):
            out.name = self.fresh(f"{node.name}:{i}")
        provenance = Model.provenance(source)
        if provenance is not None:
            node.metadata_props[PROVENANCE_KEY] = provenance
        Model.annotate(node, SOURCE_KEY, source.name or source.op_type)
        Model.annotate(node, "rule", self.owner)
        if domain and domain not in self.model.ir.opset_imports:
            self.model.ir.opset_imports[domain] = 1
        return node

    def replace(self, old_nodes: Sequence[ir.Node], old_output: ir.Value, new_nodes: Sequence[ir.Node],
                new_output: ir.Value) -> None:
        """Insert `new_nodes` before the first old node, move `old_output`'s consumers to
        `new_output` (keeping a graph output's name), and remove `old_nodes`."""
        self.graph.insert_before(old_nodes[0], new_nodes)
        new_output.shape, new_output.type = old_output.shape, old_output.type
        if old_output.is_graph_output():
            name = old_output.name
            old_output.name = self.fresh(f"{name}_replaced")
            new_output.name = name
        old_output.replace_all_uses_with(new_output, replace_graph_outputs=True)
        for node in old_nodes:
            self._replaced_weights.update(v for v in node.inputs if v is not None and v.const_value is not None)
        self.graph.remove(list(old_nodes), safe=True)

    def mark_replaced(self, value: ir.Value) -> None:
        """A constant input a pass has stopped reading: dropped later if nothing else reads it."""
        self._replaced_weights.add(value)

    def drop_unused_weights(self) -> int:
        """Remove the replaced nodes' constant inputs that nothing reads any more."""
        dropped = 0
        for value in self._replaced_weights:
            if not list(value.uses()) and not value.is_graph_output() and not value.is_graph_input() \
                    and value.name in self.graph.initializers and self.graph.initializers[value.name] is value:
                del self.graph.initializers[value.name]
                dropped += 1
        self._replaced_weights.clear()
        return dropped


def _attr(name: str, value) -> ir.Attr:
    if isinstance(value, (bool, int, np.integer)):
        return ir.Attr(name, ir.AttributeType.INT, int(value))
    if isinstance(value, (float, np.floating)):
        return ir.Attr(name, ir.AttributeType.FLOAT, float(value))
    if isinstance(value, str):
        return ir.Attr(name, ir.AttributeType.STRING, value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value):
        return ir.Attr(name, ir.AttributeType.INTS, [int(v) for v in value])
    raise TypeError(f"unsupported attribute {name}={value!r}")
