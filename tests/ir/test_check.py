import pytest

from slimgraph.ir.check import CheckError, check
from tests.helpers import parse

GOOD = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[3] x) => (float[3] y) {
    a = Relu (x)
    y = Neg (a)
}
"""


def test_valid_model_passes():
    check(parse(GOOD))


def test_use_before_definition_names_the_node_and_neighbours():
    model = parse(GOOD)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.name = "the_relu"
    model.graph.remove(relu)
    model.graph.append(relu)
    with pytest.raises(CheckError, match=r"input 'a' is used before it is defined.*Neg node .*fed by \['the_relu'\]"):
        check(model)


def test_undefined_graph_output():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[3] x) => (float[3] y, float[3] z) {
        y = Relu (x)
    }
    """)
    with pytest.raises(CheckError, match="graph output 'z' is never produced"):
        check(model)


def test_onnx_checker_errors_are_reported():
    model = parse(GOOD)
    next(n for n in model.graph if n.op_type == "Relu").op_type = "NoSuchOp"
    with pytest.raises(CheckError, match="onnx checker"):
        check(model)


def test_subgraph_may_read_outer_scope():
    check(parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (bool c, float[2] x) => (float[2] y) {
        r = Relu (x)
        y = If (c) <
            then_branch = t () => (float[2] a) { a = Neg (r) },
            else_branch = e () => (float[2] b) { b = Abs (r) }
        >
    }
    """))
