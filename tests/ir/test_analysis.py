"""Analyses: shapes, parameters and bytes, MACs (against hand-computed numbers), caching."""

import numpy as np
import onnx
import pytest

import slimgraph
from slimgraph.ir.analysis import summary
from tests.helpers import parse


def _with_weights(text: str, **weights: np.ndarray) -> slimgraph.Model:
    proto = onnx.parser.parse_model(text)
    for name, array in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return slimgraph.load(proto)


def _zeros(*shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 3, 8, 8] x) => (float[1, 16, 8, 8] y) {
    y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
}
"""


def test_shapes_of_inputs_initializers_and_inferred_values():
    model = _with_weights("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] x) => (float[N, 10] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        p = GlobalAveragePool (c)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, fc)
    }
    """, w=_zeros(16, 3, 3, 3), fc=_zeros(10, 16))
    shapes = model.analysis("shapes")
    assert shapes["x"] == ("FLOAT", ("N", 3, 8, 8))
    assert shapes["w"] == ("FLOAT", (16, 3, 3, 3))
    assert shapes["c"] == ("FLOAT", ("N", 16, 8, 8))  # inferred; symbolic dims stay names
    assert shapes["f"] == ("FLOAT", ("N", 16))
    assert shapes["y"] == ("FLOAT", ("N", 10))


def test_params_and_bytes_count_every_dtype():
    model = _with_weights("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 8, 8] x) => (float[1, 192] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Reshape (c, shape)
    }
    """, w=_zeros(16, 3, 3, 3), b=_zeros(16, dtype=np.float16), shape=np.array([1, -1], np.int64))
    assert model.analysis("params") == {"params": 432 + 16 + 2, "bytes": 432 * 4 + 16 * 2 + 2 * 8}


# name, model text, weights, hand-computed MACs
MACS_CASES = [
    pytest.param(CONV, {"w": _zeros(16, 3, 3, 3), "b": _zeros(16)},
                 16 * 8 * 8 * (3 * 3 * 3), id="conv: out elements x Cin x kh x kw"),
    pytest.param("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 8, 8, 8] x) => (float[1, 8, 4, 4] y) {
        y = Conv <group = 4, strides = [2, 2], pads = [1, 1, 1, 1]> (x, w)
    }
    """, {"w": _zeros(8, 2, 3, 3)}, 8 * 4 * 4 * (2 * 3 * 3), id="grouped strided conv: Cin/group"),
    pytest.param("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4, 5, 5] x) => (float[1, 2, 11, 11] y) {
        y = ConvTranspose <strides = [2, 2]> (x, w)
    }
    """, {"w": _zeros(4, 2, 3, 3)}, (4 * 5 * 5) * (2 * 3 * 3), id="conv transpose: in elements x Cout x kh x kw"),
    pytest.param("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4, 32] a) => (float[4, 10] y) {
        y = Gemm (a, b, c)
    }
    """, {"b": _zeros(32, 10), "c": _zeros(10)}, 4 * 10 * 32, id="gemm: M x N x K"),
    pytest.param("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[32, 4] a) => (float[4, 10] y) {
        y = Gemm <transA = 1, transB = 1> (a, b)
    }
    """, {"b": _zeros(10, 32)}, 4 * 10 * 32, id="gemm transposed: K from A's first dim"),
    pytest.param("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[5, 16] a) => (float[5, 7] y) {
        y = MatMul (a, b)
    }
    """, {"b": _zeros(16, 7)}, 5 * 7 * 16, id="matmul 2-D"),
    pytest.param("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4, 8, 16] q, float[2, 4, 16, 8] k) => (float[2, 4, 8, 8] y) {
        y = MatMul (q, k)
    }
    """, {}, 2 * 4 * (8 * 8 * 16), id="batched matmul (attention scores QK^T)"),
    pytest.param("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3, 5, 16] a) => (float[3, 5, 7] y) {
        y = MatMul (a, b)
    }
    """, {"b": _zeros(16, 7)}, 3 * 5 * 7 * 16, id="broadcast matmul against a 2-D weight"),
    pytest.param("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 64] a) => (float[N, 32] y) {
        y = MatMul (a, b)
    }
    """, {"b": _zeros(64, 32)}, 1 * 32 * 64, id="symbolic batch counts as 1"),
]


@pytest.mark.parametrize(("text", "weights", "expected"), MACS_CASES)
def test_macs_match_hand_computed(text, weights, expected):
    model = _with_weights(text, **weights)
    assert list(model.analysis("macs").values()) == [expected]


def test_ops_without_macs_are_not_listed():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4, 4] x) => (float[4, 4] y) {
        r = Relu (x)
        y = Add (r, x)
    }
    """)
    assert model.analysis("macs") == {}


def test_consumers():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) {
        a = Relu (x)
        y = Add (a, x)
    }
    """)
    relu, add = model.graph
    relu.name, add.name = "relu", "add"
    assert model.analysis("consumers") == {"x": ["relu", "add"], "a": ["add"]}


def test_summary_has_the_inspect_keys():
    model = _with_weights(CONV, w=_zeros(16, 3, 3, 3), b=_zeros(16))
    s = summary(model)
    assert {"opset", "inputs", "outputs", "nodes", "op_counts", "params", "bytes", "macs"} <= set(s)
    assert s["opset"] == 17 and s["nodes"] == 1 and s["op_counts"] == {"Conv": 1}
    assert s["inputs"] == [{"name": "x", "dtype": "FLOAT", "shape": [1, 3, 8, 8]}]
    assert (s["params"], s["bytes"], s["macs"]) == (448, 1792, 27648)


# --- caching ------------------------------------------------------------------------------------
def test_analysis_is_cached_per_version():
    model = _with_weights(CONV, w=_zeros(16, 3, 3, 3), b=_zeros(16))
    first = model.analysis("shapes")
    assert model.analysis("shapes") is first  # no recomputation while the version is the same


def test_bump_invalidates_unless_preserved():
    model = _with_weights(CONV, w=_zeros(16, 3, 3, 3), b=_zeros(16))
    shapes, macs = model.analysis("shapes"), model.analysis("macs")
    model.bump(preserves=["shapes"])
    assert model.version == 1
    assert model.analysis("shapes") is shapes
    assert model.analysis("macs") is not macs
    model.bump()
    assert model.analysis("shapes") is not shapes


def test_bump_after_a_change_gives_fresh_results():
    model = _with_weights(CONV, w=_zeros(16, 3, 3, 3), b=_zeros(16))
    assert model.analysis("params")["params"] == 448
    conv = next(iter(model.graph))
    conv.replace_input_with(2, None)  # drop the bias
    del model.graph.initializers["b"]
    assert model.analysis("params")["params"] == 448  # stale until the modification is recorded
    model.bump()
    assert model.analysis("params")["params"] == 432


def test_unknown_analysis():
    with pytest.raises(KeyError, match="unknown analysis 'flops'"):
        parse(CONV.replace(", b)", ")")).analysis("flops")



def test_integer_kernels_count_their_macs():
    import slimgraph
    from slimgraph import zoo

    model = slimgraph.load(zoo.digits_cnn())
    q = slimgraph.run(model, "int8", data={"input": zoo.digits_data().x_train[:16]}).model
    macs = q.analysis("macs")
    integer = [n for n in q.graph if n.op_type in ("QLinearConv", "QGemm")]
    assert integer and all(macs.get(n.name, 0) > 0 for n in integer)
    # The int8 stem reads 4 channels (3 zero-padded) instead of 1: never fewer MACs than float.
    assert sum(macs.values()) >= sum(model.analysis("macs").values())
