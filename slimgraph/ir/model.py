"""The `Model` facade: an onnx-ir model plus what compression needs.

onnx-ir owns the graph (nodes, values, producers/uses, subgraphs, tensors). This class
adds only:

1. a version counter, bumped by every pass that reports `modified=True`;
2. a content hash per version (sha256 of the serialized model);
3. an analysis cache keyed by (analysis name, version), so analyses are recomputed only
   after the model changed, unless the modifying pass declared it preserves them;
4. typed annotations on nodes: persistent ones go to `metadata_props` (saved with the
   file), transient ones to `meta` (dropped on save);
5. provenance: which torch module or source node a node came from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

import onnx
import onnx_ir as ir

# Keys slimgraph writes into node.metadata_props. Namespaced so they never clash.
ANNOTATION_PREFIX = "slimgraph."
PROVENANCE_KEY = "slimgraph.provenance"
# The torch ONNX exporter records the module path of each node under this key.
TORCH_SCOPE_KEYS = ("pkg.torch.onnx.name_scopes", "namespace")


class Model:
    """A model being compressed. Wraps `onnx_ir.Model`; see module docstring."""

    def __init__(self, ir_model: ir.Model, *, source: str | None = None):
        self.ir = ir_model
        self.source = source
        self.version = 0
        self._hash: tuple[int, str] | None = None
        self._analyses: dict[str, tuple[int, Any]] = {}

    # -- graph access -------------------------------------------------------------------
    @property
    def graph(self) -> ir.Graph:
        return self.ir.graph

    @property
    def opset(self) -> int:
        return self.ir.opset_imports.get("", 1)

    def nodes(self, *, recursive: bool = False) -> Iterator[ir.Node]:
        """The nodes of the main graph, or of every subgraph too when `recursive`."""
        if recursive:
            yield from ir.traversal.RecursiveGraphIterator(self.graph)
        else:
            yield from self.graph

    def node(self, name: str) -> ir.Node:
        for n in self.nodes(recursive=True):
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in the model")

    def initializer_array(self, value: ir.Value):
        """The numpy array of a constant value (an initializer or a Constant's output)."""
        if value.const_value is None:
            return None
        return value.const_value.numpy()

    # -- versions, hashing, analyses ----------------------------------------------------
    def bump(self, preserves: Iterable[str] = ()) -> None:
        """Record a modification: new version, drop cached analyses not preserved."""
        self.version += 1
        keep = set(preserves)
        self._analyses = {
            k: (self.version, v) for k, (_, v) in self._analyses.items() if k in keep
        }

    def content_hash(self) -> str:
        """sha256 of the serialized model, computed once per version."""
        if self._hash is None or self._hash[0] != self.version:
            data = ir.to_proto(self.ir).SerializeToString(deterministic=True)
            self._hash = (self.version, hashlib.sha256(data).hexdigest())
        return self._hash[1]

    def analysis(self, name: str) -> Any:
        """Run (or fetch from cache) the named analysis for the current version."""
        from slimgraph.ir.analysis import ANALYSES

        cached = self._analyses.get(name)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        if name not in ANALYSES:
            raise KeyError(f"unknown analysis {name!r}; known: {sorted(ANALYSES)}")
        value = ANALYSES[name](self)
        self._analyses[name] = (self.version, value)
        return value

    # -- copies and conversion ----------------------------------------------------------
    def clone(self) -> Model:
        """A deep copy (through the proto), so passes can mutate it freely."""
        proto = ir.to_proto(self.ir)
        copy = Model(ir.from_proto(proto), source=self.source)
        copy.version = self.version
        return copy

    def to_proto(self) -> onnx.ModelProto:
        return ir.to_proto(self.ir)

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString()

    # -- annotations and provenance -----------------------------------------------------
    @staticmethod
    def annotate(node: ir.Node, key: str, value: Any, *, persist: bool = True) -> None:
        """Attach an annotation. Persistent ones are JSON in metadata_props (saved)."""
        full = key if key.startswith(ANNOTATION_PREFIX) else ANNOTATION_PREFIX + key
        if persist:
            node.metadata_props[full] = json.dumps(value, sort_keys=True)
        else:
            node.meta[full] = value

    @staticmethod
    def annotation(node: ir.Node, key: str, default: Any = None) -> Any:
        full = key if key.startswith(ANNOTATION_PREFIX) else ANNOTATION_PREFIX + key
        if full in node.meta:
            return node.meta[full]
        if full in node.metadata_props:
            return json.loads(node.metadata_props[full])
        return default

    @staticmethod
    def provenance(node: ir.Node) -> str | None:
        """Where a node came from: a torch module path, or the source node's name."""
        if PROVENANCE_KEY in node.metadata_props:
            return node.metadata_props[PROVENANCE_KEY]
        for key in TORCH_SCOPE_KEYS:
            if key in node.metadata_props:
                return node.metadata_props[key]
        return None

    def __repr__(self) -> str:
        g = self.graph
        return (
            f"Model(opset={self.opset}, nodes={len(g)}, inputs={[v.name for v in g.inputs]}, "
            f"outputs={[v.name for v in g.outputs]}, version={self.version})"
        )
