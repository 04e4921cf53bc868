"""cse: common-subexpression elimination (exact).

Two nodes with the same op, attributes and inputs compute the same value; the second
is replaced by the first. Nodes with subgraphs larger than `size_limit` and
non-deterministic ops (RandomNormal, ...) are never merged (onnx-ir's rules).
"""

from __future__ import annotations

from onnx_ir.passes.common import CommonSubexpressionEliminationPass

from slimgraph.passes.base import Pass, PassConfig, PassResult, int_range, register_pass
from slimgraph.passes.cleanup._onnx_ir import run_ir_pass


@register_pass
class CSE(Pass):
    """Merge duplicate computations (same op, attributes and inputs) (exact)."""

    name = "cse"
    preserves = ("shapes",)

    class Config(PassConfig):
        size_limit: int = int_range(0, 1000, default=10)

    def run(self, model, ctx) -> PassResult:
        before = len(list(model.nodes(recursive=True)))
        result = run_ir_pass(CommonSubexpressionEliminationPass(size_limit=self.config.size_limit), model)
        result.stats["merged"] = before - len(list(model.nodes(recursive=True)))
        return result
