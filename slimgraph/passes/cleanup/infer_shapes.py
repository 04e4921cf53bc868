"""infer_shapes: annotate every value with its dtype and shape (exact: no node changes).

ONNX shape inference with data propagation; shapes it cannot infer stay unknown. A
failing inference leaves the model unchanged (logged), since a model ORT runs can still
have ops ONNX cannot infer (custom domains).
"""

from __future__ import annotations

from onnx_ir.passes.common import ShapeInferencePass

from slimgraph.passes.base import Pass, PassResult, register_pass
from slimgraph.passes.cleanup._onnx_ir import run_ir_pass


@register_pass
class InferShapes(Pass):
    """Infer and store dtypes/shapes of all values (exact)."""

    name = "infer_shapes"
    preserves = ("params", "macs", "consumers")

    def run(self, model, ctx) -> PassResult:
        return run_ir_pass(ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True), model)
