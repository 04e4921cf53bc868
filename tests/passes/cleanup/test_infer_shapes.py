from slimgraph.passes import get_pass
from tests.helpers import parse


def test_intermediate_shapes_are_stored():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2,3] x, float[3,5] w) => (float[2,5] y) {
        m = MatMul (x, w)
        y = Relu (m)
    }
    """)
    result = get_pass("infer_shapes")()(model)
    assert result.modified
    m = next(n for n in model.graph if n.op_type == "MatMul").outputs[0]
    assert list(m.shape) == [2, 5]
    assert not get_pass("infer_shapes")()(model).modified
