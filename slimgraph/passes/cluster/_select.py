"""Which weights the clustering passes touch, and how a weight is seen as codebook rows.

A `Target` is one constant weight initializer (shared weights appear once) of a Conv,
ConvTranspose, Gemm or MatMul, or a Gather table, with the axis of its output channels:
Conv [Cout, Cin/g, kh, kw] -> 0; ConvTranspose [Cin, Cout/g, ...] -> 1; MatMul [.., K, N]
-> last; Gemm B -> 0 with transB else 1; Gather table [V, D] -> 1 (one codebook per
embedding dimension, so 384 codebooks for MiniLM rather than 30,522).
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


@dataclasses.dataclass
class Target:
    layer: str
    op: str
    value: ir.Value
    array: np.ndarray
    channel_axis: int

    @property
    def node(self) -> ir.Node:
        return next(u.node for u in self.value.uses() if u.node.op_type == self.op)

    @property
    def input_axis(self) -> int | None:
        """The weight axis that multiplies the layer input's channels (None: embeddings,
        grouped convolutions, transposed activations)."""
        from slimgraph.passes.prune._targets import reduction_axis

        node = self.node
        if node.attributes.get_int("group", 1) != 1 or node.attributes.get_int("transA", 0) or self.op == "ConvTranspose":
            return None
        return reduction_axis(node, self.array.ndim)

    def rows(self, granularity: str) -> np.ndarray:
        """[R, n] view for k-means: one row per output channel, or a single row."""
        if granularity == "tensor":
            return self.array.reshape(1, -1)
        moved = np.moveaxis(self.array, self.channel_axis, 0)
        return moved.reshape(moved.shape[0], -1)

    def rows_of(self, array: np.ndarray, granularity: str) -> np.ndarray:
        """`array` (shaped like the weight) laid out as `rows` lays out the weight."""
        return dataclasses.replace(self, array=np.ascontiguousarray(array)).rows(granularity)

    def from_rows(self, rows: np.ndarray, granularity: str) -> np.ndarray:
        if granularity == "tensor":
            return rows.reshape(self.array.shape)
        moved_shape = np.moveaxis(self.array, self.channel_axis, 0).shape
        return np.moveaxis(rows.reshape(moved_shape), 0, self.channel_axis)


def _channel_axis(node: ir.Node, array: np.ndarray) -> int:
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return array.ndim - 1 if op == "MatMul" else 1


def select(model: Model, *, min_size: int, embeddings: bool, exclude: tuple[str, ...], where: str) -> list[Target]:
    """Every float weight initializer worth clustering; exclusion patterns that match no
    layer are an error naming them (a typo would otherwise silently cluster everything)."""
    used: set[str] = set()
    seen: set[int] = set()
    targets = []
    for node in model.graph:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op not in WEIGHT_INPUT or (op == "Gather" and not embeddings):
            continue
        idx = WEIGHT_INPUT[op]
        if len(node.inputs) <= idx or node.inputs[idx] is None:
            continue
        value = node.inputs[idx]
        hit = matches(node, exclude, value) or (op if op in exclude else None)
        if hit:
            used.add(hit)
            continue
        array = constant(value)
        if array is None or value.name not in model.graph.initializers or id(value) in seen:
            continue
        if array.dtype not in (np.float32, np.float16) or array.size < min_size or array.ndim < 2:
            continue
        if op == "Gather" and (node.attributes.get_int("axis", 0) != 0 or array.ndim != 2):
            continue
        seen.add(id(value))
        targets.append(Target(node.name or value.name, op, value, array, _channel_axis(node, array)))
    unused = [p for p in exclude if p not in used]
    if unused:
        raise PassError(where, f"exclude pattern(s) {unused} match no layer of the model; "
                        "check the names with `slimgraph inspect MODEL`")
    return targets


def set_weight(model: Model, target: Target, array: np.ndarray) -> None:
    """Replace the initializer's data in place (every node reading it sees the new values)."""
    target.value.const_value = ir.tensor(np.ascontiguousarray(array), name=target.value.name)


def distinct_per_row(rows: np.ndarray) -> np.ndarray:
    """Number of distinct values in each row of a 2-D array."""
    if rows.shape[1] == 0:
        return np.zeros(len(rows), dtype=np.int64)
    s = np.sort(rows, axis=1)
    return 1 + (np.diff(s, axis=1) != 0).sum(axis=1)


#: metadata key on every node of a decode subgraph written by a `pack.*` pass; its value is
#: "<kind>:<name of the tensor it rebuilds>"
PACK_KEY = "slimgraph.pack"


def packed_shapes(model: Model) -> set[tuple[int, ...]]:
    """Shapes of the tensors that `pack.*` decode subgraphs rebuild (their final outputs)."""
    shapes = set()
    for node in model.graph:
        mark = node.metadata_props.get(PACK_KEY)
        if mark and node.outputs[0].name == mark.split(":", 1)[1] and node.outputs[0].shape is not None:
            shapes.add(tuple(node.outputs[0].shape))
    return shapes


def prepend(model: Model, nodes: list[ir.Node]) -> None:
    """Put decode nodes at the start of the graph (their inputs are all initializers)."""
    first = next(iter(model.graph), None)
    if first is None:
        model.graph.extend(nodes)
    else:
        model.graph.insert_before(first, nodes)
