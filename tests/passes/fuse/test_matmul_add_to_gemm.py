"""matmul_add_to_gemm: MatMul(2-D activation, constant weight) + constant bias -> Gemm."""

import numpy as np

from slimgraph.passes import get_pass
from tests.helpers import assert_same_outputs, ops, parse

RNG = np.random.default_rng(0)


def init(name: str, *shape: int) -> str:
    values = ", ".join(f"{v:.5f}" for v in RNG.uniform(-1, 1, size=shape).ravel())
    return f"float[{','.join(map(str, shape))}] {name} = {{{values}}}"


def model_text(a_type: str = "float[3,5]", add: str = "Add (m, b)", bias: str = "b = {1, 2, 3, 4}",
               bias_type: str = "float[4]", weight: str | None = None) -> str:
    weight = weight or init("w", 5, 4)
    return f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g ({a_type} a) => (float[3,4] y) <{weight}, {bias_type} {bias}> {{
        m = MatMul (a, w)
        y = {add}
    }}
    """


def fuse(model):
    before = model.clone()
    return before, get_pass("matmul_add_to_gemm")()(model)


def test_matmul_add_becomes_gemm():
    model = parse(model_text())
    before, result = fuse(model)
    assert result.modified and result.stats["fused"] == 1
    assert ops(model) == ["Gemm"]
    assert_same_outputs(before, model, {"a": RNG.normal(size=(3, 5)).astype(np.float32)})


def test_bias_as_first_operand():
    model = parse(model_text(add="Add (b, m)"))
    before, _ = fuse(model)
    assert ops(model) == ["Gemm"]
    assert_same_outputs(before, model, {"a": RNG.normal(size=(3, 5)).astype(np.float32)})


def test_row_bias_with_known_batch():
    model = parse(model_text(bias_type="float[3,1]", bias="b = {1, 2, 3}"))
    before, _ = fuse(model)
    assert ops(model) == ["Gemm"]
    assert_same_outputs(before, model, {"a": RNG.normal(size=(3, 5)).astype(np.float32)})


def test_3d_activation_is_skipped():
    model = parse(model_text(a_type="float[2,3,5]").replace("=> (float[3,4] y)", "=> (float[2,3,4] y)"))
    _, result = fuse(model)
    assert not result.modified and result.stats["skipped"] == {"activation is not 2-D": 1}


def test_activation_of_unknown_rank_is_skipped_until_shapes_are_inferred():
    # Relu's output carries no shape until shape inference has run.
    model = parse(model_text().replace("m = MatMul (a, w)", "r = Relu (a)\n m = MatMul (r, w)"))
    _, result = fuse(model)
    assert not result.modified
    assert result.stats["skipped"] == {"activation rank is unknown (run infer_shapes first)": 1}
    get_pass("infer_shapes")()(model)
    assert fuse(model)[1].modified and ops(model) == ["Relu", "Gemm"]


def test_bias_depending_on_an_unknown_batch_is_skipped():
    model = parse(model_text(a_type="float[N,5]", bias_type="float[3,4]", bias=init("b", 3, 4).split(" ", 1)[1]))
    _, result = fuse(model)
    assert not result.modified
    assert result.stats["skipped"] == {"bias depends on the batch dimension, which is not known": 1}


def test_bias_of_higher_rank_is_skipped():
    model = parse(model_text(bias_type="float[1,1,4]").replace("=> (float[3,4] y)", "=> (float[1,3,4] y)"))
    _, result = fuse(model)
    assert not result.modified
    assert result.stats["skipped"] == {"bias would broadcast the product to a higher rank": 1}


def test_weight_that_is_a_graph_input_is_skipped():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3,5] a, float[5,4] w) => (float[3,4] y) <float[4] b = {1, 2, 3, 4}> {
        m = MatMul (a, w)
        y = Add (m, b)
    }
    """)
    _, result = fuse(model)
    assert not result.modified and result.stats["skipped"] == {"weight is not a constant": 1}


def test_non_constant_bias_is_skipped():
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3,5] a, float[4] b) => (float[3,4] y) <{init("w", 5, 4)}> {{
        m = MatMul (a, w)
        y = Add (b, m)
    }}
    """)
    _, result = fuse(model)
    assert not result.modified and result.stats["skipped"] == {"bias is not a constant": 1}
