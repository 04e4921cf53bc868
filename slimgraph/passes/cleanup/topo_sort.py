"""topo_sort: order nodes topologically, in every graph and subgraph (exact).

Passes that add nodes may append them out of order; ONNX requires topological order.
"""

from __future__ import annotations

from onnx_ir.passes.common import TopologicalSortPass

from slimgraph.passes.base import Pass, PassResult, register_pass
from slimgraph.passes.cleanup._onnx_ir import run_ir_pass


@register_pass
class TopoSort(Pass):
    """Sort nodes topologically (exact)."""

    name = "topo_sort"
    preserves = ("shapes", "params", "macs", "consumers")

    def run(self, model, ctx) -> PassResult:
        return run_ir_pass(TopologicalSortPass(), model)
