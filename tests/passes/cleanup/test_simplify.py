import numpy as np

from slimgraph.passes import get_pass
from tests.helpers import assert_same_outputs, ops, parse


def test_algebraic_no_ops_are_removed():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) <float zero = {0.0}, float one = {1.0}> {
        a = Add (x, zero)
        b = Mul (a, one)
        c = Cast <to = 1> (b)
        d = Dropout (c)
        y = Relu (d)
    }
    """)
    before = model.clone()
    get_pass("infer_shapes")()(model)  # the Cast rule needs to know the input type
    result = get_pass("simplify")()(model)
    assert result.modified and ops(model) == ["Relu"]
    assert_same_outputs(before, model, {"x": np.array([[-1, 2, 3], [4, -5, 6]], np.float32)})


def test_transpose_pair_and_min_max_chain_collapse():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) <float lo = {0.0}, float hi = {6.0}> {
        t = Transpose <perm = [1, 0]> (x)
        u = Transpose <perm = [1, 0]> (t)
        m = Max (u, lo)
        y = Min (m, hi)
    }
    """)
    before = model.clone()
    assert get_pass("simplify")()(model).modified
    assert ops(model) == ["Clip"]
    assert_same_outputs(before, model, {"x": np.array([[-1, 2, 3], [4, -5, 9]], np.float32)})


def test_broadcasting_add_of_zero_is_kept():
    # x + zeros[2,3] with x of shape [3] changes the output shape: not a no-op.
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[2,3] y) <float[2,3] zero = {0,0,0,0,0,0}> {
        y = Add (x, zero)
    }
    """)
    assert not get_pass("simplify")()(model).modified
    assert ops(model) == ["Add"]


def test_dropout_whose_mask_is_used_is_kept():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y, bool[3] mask) {
        y, mask = Dropout (x)
    }
    """)
    assert not get_pass("simplify")()(model).modified
    assert ops(model) == ["Dropout"]
