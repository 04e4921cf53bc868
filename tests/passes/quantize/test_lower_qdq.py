"""lower_qdq: the plan as QuantizeLinear/DequantizeLinear pairs, same parameters as QOperator."""

import collections

import numpy as np

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.ir.check import check
from tests.passes.quantize._static_models import assert_within_steps, ops, outputs, quantize, with_weights
from tests.passes.quantize.test_lower_qoperator import kitchen_sink

RNG = np.random.default_rng(0)


def test_digits_qdq_loads_and_matches_qoperator():
    data = zoo.digits_test_data()
    float_model = slimgraph.run(zoo.digits_cnn(), "optimize").model
    calibration = {"input": data["input"]}
    qdq, stats = quantize(float_model, calibration, format="qdq")
    qop, _ = quantize(float_model, calibration)
    check(qdq)
    assert stats["format"] == "qdq" and stats["emitted"]["weights"] == 4
    feeds = {"input": data["input"]}
    assert_within_steps(outputs(qop, feeds)["logits"], outputs(qdq, feeds)["logits"], 1)
    # ORT fuses the pairs into the same integer kernels the QOperator form names itself
    report = ort.runtime_report(qdq, feeds={"input": data["input"][:1]})
    assert report.float_islands() == []
    assert report.op_counts()["com.microsoft:QLinearConv"] == 3 and report.op_counts()["com.microsoft:QGemm"] == 1


def test_structure_pairs_weights_biases_and_folded_relu():
    model = with_weights("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,3,8,8] x, float[8,3,3,3] w, float[8] b) => (float[N,8,8,8] y) {
        c = Conv <pads = [1,1,1,1]> (x, w, b)
        y = Relu (c)
    }
    """, w=RNG.normal(size=(8, 3, 3, 3)), b=RNG.normal(size=(8,)))
    data = {"x": RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)}
    qdq, stats = quantize(model, data, format="qdq")
    assert stats["emitted"]["folded clamps"] == 1
    assert ops(qdq) == {"QuantizeLinear": 2, "DequantizeLinear": 4, "Conv": 1}  # x, y pairs; w, b
    conv = next(n for n in qdq.graph if n.op_type == "Conv")
    w_dq, b_dq = conv.inputs[1].producer(), conv.inputs[2].producer()
    assert w_dq.inputs[0].const_value.dtype.name == "INT8" and w_dq.attributes.get_int("axis") == 0
    assert list(w_dq.inputs[1].const_value.shape) == [8]
    assert b_dq.inputs[0].const_value.dtype.name == "INT32"
    x_scale = conv.inputs[0].producer().inputs[1].const_value.numpy()
    np.testing.assert_allclose(b_dq.inputs[1].const_value.numpy(), x_scale * w_dq.inputs[1].const_value.numpy(),
                               rtol=1e-6)
    assert qdq.graph.outputs[0].name == "y" and qdq.graph.outputs[0].producer().op_type == "DequantizeLinear"
    y = outputs(qdq, data)["y"]
    assert y.min() >= 0.0  # the Relu is implied by y's zero point
    assert_within_steps(outputs(quantize(model, data)[0], data)["y"], y, 1)


def test_sub_and_div_by_constants_become_add_and_mul():
    model = with_weights("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,4,8,8] x, float[4,4,1,1] w, float[1,4,1,1] b, float[1,4,1,1] d) => (float[N,4,8,8] y) {
        c = Conv (x, w)
        s = Sub (c, b)
        t = Div (s, d)
        y = Conv (t, w)
    }
    """, w=RNG.normal(size=(4, 4, 1, 1)), b=RNG.normal(size=(1, 4, 1, 1)), d=RNG.uniform(1, 2, (1, 4, 1, 1)))
    data = {"x": RNG.normal(size=(8, 4, 8, 8)).astype(np.float32)}
    qdq, _ = quantize(model, data, format="qdq")
    counts = ops(qdq)
    assert counts["Add"] == 1 and counts["Mul"] == 1 and "Sub" not in counts and "Div" not in counts
    assert_within_steps(outputs(quantize(model, data)[0], data)["y"], outputs(qdq, data)["y"], 1)


def test_kitchen_sink_qdq_matches_qoperator():
    model, data = kitchen_sink()
    qdq, _ = quantize(model, data, format="qdq")
    qop, _ = quantize(model, data)
    check(qdq)
    a, b = outputs(qop, data), outputs(qdq, data)
    for name in ("logits", "prob"):
        assert_within_steps(a[name], b[name], 1, name)
    # one pair per 8-bit tensor: as many QuantizeLinear as DequantizeLinear of activations
    kinds = collections.Counter(n.op_type for n in qdq.graph)
    weight_dqs = sum(1 for n in qdq.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None)
    assert kinds["QuantizeLinear"] == kinds["DequantizeLinear"] - weight_dqs
