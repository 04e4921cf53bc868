"""Which weights the unstructured pruning passes (`prune.magnitude`, `prune.n_m`) touch.

A `Target` is one constant float weight initializer of a Conv, ConvTranspose, Gemm or
MatMul (or a Gather table when `embeddings`), listed once even when several nodes read
it. Skipped: weights smaller than `min_size` elements, weights computed at run time
(attention's activation x activation MatMuls), nodes matching an `exclude` pattern (node
name, output name, torch module path from `Model.provenance`, weight name, or op type),
and by default the first and the last compute layers: a layer with a constant weight and
no such layer before it (resp. after it) on any path; in a CNN the stem conv and the
classifier, in a transformer the first Q/K/V projections and the last FFN output.

The reduction axis of a weight is the one the layer sums over: Conv [Cout, Cin/g, k...]
-> 1; ConvTranspose [Cin, Cout/g, k...] -> 0; MatMul [.., K, N] -> -2; Gemm B -> 1 with
transB else 0. N:M groups run along it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes.quantize._weights import matches
from slimgraph.passes.rewrite import constant

#: op type -> index of its weight input
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}
COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOATS = (np.float32, np.float16, np.float64)


@dataclasses.dataclass
class Target:
    layer: str
    op: str
    nodes: list[ir.Node]
    value: ir.Value
    array: np.ndarray
    #: the axis the layer sums over (None for a Gather table)
    reduction_axis: int | None

    @property
    def shape(self) -> str:
        return "x".join(map(str, self.array.shape))


def reduction_axis(node: ir.Node, ndim: int) -> int | None:
    """The axis of `node`'s weight that the layer sums over (see module docstring)."""
    op = node.op_type
    if op == "Conv":
        return 1
    if op == "ConvTranspose":
        return 0
    if op == "Gemm":
        return 1 if node.attributes.get_int("transB", 0) else 0
    if op == "MatMul":
        return ndim - 2
    return None


def _weight(node: ir.Node) -> ir.Value | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_INPUT:
        return None
    idx = WEIGHT_INPUT[node.op_type]
    if len(node.inputs) <= idx or node.inputs[idx] is None or constant(node.inputs[idx]) is None:
        return None
    if node.op_type == "Gather" and node.attributes.get_int("axis", 0) != 0:
        return None
    return node.inputs[idx]


def first_and_last(model: Model) -> tuple[set[int], set[int]]:
    """ids of the first and the last compute layers (constant-weight Conv/Gemm/MatMul with no
    such layer before, resp. after, them on any path through the graph)."""
    compute = [n for n in model.graph if n.op_type in COMPUTE and _weight(n) is not None]
    ids = {id(n) for n in compute}

    def reach(order, inputs_of, outputs_of):
        tainted: set[int] = set()  # values downstream (or upstream) of a compute layer
        ends = set()
        for node in order:
            hit = any(id(v) in tainted for v in inputs_of(node) if v is not None)
            if id(node) in ids and not hit:
                ends.add(id(node))
            if hit or id(node) in ids:
                tainted.update(id(v) for v in outputs_of(node) if v is not None)
        return ends

    nodes = list(model.graph)
    first = reach(nodes, lambda n: n.inputs, lambda n: n.outputs)
    last = reach(reversed(nodes), lambda n: n.outputs, lambda n: n.inputs)
    return first, last


def select(model: Model, *, min_size: int, exclude: tuple[str, ...], embeddings: bool, keep_first_last: bool,
           where: str, ops: tuple[str, ...] = COMPUTE + ("Gather",)) -> tuple[list[Target], list[dict]]:
    """(targets, skipped) where skipped lists {layer, reason} for the layers left dense on purpose.
    An exclude pattern that matches no layer is an error naming it."""
    first, last = first_and_last(model) if keep_first_last else (set(), set())
    used: set[str] = set()
    by_value: dict[int, Target] = {}
    skipped: list[dict] = []
    for node in model.graph:
        value = _weight(node)
        if value is None or node.op_type not in ops or (node.op_type == "Gather" and not embeddings):
            continue
        layer = node.name or value.name
        hit = matches(node, exclude, value) or (node.op_type if node.op_type in exclude else None)
        if hit:
            used.add(hit)
            skipped.append({"layer": layer, "reason": f"excluded by {hit!r}"})
            continue
        if id(node) in first or id(node) in last:
            skipped.append({"layer": layer, "reason": "first layer" if id(node) in first else "last layer"})
            continue
        if id(value) in by_value:  # shared weight: pruned once
            by_value[id(value)].nodes.append(node)
            continue
        array = constant(value)
        if array.dtype not in FLOATS or array.ndim < 2 or array.size < min_size:
            if array.dtype in FLOATS and array.ndim >= 2:
                skipped.append({"layer": layer, "reason": f"{array.size} elements < min_size {min_size}"})
            continue
        by_value[id(value)] = Target(layer, node.op_type, [node], value, array, reduction_axis(node, array.ndim))
    unused = [p for p in exclude if p not in used]
    if unused:
        raise PassError(where, f"exclude pattern(s) {unused} match no layer of the model; "
                        "check the names with `slimgraph inspect MODEL`")
    return list(by_value.values()), skipped


def layer_patterns(targets: list[Target], patterns: dict[str, float] | tuple[str, ...], where: str,
                   what: str) -> dict[int, str]:
    """id(target) -> the first pattern naming one of its nodes; patterns that name none are an error."""
    found: dict[int, str] = {}
    used = set()
    for t in targets:
        for node in t.nodes:
            hit = matches(node, list(patterns), t.value)
            if hit:
                found[id(t)] = hit
                used.add(hit)
                break
    unused = [p for p in patterns if p not in used]
    if unused:
        raise PassError(where, f"{what} pattern(s) {unused} match no prunable layer (excluded, first/last, "
                        "smaller than min_size, or misspelt); check the names with `slimgraph inspect MODEL`")
    return found


def set_weight(target: Target, array: np.ndarray) -> None:
    """Replace the initializer's data (every node reading it sees the new values)."""
    target.value.const_value = ir.tensor(np.ascontiguousarray(array.astype(target.array.dtype)),
                                         name=target.value.name)
