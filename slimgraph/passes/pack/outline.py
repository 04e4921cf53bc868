"""pack.outline: decode subgraphs of the same shape become calls of one model-local function (exact).

Every packed tensor carries its own decode subgraph (8 to 25 nodes); in a small model
those nodes are a good part of the file. Subgraphs that differ only in which
initializers they read (two pruned + clustered Conv weights, say) are the same
computation, so this pass writes it once as a model-local ONNX function (domain
`sg`, named `d0`, `d1`, ...) whose parameters are those initializers, and
replaces each subgraph by one call node, which keeps the `slimgraph.pack` mark of the
subgraph's last node. ONNX Runtime inlines model-local functions when it loads a model
and then folds the inlined constant subgraphs as before (tests compare ORT's optimized
graphs); `unpack` evaluates the function bodies.

Only subgraph shapes of at least MIN_NODES nodes that occur at least twice are outlined
(a function used once costs more than it saves). A subgraph is its marked last node and every node it depends on;
subgraphs sharing a node are left alone.
"""

from __future__ import annotations

import collections

import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassResult, register_pass
from slimgraph.passes.cluster._select import PACK_KEY, prepend
from slimgraph.passes.pack._decode import AFTER_WEIGHT_PASSES
from slimgraph.passes.pack.unpack import pack_nodes

#: short: every call node names it
DOMAIN = "sg"
#: smaller subgraphs are left inline (a call costs about as much as a few nodes)
MIN_NODES = 4


def decode_trees(model: Model) -> list[list[ir.Node]]:
    """Each decode subgraph whose result a non-decode node (or the graph) reads, in graph order."""
    nodes = pack_nodes(model)
    inside = {id(n) for n in nodes}
    order = {id(n): i for i, n in enumerate(nodes)}
    trees = []
    for node in nodes:
        out = node.outputs[0]
        if PACK_KEY not in node.metadata_props:
            continue
        if not out.is_graph_output() and all(id(u.node) in inside for u in out.uses()):
            continue  # an inner result (pack.clusters' values of a pack.sparse decode)
        found, stack = {}, [node]
        while stack:
            n = stack.pop()
            if id(n) not in found:
                found[id(n)] = n
                stack += [v.producer() for v in n.inputs if v is not None and v.producer() is not None]
        trees.append(sorted(found.values(), key=lambda n: order[id(n)]))
    return trees


def signature(tree: list[ir.Node]) -> tuple[tuple, list[ir.Value]]:
    """(hashable shape of the subgraph, its initializer inputs in first-use order)."""
    local = {id(n.outputs[0]): i for i, n in enumerate(tree)}
    params: dict[int, int] = {}
    values: list[ir.Value] = []
    shape = []
    for node in tree:
        refs = []
        for v in node.inputs:
            if v is None:
                refs.append(None)
            elif id(v) in local:
                refs.append(("n", local[id(v)]))
            else:
                if id(v) not in params:
                    params[id(v)] = len(values)
                    values.append(v)
                refs.append(("p", params[id(v)]))
        attrs = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))
        shape.append((node.domain, node.op_type, attrs, tuple(refs), len(node.outputs)))
    return tuple(shape), values


def _function(name: str, tree: list[ir.Node], params: list[ir.Value], opset: int) -> ir.Function:
    """The body of `tree` as a function of its initializer inputs. (Shared constants stay
    parameters: a Constant node costs two to four times an initializer's bytes.)"""
    inputs = [ir.Value(name=_short(len(tree) + i)) for i in range(len(params))]
    env = {id(p): inp for p, inp in zip(params, inputs)}
    body = []
    for i, node in enumerate(tree):
        clone = ir.Node(node.domain, node.op_type, [None if v is None else env[id(v)] for v in node.inputs],
                        list(node.attributes.values()), num_outputs=1, name="")
        clone.outputs[0].name = _short(i)
        env[id(node.outputs[0])] = clone.outputs[0]
        body.append(clone)
    graph = ir.Graph(inputs, [body[-1].outputs[0]], nodes=body, opset_imports={"": opset}, name=name)
    return ir.Function(DOMAIN, name, graph=graph, attributes=[])


def _short(i: int) -> str:
    """a .. z, ba, bb, ...: local names inside a function body."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return letters[i] if i < 26 else _short(i // 26) + letters[i % 26]


@register_pass
class PackOutline(Pass):
    """Write repeated decode subgraphs once, as model-local functions called per tensor (exact)."""

    name = "pack.outline"
    after = (*AFTER_WEIGHT_PASSES, "pack.sparse", "pack.clusters", "pack.narrow")

    def run(self, model: Model, ctx) -> PassResult:
        trees = decode_trees(model)
        seen: collections.Counter = collections.Counter(id(n) for t in trees for n in t)
        groups: dict[tuple, list[tuple[list[ir.Node], list[ir.Value]]]] = collections.defaultdict(list)
        for tree in trees:
            if all(seen[id(n)] == 1 for n in tree):
                shape, params = signature(tree)
                groups[shape].append((tree, params))
        graph, table, count = model.graph, [], len([f for f in model.ir.functions if f[0] == DOMAIN])
        for members in groups.values():
            if len(members) < 2 or len(members[0][0]) < MIN_NODES:
                continue
            name = f"d{count}"
            count += 1
            function = _function(name, members[0][0], members[0][1], model.opset)
            model.ir.functions[function.identifier()] = function
            for tree, params in members:
                root = tree[-1]
                call = ir.Node(DOMAIN, name, params, num_outputs=1, name="")
                call.metadata_props[PACK_KEY] = root.metadata_props[PACK_KEY]
                out = root.outputs[0]
                call.outputs[0].shape, call.outputs[0].type = out.shape, out.type
                out_name = out.name
                out.name = None
                out.replace_all_uses_with(call.outputs[0], replace_graph_outputs=True)
                call.outputs[0].name = out_name
                for node in reversed(tree):
                    graph.remove(node, safe=True)
                prepend(model, [call])
            table.append({"function": name, "calls": len(members), "nodes_per_call": len(members[0][0]),
                          "params": len(members[0][1])})
        if not table:
            return PassResult(model, False, {"outlined": 0})
        model.ir.opset_imports[DOMAIN] = 1
        return PassResult(model, True, {"outlined": sum(r["calls"] for r in table), "table": table})
