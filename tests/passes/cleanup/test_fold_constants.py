import numpy as np

from slimgraph.passes import get_pass
from tests.helpers import assert_same_outputs, ops, parse


def test_constant_subexpression_is_folded():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[4] x) => (float[4] y) {
        a = Constant <value = float[4] {1, 2, 3, 4}> ()
        b = Constant <value = float[4] {10, 20, 30, 40}> ()
        s = Add (a, b)
        t = Mul (s, s)
        y = Add (x, t)
    }
    """)
    before = model.clone()
    result = get_pass("fold_constants")()(model)
    assert result.modified and result.stats["nodes_removed"] == 2
    # The computation is folded into an initializer; the now-unused Constant nodes are
    # eliminate_dead's job (the cleanup recipe runs both).
    assert [op for op in ops(model) if op != "Constant"] == ["Add"]
    np.testing.assert_array_equal(model.graph.initializers["t"].const_value.numpy(), [121, 484, 1089, 1936])
    assert_same_outputs(before, model, {"x": np.arange(4, dtype=np.float32)})


def test_shape_of_static_tensor_is_folded():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2,3,4] x) => (float[2,12] y) {
        s = Shape <end = 1> (x)
        m = Constant <value = int64[1] {-1}> ()
        shape = Concat <axis = 0> (s, m)
        y = Reshape (x, shape)
    }
    """)
    before = model.clone()
    assert get_pass("fold_constants")()(model).modified
    assert [op for op in ops(model) if op != "Constant"] == ["Reshape"]
    assert_same_outputs(before, model, {"x": np.ones((2, 3, 4), np.float32)})


def test_dynamic_input_is_not_folded():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[N] x) => (float[N] y) {
        y = Relu (x)
    }
    """)
    result = get_pass("fold_constants")()(model)
    assert not result.modified
    assert ops(model) == ["Relu"]


def test_output_size_limit_keeps_large_results_unfolded():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[1] x) => (float[64] y) {
        shape = Constant <value = int64[1] {64}> ()
        big = ConstantOfShape <value = float[1] {1}> (shape)
        y = Add (big, x)
    }
    """)
    result = get_pass("fold_constants")(output_size_limit=16)(model)
    assert "ConstantOfShape" in ops(model)
    del result


def test_small_constant_of_shape_chain_is_folded():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[4] x) => (float[8] y) {
        shape = Constant <value = int64[1] {4}> ()
        pad = ConstantOfShape <value = float[1] {0}> (shape)
        y = Concat <axis = 0> (pad, x)
    }
    """)
    before = model.clone()
    assert get_pass("fold_constants")()(model).modified
    assert [op for op in ops(model) if op != "Constant"] == ["Concat"]
    assert_same_outputs(before, model, {"x": np.arange(4, dtype=np.float32)})
