"""Adapter: run an onnx-ir pass on a slimgraph `Model`. onnx-ir's passes already report
`modified` truthfully, so wrapping them is all the cleanup family needs to do."""

from __future__ import annotations

import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.base import PassResult


def run_ir_pass(ir_pass: ir.passes.PassBase, model: Model, **stats) -> PassResult:
    result = ir_pass(model.ir)
    model.ir = result.model
    return PassResult(model, modified=bool(result.modified), stats=stats)
