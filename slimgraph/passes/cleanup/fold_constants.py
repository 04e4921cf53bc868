"""fold_constants: evaluate nodes whose inputs are all constant (exact).

Wraps onnxscript's constant folder, which also propagates shapes it can prove (a
`Shape` of a static tensor becomes a constant). Outputs above `output_size_limit`
elements are left unfolded: folding them would grow the file (decoder subgraphs of
compressed weights are folded by ORT at session creation instead).

onnxscript never folds `ConstantOfShape` by default (its output can be large); here one
with a constant shape of at most `constant_of_shape_limit` elements is folded, which
lets the constant chains it starts (STFT padding in silero-vad) fold away.
"""

from __future__ import annotations

import numpy as np
from onnxscript.optimizer._constant_folding import FoldConstantsPass

from slimgraph.passes.base import Pass, PassConfig, PassResult, int_range, register_pass
from slimgraph.passes.cleanup._onnx_ir import run_ir_pass


def _constant_shape_size(node) -> int | None:
    shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
    return None if shape is None else int(np.prod(shape.numpy()))


@register_pass
class FoldConstants(Pass):
    """Fold nodes whose inputs are all constants into initializers (exact)."""

    name = "fold_constants"

    class Config(PassConfig):
        input_size_limit: int = int_range(0, 1 << 26, default=1 << 20, log=True)
        output_size_limit: int = int_range(0, 1 << 26, default=1 << 20, log=True)
        shape_inference: bool = True
        constant_of_shape_limit: int = int_range(0, 1 << 20, default=1024, log=True)

    def _should_fold(self, node) -> bool | None:
        """True for a small ConstantOfShape; None leaves the decision to onnxscript."""
        if node.op_type == "ConstantOfShape" and not node.domain:
            size = _constant_shape_size(node)
            if size is not None and size <= self.config.constant_of_shape_limit:
                return True
        return None

    def run(self, model, ctx) -> PassResult:
        before = len(list(model.nodes(recursive=True)))
        ir_pass = FoldConstantsPass(
            shape_inference=self.config.shape_inference,
            input_size_limit=self.config.input_size_limit,
            output_size_limit=self.config.output_size_limit,
            should_fold=self._should_fold,
        )
        result = run_ir_pass(ir_pass, model)
        result.stats["nodes_removed"] = before - len(list(model.nodes(recursive=True)))
        return result
