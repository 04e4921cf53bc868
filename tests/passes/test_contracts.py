"""Contracts recorded by one pass are checked by the PassManager after every later pass."""

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph.errors import PassError
from slimgraph.passes import Pass, PassResult, contracts, register_pass
from tests.helpers import parse

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4] x) => (float[2, 3] y) <float[4, 3] w = {1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0}> {
  y = MatMul(x, w)
}
"""


@contracts.check_for("test.zeros")
def _zeros_hold(model, record):
    zeros = sum(int((np.asarray(v.const_value.numpy()) == 0).sum()) for v in model.graph.initializers.values())
    return None if zeros >= record["zeros"] else f"{zeros} zeros left of {record['zeros']}"


@register_pass
class _RecordZeros(Pass):
    """test: records the zeros of the weights"""
    name = "test.record_zeros"

    def run(self, model, ctx):
        contracts.add(model, "test.zeros", {"zeros": 6})
        return PassResult(model, True)


@register_pass
class _Densify(Pass):
    """test: fills the zeros (breaks the contract)"""
    name = "test.densify"
    exact = False

    def run(self, model, ctx):
        w = model.graph.initializers["w"]
        w.const_value = ir.tensor(np.ones((4, 3), np.float32), name="w")
        return PassResult(model, True)


def test_contract_survives_save_and_is_checked(tmp_path):
    model = slimgraph.load(parse(MODEL))
    out = slimgraph.run(model, "test.record_zeros").model
    assert contracts.records(out) == [("test.zeros", {"zeros": 6})]
    slimgraph.save(out, tmp_path / "m.onnx")
    again = slimgraph.load(tmp_path / "m.onnx")
    assert contracts.check(again) == []
    with pytest.raises(PassError, match=r"test.densify.*test.zeros contract broken: 0 zeros left of 6"):
        slimgraph.run(again, "test.densify")


def test_add_replaces_same_id_and_drop_removes():
    model = slimgraph.load(parse(MODEL))
    contracts.add(model, "test.zeros", {"id": "a", "zeros": 1})
    contracts.add(model, "test.zeros", {"id": "a", "zeros": 2})
    contracts.add(model, "test.zeros", {"id": "b", "zeros": 3})
    assert [r["zeros"] for _, r in contracts.records(model)] == [2, 3]
    assert contracts.drop(model, "test.zeros") == 2
    assert contracts.records(model) == []
