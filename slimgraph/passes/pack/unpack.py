"""unpack: fold the decode subgraphs of the `pack.*` passes back into plain initializers (exact).

`pack.sparse` and `pack.clusters` store a weight compactly and rebuild it with a small
subgraph of standard ops whose inputs are all initializers; the node producing the rebuilt
tensor carries `metadata_props["slimgraph.pack"] = "<kind>:<tensor>"` and the subgraph is
that node with every node it depends on. Only those nodes are touched (a decode-like subgraph without the mark, made by another tool, is left to
`fold_constants`). They are evaluated here with numpy (`decode`: a tiny interpreter of
the few ops the pack passes emit), each rebuilt tensor becomes an initializer with its
name, and the decode nodes and the initializers only they read are removed, so later
passes see ordinary dense weights. The `cleanup` recipe starts with this pass, so a packed
model loaded again can be optimized further (and packed again at the end).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassResult, register_pass
from slimgraph.passes.cluster._select import PACK_KEY



def _gather(data, idx, axis=0):
    return np.take(data, idx.astype(np.int64), axis=axis)


def _slice(data, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a)] = slice(int(s), int(e), int(st))
    return data[tuple(index)]


#: op -> f(node, *input arrays); exactly the ops the pack passes emit
_OPS = {
    "Cast": lambda n, x: x.astype(ir.DataType(n.attributes.get_int("to")).numpy()),
    "Gather": lambda n, d, i: _gather(d, i, n.attributes.get_int("axis", 0)),
    "Reshape": lambda n, x, s: x.reshape(tuple(int(d) for d in s)),
    "Slice": lambda n, x, *a: _slice(x, *a),
    "CumSum": lambda n, x, axis: np.cumsum(x, axis=int(axis), dtype=x.dtype),
    "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: a // b if a.dtype.kind in "iu" else a / b,
    "Mod": lambda n, a, b: np.fmod(a, b) if n.attributes.get_int("fmod", 0) else np.mod(a, b),
    "Add": lambda n, a, b: a + b,
    "Transpose": lambda n, x: np.transpose(x, n.attributes.get_ints("perm", None)),
    "Range": lambda n, start, limit, delta: np.arange(start, limit, delta, dtype=start.dtype),  # cluster.share(hashed)
    "Equal": lambda n, a, b: a == b,
    "Where": lambda n, c, a, b: np.where(c, a, b),
    "ConstantOfShape": lambda n, s: np.full(tuple(int(d) for d in s), n.attributes["value"].as_tensor().numpy().ravel()[0]),
    "ScatterElements": lambda n, d, i, u: _scatter(d, i, u),
    "ReduceSum": lambda n, x, axes=None: _reduce_sum(n, x, axes),
}


def _scatter(data, idx, updates):
    out = data.copy()  # 1-D, axis 0, no reduction: all the pack passes emit
    out[idx.astype(np.int64)] = updates
    return out


def _reduce_sum(node, x, axes=None):
    axes = node.attributes.get_ints("axes", None) if axes is None else axes
    return x.sum(axis=tuple(int(a) for a in axes), keepdims=bool(node.attributes.get_int("keepdims", 1)), dtype=x.dtype)


def pack_nodes(model: Model) -> list[ir.Node]:
    """Every node of every decode subgraph, in graph order: the marked nodes and their ancestors."""
    found: set[int] = set()
    stack = [n for n in model.graph if PACK_KEY in n.metadata_props]
    while stack:
        node = stack.pop()
        if id(node) in found:
            continue
        found.add(id(node))
        stack += [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
    return [n for n in model.graph if id(n) in found]


def decode(model: Model) -> dict[str, np.ndarray]:
    """{name: array} of every tensor a decode subgraph rebuilds (its outputs read by other
    nodes or by the graph's outputs). The model is not modified."""
    env: dict[int, np.ndarray] = {}
    nodes = pack_nodes(model)
    _evaluate(model, nodes, env)
    return {n.outputs[0].name: env[id(n.outputs[0])] for n in nodes if PACK_KEY in n.metadata_props}


def _evaluate(model: Model, nodes, env: dict[int, np.ndarray]) -> None:
    """Run `nodes` (standard decode ops, or calls of `pack.outline`'s functions) with numpy;
    `env` maps id(value) -> array and receives the outputs."""
    for node in nodes:
        args = []
        for v in node.inputs:
            if v is None:
                args.append(None)
            elif id(v) in env:
                args.append(env[id(v)])
            elif v.const_value is not None:
                args.append(v.const_value.numpy())
            else:
                raise PassError("unpack", f"decode node {node.name!r} reads {v.name!r}, which is neither "
                                "an initializer nor a decode output")
        function = model.ir.functions.get((node.domain, node.op_type, node.overload))
        if function is not None:  # pack.outline's shared decode: evaluate its body
            inner = {id(p): a for p, a in zip(function.inputs, args)}
            _evaluate(model, list(function), inner)
            env[id(node.outputs[0])] = inner[id(function.outputs[0])]
            continue
        fn = _OPS.get(node.op_type)
        if fn is None:
            raise PassError("unpack", f"decode node {node.name!r}: op {node.op_type} is not one the pack passes emit")
        env[id(node.outputs[0])] = np.asarray(fn(node, *[a for a in args if a is not None]))


@register_pass
class Unpack(Pass):
    """Fold slimgraph's pack decode subgraphs back into dense initializers (exact)."""

    name = "unpack"

    def run(self, model: Model, ctx) -> PassResult:
        nodes = pack_nodes(model)
        if not nodes:
            return PassResult(model, False, {"unpacked": 0})
        arrays = decode(model)
        graph = model.graph
        inputs = {id(v): v for n in nodes for v in n.inputs if v is not None and v.const_value is not None}
        for node in nodes:
            value = node.outputs[0]
            if value.name not in arrays:
                continue
            name = value.name
            value.name = f"{name}__packed"
            dense = ir.Value(name=name, const_value=ir.tensor(np.asarray(arrays[name], order="C"), name=name),
                             shape=ir.Shape(arrays[name].shape), type=value.type)
            graph.register_initializer(dense)
            value.replace_all_uses_with(dense, replace_graph_outputs=True)
        called = {(n.domain, n.op_type, n.overload) for n in nodes}
        for node in reversed(nodes):
            graph.remove(node, safe=True)
        still = {(n.domain, n.op_type, n.overload) for n in model.nodes(recursive=True)}
        for key in called & set(model.ir.functions) - still:
            del model.ir.functions[key]  # pack.outline's decode functions nobody calls any more
        # the packed inputs, and the rebuilt tensors only other decode nodes read (the
        # non-zero values pack.sparse's decoder took from pack.clusters')
        rebuilt = [graph.initializers[name] for name in arrays]
        for value in [*inputs.values(), *rebuilt]:
            if not value.uses() and value.name in graph.initializers and not value.is_graph_output():
                graph.initializers.pop(value.name)
        return PassResult(model, True, {"unpacked": len(arrays), "nodes_removed": len(nodes)})
