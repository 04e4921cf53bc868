"""The rule wrapper (slimgraph/passes/rewrite.py): reasons, tags, operand order, cleanup."""

import numpy as np
import pytest

from slimgraph.errors import PassError
from slimgraph.ir import Model
from slimgraph.passes.rewrite import USED_OUTSIDE, NoMatch, Rule, apply_rules, constant
from tests.helpers import assert_same_outputs, ops, parse

SILU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y) {
    s = Sigmoid (x)
    y = Mul (s, x)
}
"""


def _silu_rule(check=None):
    return Rule(
        "test_silu",
        pattern=lambda op, x: op.Mul(x, op.Sigmoid(x)),
        rewrite=lambda op, x: op.op("QuickGelu", x, _domain="com.microsoft", alpha=1.0),
        check=check,
    )


def test_operands_match_in_either_order_and_new_nodes_are_tagged():
    # The pattern is written Mul(x, Sigmoid(x)); the model has Mul(Sigmoid(x), x).
    model = parse(SILU)
    before = model.clone()
    stats = apply_rules(model, [_silu_rule()])
    assert stats.applied == {"test_silu": 1}
    assert ops(model) == ["QuickGelu"]
    assert Model.annotation(model.graph.node(0), "rule") == "test_silu"
    assert_same_outputs(before, model, {"x": np.linspace(-3, 3, 6, dtype=np.float32).reshape(2, 3)})


def test_a_failed_check_is_counted_with_its_reason_and_changes_nothing():
    model = parse(SILU)
    before = model.to_bytes()
    stats = apply_rules(model, [_silu_rule(check=lambda m, x: "x is special")])
    assert stats.total == 0 and stats.skipped == {"x is special": 1}
    assert model.to_bytes() == before  # operand order restored too


def test_no_match_is_not_counted_as_a_skip():
    model = parse(SILU)
    stats = apply_rules(model, [_silu_rule(check=lambda m, x: NoMatch("not this one"))])
    assert stats.total == 0 and not stats.skipped


def test_an_intermediate_value_used_elsewhere_is_a_reason():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y, float[2,3] s) {
        s = Sigmoid (x)
        y = Mul (x, s)
    }
    """)
    stats = apply_rules(model, [_silu_rule()])
    assert stats.total == 0 and stats.skipped == {USED_OUTSIDE: 1}
    assert ops(model) == ["Sigmoid", "Mul"]


def _scale_rule():
    """Relu(x * c) -> Relu(x) * c' (valid for c > 0), c' a new initializer named like c."""
    def rewrite(op, x, c):
        return op.Mul(op.Relu(x), op.initializer(constant(c), c.name))

    return Rule("scale_after_relu", lambda op, x, c: op.Relu(op.Mul(x, c)), rewrite)


def test_new_initializers_get_fresh_names_and_orphans_are_dropped():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y, float[2] z) <float[2] c = {1, 2}, float[2] c_1 = {5, 5}, float[2] dead = {0, 0}> {
        m = Mul (x, c)
        y = Relu (m)
        z = Add (x, c_1)
    }
    """)
    before = model.clone()
    apply_rules(model, [_scale_rule()])
    assert ops(model) == ["Relu", "Mul", "Add"]
    assert_same_outputs(before, model, {"x": np.array([-1, 3], np.float32)})
    names = set(model.graph.initializers)
    # `c` became unused and is dropped; `c_1` is untouched; `dead` was unused before.
    assert "c" not in names and {"c_1", "dead"} <= names and len(names) == 3
    new = next(n for n in names if n not in {"c_1", "dead"})
    np.testing.assert_array_equal(model.graph.initializers[new].const_value.numpy(), [1, 2])
    np.testing.assert_array_equal(model.graph.initializers["c_1"].const_value.numpy(), [5, 5])


def test_a_rule_that_matches_its_own_output_is_stopped():
    model = parse(SILU)
    endless = Rule("endless", lambda op, x: op.Sigmoid(x), lambda op, x: op.Sigmoid(op.Identity(x)))
    with pytest.raises(PassError, match="matches its own output"):
        apply_rules(model, [endless], owner="test_pass")


def test_rewritten_nodes_are_named_after_what_they_replace_not_a_process_counter(tmp_path):
    # The same pipeline must give the same bytes whether its prefix was computed in this
    # process or saved and loaded again (the search cache does that): onnx-ir's counters
    # restart at each load, so names taken from them would differ (node_Conv_20 vs _0).
    import slimgraph
    from slimgraph import zoo

    model = zoo.digits_cnn()
    direct = slimgraph.run(model, "cleanup,upgrade_opset(target=21),fuse").model.to_bytes()
    prefix = tmp_path / "prefix.onnx"
    prefix.write_bytes(slimgraph.run(model, "cleanup").model.to_bytes())
    resumed = slimgraph.run(str(prefix), "upgrade_opset(target=21),fuse").model.to_bytes()
    assert direct == resumed
