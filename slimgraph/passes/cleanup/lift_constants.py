"""lift_constants: turn `Constant` nodes into initializers (exact).

Exporters from other toolchains (PaddlePaddle, TF converters, old torch) store weights as
`Constant` nodes; every later pass looks for weights among initializers, so this runs
first. Small scalar constants are lifted too (`size_limit=0`), so patterns see them.
"""

from __future__ import annotations

from onnx_ir.passes.common import LiftConstantsToInitializersPass

from slimgraph.passes.base import Pass, PassConfig, PassResult, int_range, register_pass
from slimgraph.passes.cleanup._onnx_ir import run_ir_pass


@register_pass
class LiftConstants(Pass):
    """Lift Constant nodes (main graph and subgraphs) to initializers (exact)."""

    name = "lift_constants"
    preserves = ("shapes", "macs")

    class Config(PassConfig):
        size_limit: int = int_range(0, 1 << 20, default=0)

    def run(self, model, ctx) -> PassResult:
        before = sum(1 for n in model.nodes(recursive=True) if n.op_type == "Constant" and not n.domain)
        ir_pass = LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=self.config.size_limit)
        result = run_ir_pass(ir_pass, model)
        after = sum(1 for n in model.nodes(recursive=True) if n.op_type == "Constant" and not n.domain)
        result.stats["lifted"] = before - after
        return result
