import numpy as np

from slimgraph.passes import get_pass
from tests.helpers import assert_same_outputs, ops, parse


def test_inner_identity_is_removed():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[3] x) => (float[3] y) {
        a = Identity (x)
        y = Relu (a)
    }
    """)
    before = model.clone()
    result = get_pass("eliminate_identity")()(model)
    assert result.modified and ops(model) == ["Relu"]
    assert_same_outputs(before, model, {"x": np.array([-1, 0, 2], np.float32)})


def test_output_identity_keeps_the_output_name():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[3] x) => (float[3] y) {
        a = Relu (x)
        y = Identity (a)
    }
    """)
    assert get_pass("eliminate_identity")()(model).modified
    assert ops(model) == ["Relu"] and [v.name for v in model.graph.outputs] == ["y"]


def test_input_to_output_identity_is_kept():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[3] x) => (float[3] y) {
        y = Identity (x)
    }
    """)
    assert not get_pass("eliminate_identity")()(model).modified


def test_branch_output_identity_of_outer_value_is_kept():
    # silero-vad's If branches look like this; onnx-ir's own pass crashes on it.
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (bool c, float[2] x) => (float[2] y, float[2] r) {
        r = Relu (x)
        y = If (c) <
            then_branch = t () => (float[2] a) { a = Identity (r) },
            else_branch = e () => (float[2] b) { b = Neg (x) }
        >
    }
    """)
    before = model.clone()
    result = get_pass("eliminate_identity")()(model)
    assert not result.modified
    for c in (True, False):
        assert_same_outputs(before, model, {"c": np.array(c), "x": np.array([-3, 4], np.float32)})
