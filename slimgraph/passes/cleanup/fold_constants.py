"""fold_constants: evaluate nodes whose inputs are all constant (exact).

Wraps onnxscript's constant folder, which also propagates shapes it can prove (a
`Shape` of a static tensor becomes a constant). Outputs above `output_size_limit`
elements are left unfolded: folding them would grow the file (decoder subgraphs of
compressed weights are folded by ORT at session creation instead).
"""

from __future__ import annotations

from onnxscript.optimizer._constant_folding import FoldConstantsPass

from slimgraph.passes.base import Pass, PassConfig, PassResult, int_range, register_pass
from slimgraph.passes.cleanup._onnx_ir import run_ir_pass


@register_pass
class FoldConstants(Pass):
    """Fold nodes whose inputs are all constants into initializers (exact)."""

    name = "fold_constants"

    class Config(PassConfig):
        input_size_limit: int = int_range(0, 1 << 26, default=1 << 20, log=True)
        output_size_limit: int = int_range(0, 1 << 26, default=1 << 20, log=True)
        shape_inference: bool = True

    def run(self, model, ctx) -> PassResult:
        before = len(list(model.nodes(recursive=True)))
        ir_pass = FoldConstantsPass(
            shape_inference=self.config.shape_inference,
            input_size_limit=self.config.input_size_limit,
            output_size_limit=self.config.output_size_limit,
        )
        result = run_ir_pass(ir_pass, model)
        result.stats["nodes_removed"] = before - len(list(model.nodes(recursive=True)))
        return result
