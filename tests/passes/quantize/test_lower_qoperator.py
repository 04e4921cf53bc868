"""lower_qoperator: every kind of the plan as ONNX Runtime integer kernels.

Each lowered model is compared with the float reference of the same quantization (the QDQ
form run with ORT's optimizations off: `fake_quant_outputs`), which rounds every tensor
exactly where the integer model does; the integer kernels may differ from it by one
output step (requantization rounding and ties), two where a COMPOSITE rounds twice.
"""

import numpy as np
import pytest

from slimgraph.passes.quantize import _cpu
from tests.passes.quantize._static_models import (
    assert_integer_only,
    assert_within_steps,
    fake_quant_outputs,
    ops,
    outputs,
    quantize,
    with_weights,
)

RNG = np.random.default_rng(0)


def kitchen_sink(seed: int = 0):
    """Most kinds in one CNN: MAC, FOLD, SAME, BINARY (activations, constant tensors, Sub,
    Div), UNARY, POOL, CONCAT, LUT chains, SOFTMAX, and QGemms that output float."""
    rng = np.random.default_rng(seed)  # its own generator: same model whatever ran before
    weights = {
        "w1": rng.normal(size=(8, 4, 3, 3)) * 0.3, "w2": rng.normal(size=(8, 8, 3, 3)) * 0.2,
        "k": rng.uniform(0.5, 1.5, (1, 8, 1, 1)), "b": rng.normal(size=(1, 8, 1, 1)) * 0.1,
        "d": rng.uniform(1.0, 2.0, (1, 8, 1, 1)), "wg": rng.normal(size=(256, 10)) * 0.1,
        "bg": rng.normal(size=(10,)) * 0.1, "wp": rng.normal(size=(8, 4)),
    }
    model = with_weights("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,4,8,8] x, float[8,4,3,3] w1, float[8,8,3,3] w2, float[1,8,1,1] k, float[1,8,1,1] b,
       float[1,8,1,1] d, float[256,10] wg, float[10] bg, float[8,4] wp) => (float[N,10] logits, float[N,4] prob)
      <float[4] scales = {1.0, 1.0, 2.0, 2.0}> {
        c1 = Conv <pads = [1,1,1,1]> (x, w1)
        r1 = Relu (c1)
        p = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r1)
        c2 = Conv <pads = [1,1,1,1]> (p, w2)
        a = Add (c2, p)
        s = Sigmoid (a)
        m = Mul (a, s)
        mk = Mul (m, k)
        sb = Sub (mk, b)
        dv = Div (sb, d)
        ap = AveragePool <kernel_shape = [2,2], strides = [2,2]> (dv)
        up = Resize <mode = "nearest"> (ap, , scales)
        lr = LeakyRelu <alpha = 0.1> (dv)
        cc = Concat <axis = 1> (up, lr)
        t = Tanh (cc)
        e = Exp (t)
        f = Flatten (e)
        logits = Gemm (f, wg, bg)
        gp = GlobalAveragePool (dv)
        gf = Flatten (gp)
        sm = Softmax (gf)
        prob = MatMul (sm, wp)
    }
    """, **weights)
    return model, {"x": rng.normal(size=(16, 4, 8, 8)).astype(np.float32)}


def test_kitchen_sink_lowers_every_kind_to_integer_kernels():
    model, data = kitchen_sink()
    quantized, stats = quantize(model, data)
    counts = ops(quantized)
    for op in ("QLinearConv", "MaxPool", "com.microsoft:QLinearAdd", "com.microsoft:QLinearMul",
               "com.microsoft:QLinearSigmoid", "com.microsoft:QLinearAveragePool", "Resize",
               "com.microsoft:QLinearLeakyRelu", "com.microsoft:QLinearConcat", "GatherElements",
               "com.microsoft:QGemm", "com.microsoft:QLinearGlobalAveragePool", "com.microsoft:QLinearSoftmax"):
        assert counts[op] >= 1, op
    assert counts["GatherElements"] == 1 and stats["emitted"]["tables composed"] == 1  # Exp(Tanh(x)): one table
    assert stats["kinds"]["fold"] == 1 and stats["float_nodes"] == []
    assert_integer_only(quantized, {"x": data["x"][:1]})
    reference, got = fake_quant_outputs(model, data, data), outputs(quantized, data)
    assert_within_steps(reference["prob"], got["prob"], 1)
    # the float logits of QGemm carry no output rounding: compare them in steps of their range
    assert_within_steps(reference["logits"], got["logits"], 1)


def _between_convs(body: str, out_shape: str, extra: str = "", channels: int = 4):
    model = with_weights(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,4,8,8] x, float[4,4,1,1] w, float[{channels},{channels},1,1] v) => (float[{out_shape}] y)
      <{extra}> {{
        c = Conv (x, w)
        {body}
        y = Conv (d, v)
    }}
    """, w=RNG.normal(size=(4, 4, 1, 1)), v=RNG.normal(size=(channels, channels, 1, 1)))
    return model, {"x": RNG.normal(size=(8, 4, 8, 8)).astype(np.float32)}


SAME_CASES = {
    "MaxPool": ("d = MaxPool <kernel_shape = [2,2]> (c)", "N,4,7,7", ""),
    "Transpose": ("d = Transpose <perm = [0,1,3,2]> (c)", "N,4,8,8", ""),
    "Reshape": ("d = Reshape (c, shape)", "1,4,16,4", "int64[4] shape = {1, 4, 16, 4}"),
    "Slice": ("d = Slice (c, starts, ends, axes)", "N,4,4,8", "int64[1] starts = {2}, int64[1] ends = {6}, "
              "int64[1] axes = {2}"),
    "Split": ("h1, h2 = Split <axis = 2, num_outputs = 2> (c)\n        d = Concat <axis = 2> (h2, h1)",
              "N,4,8,8", ""),
    "Pad": ("d = Pad (c, pads, value)", "N,4,10,10", "int64[8] pads = {0,0,1,1,0,0,1,1}, float value = {0.0}"),
    "Resize": ("d = Resize <mode = \"nearest\"> (c, , scales)", "N,4,16,16", "float[4] scales = {1.0, 1.0, 2.0, 2.0}"),
    "Squeeze": ("s = Unsqueeze (c, axes)\n        d = Squeeze (s, axes)", "N,4,8,8", "int64[1] axes = {2}"),
    "DepthToSpace": ("s = SpaceToDepth <blocksize = 2> (c)\n        d = DepthToSpace <blocksize = 2> (s)",
                     "N,4,8,8", ""),
    "Identity": ("d = Identity (c)", "N,4,8,8", ""),
}


@pytest.mark.parametrize("name", sorted(SAME_CASES))
def test_data_movement_runs_on_8bit_data(name):
    body, out_shape, extra = SAME_CASES[name]
    if name == "Reshape":
        model, data = _between_convs(body, out_shape, extra)
        data = {"x": data["x"][:1]}
    else:
        model, data = _between_convs(body, out_shape, extra)
    quantized, stats = quantize(model, data)
    assert stats["float_nodes"] == []
    assert ops(quantized)["QLinearConv"] == 2
    assert_integer_only(quantized, {"x": data["x"][:1]})
    assert_within_steps(fake_quant_outputs(model, data, data)["y"], outputs(quantized, data)["y"], 1)


def test_linear_resize_interpolates_8bit_data_within_a_step():
    """ORT interpolates uint8 in fixed point and the reference in float, each rounding to the
    grid: within 1.5 steps of each other."""
    model = with_weights("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,4,8,8] x, float[4,4,1,1] w) => (float[N,4,16,16] y) <float[4] scales = {1.0, 1.0, 2.0, 2.0}> {
        c = Conv (x, w)
        y = Resize <mode = "linear"> (c, , scales)
    }
    """, w=RNG.normal(size=(4, 4, 1, 1)))
    data = {"x": RNG.normal(size=(8, 4, 8, 8)).astype(np.float32)}
    quantized, _ = quantize(model, data)
    assert ops(quantized)["Resize"] == 1
    assert_within_steps(fake_quant_outputs(model, data, data)["y"], outputs(quantized, data)["y"], 1.5)


@pytest.mark.parametrize("body, op", [
    ("d = HardSwish (c)", "com.microsoft:QLinearMul"),
    ("d = HardSigmoid <alpha = 0.2, beta = 0.5> (c)", "com.microsoft:QLinearAdd"),
    ("d = com.microsoft.QuickGelu <alpha = 1.702> (c)", "com.microsoft:QLinearSigmoid"),
])
def test_composite_activations(body, op):
    model, data = _between_convs(body, "N,4,8,8")
    model.ir.opset_imports["com.microsoft"] = 1
    quantized, stats = quantize(model, data)
    assert stats["kinds"]["composite"] == 1 and ops(quantized)[op] == 1
    assert "GatherElements" not in ops(quantized)
    assert_integer_only(quantized, {"x": data["x"][:1]})
    # two roundings (the gate, then the product) where the reference has one
    assert_within_steps(fake_quant_outputs(model, data, data)["y"], outputs(quantized, data)["y"], 2)


def test_division_by_a_positive_scalar_is_free():
    model, data = _between_convs("d = Div (c, six)", "N,4,8,8", "float six = {6.0}")
    quantized, stats = quantize(model, data)
    assert stats["kinds"]["rescale"] == 1
    assert ops(quantized) == {"QuantizeLinear": 1, "QLinearConv": 2, "DequantizeLinear": 1}
    assert_within_steps(fake_quant_outputs(model, data, data)["y"], outputs(quantized, data)["y"], 1)


@pytest.mark.parametrize("x_shape, op", [("N,16", "com.microsoft:QGemm"), ("N,5,16", "QLinearMatMul")])
def test_matmul_with_a_constant(x_shape, op):
    model = with_weights(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[{x_shape}] x, float[16,8] w) => (float[{x_shape[:-2]}8] y) {{ y = MatMul (x, w) }}
    """, w=RNG.normal(size=(16, 8)))
    shape = (8, 16) if x_shape == "N,16" else (8, 5, 16)
    data = {"x": RNG.normal(size=shape).astype(np.float32)}
    quantized, _ = quantize(model, data)
    assert ops(quantized)[op] == 1
    assert_within_steps(fake_quant_outputs(model, data, data)["y"], outputs(quantized, data)["y"], 1)


def test_matmul_of_two_activations():
    model = with_weights("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,5,16] x, float[16,16] w) => (float[N,5,5] y) {
        q = MatMul (x, w)
        t = Transpose <perm = [0,2,1]> (x)
        y = MatMul (q, t)
    }
    """, w=RNG.normal(size=(16, 16)) * 0.3)
    data = {"x": RNG.normal(size=(8, 5, 16)).astype(np.float32)}
    quantized, stats = quantize(model, data)
    assert ops(quantized)["QLinearMatMul"] == 2 and stats["integer_mac_fraction"] == 1.0
    assert_within_steps(fake_quant_outputs(model, data, data)["y"], outputs(quantized, data)["y"], 1)


def test_outputs_keep_their_names_and_shape_readers_take_8bit():
    """`c` is a graph output and is read by a float node and by Shape: one DequantizeLinear,
    named `c`, feeds both the output and the float node; Shape reads the 8-bit tensor."""
    model = with_weights("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,4,8,8] x, float[4,4,1,1] w) => (float[N,4,8,8] c, float[N,4,8,8] e, int64[4] s) {
        c = Conv (x, w)
        e = Sub (c, x)
        s = Shape (c)
    }
    """, w=RNG.normal(size=(4, 4, 1, 1)))
    data = {"x": RNG.normal(size=(4, 4, 8, 8)).astype(np.float32)}
    quantized, _ = quantize(model, data)
    graph = quantized.graph
    assert [v.name for v in graph.outputs] == ["c", "e", "s"]
    assert graph.outputs[0].producer().op_type == "DequantizeLinear"
    assert ops(quantized)["DequantizeLinear"] == 1
    shape = graph.outputs[2].producer()
    assert shape.inputs[0].dtype.name == "UINT8"
    got = outputs(quantized, data)
    assert got["s"].tolist() == [4, 4, 8, 8]


@pytest.mark.skipif(not _cpu.u8s8_saturates(), reason="x86 without VNNI only")
def test_int8_activations_lower_and_run():
    model, data = kitchen_sink()
    quantized, stats = quantize(model, data, activation_dtype="int8")
    assert stats["float_nodes"] == []
    reference, got = fake_quant_outputs(model, data, data, activation_dtype="int8"), outputs(quantized, data)
    assert_within_steps(reference["prob"], got["prob"], 1)
    assert_within_steps(reference["logits"], got["logits"], 1)


@pytest.mark.parametrize("out_channels, padded", [(16, True), (12, False)])
def test_rgb_stem_gets_a_fourth_zero_channel(out_channels, padded):
    """3 input channels -> 4 (zero weights, input padded with its zero point), so ORT can run
    its ConvSym kernel; only where that kernel takes the output channels (multiple of 8, >= 16)."""
    model = with_weights(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,3,16,16] x, float[{out_channels},3,3,3] w) => (float[N,{out_channels},8,8] y) {{
        y = Conv <pads = [1,1,1,1], strides = [2,2]> (x, w)
    }}
    """, w=RNG.normal(size=(out_channels, 3, 3, 3)))
    data = {"x": RNG.normal(size=(4, 3, 16, 16)).astype(np.float32)}
    quantized, stats = quantize(model, data)
    assert ops(quantized)["Pad"] == int(padded) and stats["emitted"].get("channel pads", 0) == int(padded)
    if padded:
        conv = next(n for n in quantized.graph if n.op_type == "QLinearConv")
        assert list(conv.inputs[3].const_value.shape) == [out_channels, 4, 3, 3]
    assert_within_steps(fake_quant_outputs(model, data, data)["y"], outputs(quantized, data)["y"], 1)
