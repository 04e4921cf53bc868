import numpy as np

from slimgraph.passes import get_pass
from tests.helpers import assert_same_outputs, ops, parse

MODEL = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[2,3] x) => (float[2,4] y) {
    w = Constant <value = float[3,4] {1,2,3,4,5,6,7,8,9,10,11,12}> ()
    b = Constant <value_float = 0.5> ()
    m = MatMul (x, w)
    y = Add (m, b)
}
"""


def test_constants_become_initializers():
    model = parse(MODEL)
    before = model.clone()
    result = get_pass("lift_constants")()(model)
    assert result.modified and result.stats["lifted"] == 2
    assert ops(model) == ["MatMul", "Add"]
    assert set(model.graph.initializers) == {"w", "b"}
    assert_same_outputs(before, model, {"x": np.ones((2, 3), np.float32)})


def test_no_constants_means_not_modified():
    model = parse(MODEL)
    get_pass("lift_constants")()(model)
    again = get_pass("lift_constants")()(model)
    assert not again.modified and again.stats["lifted"] == 0


def test_constants_inside_if_branches_are_lifted():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (bool c, float[2] x) => (float[2] y) {
        y = If (c) <
            then_branch = t () => (float[2] a) { k = Constant <value = float[2] {1, 2}> () a = Add (x, k) },
            else_branch = e () => (float[2] b) { b = Identity (x) }
        >
    }
    """)
    before = model.clone()
    assert get_pass("lift_constants")()(model).modified
    assert not any(n.op_type == "Constant" for n in model.nodes(recursive=True))
    for c in (True, False):
        assert_same_outputs(before, model, {"c": np.array(c), "x": np.array([3, 4], np.float32)})
