import numpy as np

from slimgraph.passes import get_pass
from tests.helpers import assert_same_outputs, ops, parse


def test_duplicate_computation_is_merged():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[3] x) => (float[3] y) {
        a = Relu (x)
        b = Relu (x)
        y = Add (a, b)
    }
    """)
    before = model.clone()
    result = get_pass("cse")()(model)
    assert result.modified and result.stats["merged"] == 1
    assert ops(model) == ["Relu", "Add"]
    assert_same_outputs(before, model, {"x": np.array([-1, 0, 2], np.float32)})


def test_different_attributes_are_not_merged():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[3] x) => (float[3] y) {
        a = LeakyRelu <alpha = 0.1> (x)
        b = LeakyRelu <alpha = 0.2> (x)
        y = Add (a, b)
    }
    """)
    assert not get_pass("cse")()(model).modified
    assert ops(model) == ["LeakyRelu", "LeakyRelu", "Add"]


def test_random_ops_are_not_merged():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[3] x) => (float[3] y) {
        a = RandomUniformLike (x)
        b = RandomUniformLike (x)
        y = Add (a, b)
    }
    """)
    assert not get_pass("cse")()(model).modified
