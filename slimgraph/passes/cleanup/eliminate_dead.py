"""eliminate_dead: remove nodes, initializers, functions and opset imports nothing uses (exact).

The model's inputs and outputs are kept as they are, even if an input is unused: the
signature is the model's contract with its callers.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from slimgraph.passes.base import Pass, PassResult, register_pass


@register_pass
class EliminateDead(Pass):
    """Remove unused nodes, initializers, functions and opset imports (exact)."""

    name = "eliminate_dead"
    preserves = ("shapes",)

    def run(self, model, ctx) -> PassResult:
        nodes = len(list(model.nodes(recursive=True)))
        inits = len(model.graph.initializers)
        opsets = len(model.ir.opset_imports)
        seq = ir.passes.Sequential(RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass())
        result = seq(model.ir)
        model.ir = result.model
        stats = {
            "nodes_removed": nodes - len(list(model.nodes(recursive=True))),
            "initializers_removed": inits - len(model.graph.initializers),
            "opset_imports_removed": opsets - len(model.ir.opset_imports),
        }
        return PassResult(model, modified=bool(result.modified), stats=stats)
