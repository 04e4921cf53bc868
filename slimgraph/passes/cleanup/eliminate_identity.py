"""eliminate_identity: remove `Identity` nodes (exact).

For `y = Identity(x)` in any graph or subgraph:

1. `y` is not a graph output: every use of `y` reads `x` instead; the node goes.
2. `y` is an output of its graph and `x` is an ordinary value of the same graph (not
   an input, an initializer, or already an output of some graph): `x` takes `y`'s
   place and name in the outputs; the node goes.
3. Otherwise the node stays: removing it would merge an input or initializer with an
   output, make one value two outputs, or rename a value of an enclosing scope.

onnx-ir's IdentityEliminationPass misses the last two conditions of case 3 and crashes
on silero-vad's `If` branches, whose outputs are Identities of outer-scope values.
"""

from __future__ import annotations

import onnx_ir as ir

from slimgraph.passes.base import Pass, PassResult, register_pass


def _defined_in(value: ir.Value, graph: ir.Graph | ir.Function) -> bool:
    producer = value.producer()
    return producer is not None and producer.graph is graph


def _try_remove(node: ir.Node) -> bool:
    if node.op_type != "Identity" or node.domain or len(node.inputs) != 1 or len(node.outputs) != 1:
        return False
    x, y = node.inputs[0], node.outputs[0]
    graph = node.graph
    if x is None or graph is None:
        return False
    if y.is_graph_output():
        if not _defined_in(x, graph) or x.is_graph_output():  # case 3
            return False
        if x.shape is None:
            x.shape = y.shape
        if x.type is None:
            x.type = y.type
        ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
        x.name = y.name  # case 2: the output keeps its public name
    else:
        if x.type is None:
            x.type = y.type
        ir.convenience.replace_all_uses_with(y, x)  # case 1
    graph.remove(node, safe=True)
    return True


def remove_identities(model) -> int:
    """Apply the cases above everywhere in `model`; return how many nodes were removed."""
    removed = 0
    for graph in [model.graph, *model.ir.functions.values()]:
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            removed += _try_remove(node)
    return removed


@register_pass
class EliminateIdentity(Pass):
    """Remove Identity nodes, keeping the model's input/output names (exact)."""

    name = "eliminate_identity"
    preserves = ("shapes", "macs", "params")

    def run(self, model, ctx) -> PassResult:
        removed = remove_identities(model)
        return PassResult(model, modified=removed > 0, stats={"removed": removed})
