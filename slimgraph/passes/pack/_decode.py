"""What the pack passes share: a builder of decode subgraphs. Each packed tensor becomes
small initializers plus nodes of standard ops whose inputs are all initializers (ORT folds
them at session creation); node names are short (they add up in small files) and the last
node, which produces the tensor under its original name, carries the PACK_KEY mark that
`unpack` starts from."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.cluster._select import PACK_KEY
from slimgraph.passes.quantize._weights import _attr


class DecodeBuilder:
    def __init__(self, model: Model, kind: str, prefix: str):
        self.model, self.graph = model, model.graph
        self.kind, self.prefix = kind, prefix
        self.nodes: list[ir.Node] = []
        self._shared: dict[str, ir.Value] = {}
        self._taken: set[str] | None = None
        self._count = 0

    def init(self, array: np.ndarray, name: str) -> ir.Value:
        """A new initializer (its name made unique)."""
        base, i = name, 0
        while name in self.graph.initializers:
            i += 1
            name = f"{base}_{i}"
        t = ir.tensor(np.asarray(array, order="C"), name=name)
        v = ir.Value(name=name, const_value=t, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype))
        self.graph.register_initializer(v)
        return v

    def constant(self, array: np.ndarray, name: str) -> ir.Value:
        """A small constant shared by every decode subgraph of this run."""
        if name not in self._shared:
            self._shared[name] = self.init(array, name)
        return self._shared[name]

    def node(self, op: str, inputs: list[ir.Value], target: str, out_name: str | None = None, **attrs) -> ir.Value:
        """A decode node; the one producing `out_name` (the rebuilt tensor) is marked."""
        if self._taken is None:
            self._taken = {n.name for n in self.graph} | {v.name for n in self.graph for v in n.outputs}
        while f"{self.prefix}{self._count}" in self._taken:
            self._count += 1
        short = f"{self.prefix}{self._count}"
        self._taken.add(short)
        node = ir.Node("", op, inputs, [_attr(k, v) for k, v in attrs.items()], name=short)
        if out_name is not None:
            node.metadata_props[PACK_KEY] = f"{self.kind}:{target}"
        node.outputs[0].name = out_name or short
        self.nodes.append(node)
        return node.outputs[0]
