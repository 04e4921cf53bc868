import numpy as np

from slimgraph.passes import get_pass
from tests.helpers import assert_same_outputs, ops, parse


def test_unused_nodes_and_initializers_are_removed():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[3] x) => (float[3] y) <float[3] unused_w = {1, 2, 3}> {
        dead = Neg (x)
        dead2 = Add (dead, unused_w)
        y = Relu (x)
    }
    """)
    before = model.clone()
    result = get_pass("eliminate_dead")()(model)
    assert result.modified
    assert ops(model) == ["Relu"]
    assert result.stats["nodes_removed"] == 2 and result.stats["initializers_removed"] == 1
    assert_same_outputs(before, model, {"x": np.array([-1, 0, 1], np.float32)})


def test_unused_graph_input_is_kept():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[3] x, float[3] unused) => (float[3] y) {
        y = Relu (x)
    }
    """)
    result = get_pass("eliminate_dead")()(model)
    assert not result.modified
    assert [v.name for v in model.graph.inputs] == ["x", "unused"]
