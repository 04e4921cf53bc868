import onnx_ir as ir

from slimgraph.ir.check import check
from slimgraph.passes import get_pass
from tests.helpers import ops, parse


def test_out_of_order_nodes_are_sorted():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[3] x) => (float[3] y) {
        a = Relu (x)
        y = Neg (a)
    }
    """)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    model.graph.remove(relu)
    model.graph.append(relu)  # now Neg reads `a` before Relu defines it
    assert ops(model) == ["Neg", "Relu"]
    result = get_pass("topo_sort")()(model)
    assert result.modified and ops(model) == ["Relu", "Neg"]
    check(model)
    assert isinstance(model.ir, ir.Model)
