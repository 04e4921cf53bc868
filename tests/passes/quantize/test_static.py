"""quantize.static: selection, calibration, qparams annotations, lowering; the int8 recipes."""

import logging

import numpy as np
import onnx
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.errors import DataError, PassError, PipelineError
from slimgraph.ir.check import check
from slimgraph.ir.model import Model
from slimgraph.passes import PassContext, get_pass
from slimgraph.passes.quantize import _cpu
from slimgraph.passes.quantize._common import read_plan
from slimgraph.passes.quantize._ops import Kind
from slimgraph.passes.quantize.static import implies
from slimgraph.passes.quantize.qparams import QParams
from tests.helpers import parse
from tests.passes.quantize._static_models import (
    assert_integer_only,
    assert_within_steps,
    error_in_steps,
    fake_quant_outputs,
    ops,
    outputs,
    quantize,
    with_weights,
)

RNG = np.random.default_rng(0)


# --- the digits CNN (real data, trained weights) --------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    data = zoo.digits_test_data()
    float_model = slimgraph.run(zoo.digits_cnn(), "optimize").model
    return float_model, data


def test_digits_int8_keeps_accuracy_and_runs_integer_only(digits):
    float_model, data = digits
    x, labels = data["input"], data["labels"]
    quantized, stats = quantize(float_model, {"input": x})

    top1_float = float((outputs(float_model, {"input": x})["logits"].argmax(1) == labels).mean())
    top1_int8 = float((outputs(quantized, {"input": x})["logits"].argmax(1) == labels).mean())
    assert top1_float - top1_int8 <= 0.005, (top1_float, top1_int8)
    assert stats["integer_mac_fraction"] == 1.0
    assert stats["float_nodes"] == []
    assert ops(quantized)["QuantizeLinear"] == 1
    # the logits come straight out of QGemm, which dequantizes itself: no DequantizeLinear
    assert quantized.graph.outputs[0].producer().op_type in ("DequantizeLinear", "QGemm")
    assert_integer_only(quantized, {"input": x[:1]})
    check(quantized)


@pytest.mark.parametrize("config", [{"per_channel": False}, {"activation_dtype": "int8"},
                                    {"activation_dtype": "int8", "activation_symmetric": True},
                                    {"calibration": "percentile"}, {"weight_dtype": "uint8"}])
def test_digits_other_settings(digits, config):
    float_model, data = digits
    x, labels = data["input"], data["labels"]
    quantized, stats = quantize(float_model, {"input": x}, **config)
    assert stats["integer_mac_fraction"] == 1.0
    top1 = float((outputs(quantized, {"input": x})["logits"].argmax(1) == labels).mean())
    assert top1 >= 0.98, (config, top1)
    conv = next(n for n in quantized.graph if n.op_type == "QLinearConv")
    weight_scale = conv.inputs[4].const_value
    assert list(weight_scale.shape) == ([] if config.get("per_channel") is False else [16])
    assert conv.inputs[0].dtype.name == config.get("activation_dtype", "uint8").upper()


def test_plan_is_recorded_as_annotations(digits):
    float_model, data = digits
    model = float_model.clone()
    stats = get_pass("quantize.static")().plan(model, PassContext(data={"input": data["input"][:32]}, progress=False))
    plans = {n.op_type: read_plan(n) for n in model.graph}
    assert stats["kinds"] == {"mac": 4, "fold": 3, "same": 2}
    conv = plans["Conv"]
    assert conv.kind is Kind.MAC
    assert conv.inputs[0].dtype == "uint8" and conv.inputs[1].dtype == "int8" and conv.inputs[1].axis == 0
    assert plans["Relu"].kind is Kind.FOLD
    assert int(plans["Relu"].outputs[0].zero_point) == 0  # the Conv's range is the Relu's: clamp implied
    assert plans["Gemm"].outputs == {}  # the logits stay float: QGemm dequantizes itself
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "Conv", "Relu", "MaxPool", "Conv", "Relu",
                                                "Reshape", "Gemm"]  # planning alone changes no node


# --- u8s8 saturation on CPUs without VNNI (issue item 7) ------------------------------------------
#: int8 products of the saturation layers stay within this many steps of the output's scale
SATURATION_TOLERANCE_STEPS = 2.0


def saturating_conv():
    """A 3x3 Conv over 64 channels with large positive weights, fed activations near their
    maximum: in u8s8 with 8-bit weights each pair of products (~255 * 127 * 2) exceeds
    int16 on x86 without VNNI."""
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 1.0, (16, 64, 3, 3))
    model = with_weights("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,64,8,8] x, float[16,64,3,3] w) => (float[N,16,8,8] y) { y = Conv <pads = [1,1,1,1]> (x, w) }
    """, w=w)
    x = rng.uniform(0.9, 1.0, (8, 64, 8, 8)).astype(np.float32)
    x[0, :, 0, 0] = 0.0  # the range starts at 0: x near 1.0 quantizes near 255
    return model, {"x": x}


def saturating_gemm():
    rng = np.random.default_rng(1)
    model = with_weights("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,256] x, float[256,32] w) => (float[N,32] y) { y = Gemm (x, w) }
    """, w=rng.uniform(0.5, 1.0, (256, 32)))
    x = rng.uniform(0.9, 1.0, (8, 256)).astype(np.float32)
    x[0, 0] = 0.0
    return model, {"x": x}


@pytest.mark.parametrize("build", [saturating_conv, saturating_gemm])
def test_no_saturation_with_default_weight_bits(build):
    model, data = build()
    reference = outputs(model, data)["y"]
    quantized, stats = quantize(model, data)
    if _cpu.u8s8_saturates():
        assert stats["weight_bits"] == {7: 1}
    steps = error_in_steps(reference, outputs(quantized, data)["y"])
    assert steps <= SATURATION_TOLERANCE_STEPS, steps


@pytest.mark.skipif(not _cpu.u8s8_saturates(), reason="this CPU's u8s8 kernels do not saturate (VNNI or not x86)")
@pytest.mark.parametrize("build", [saturating_conv, saturating_gemm])
def test_8bit_weights_saturate_on_this_cpu(build):
    """The layer really is a saturation case here: plain 8-bit u8s8 is far off."""
    model, data = build()
    reference = outputs(model, data)["y"]
    quantized, stats = quantize(model, data, weight_bits=8)
    assert stats["weight_bits"] == {8: 1}
    assert error_in_steps(reference, outputs(quantized, data)["y"]) > 20


def test_cpu_detection():
    assert _cpu.u8s8_saturates("x86_64", frozenset({"avx2", "fma"}))
    assert not _cpu.u8s8_saturates("x86_64", frozenset({"avx2", "avx_vnni"}))
    assert not _cpu.u8s8_saturates("x86_64", frozenset({"avx512f", "avx512_vnni"}))
    assert not _cpu.u8s8_saturates("aarch64", frozenset())


def test_depthwise_and_non_cpu_targets_keep_8_bits():
    rng = np.random.default_rng(0)
    model = with_weights("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[1,16,8,8] x, float[16,1,3,3] dw, float[32,16,1,1] pw) => (float[1,32,8,8] y) {
        d = Conv <group = 16, pads = [1,1,1,1]> (x, dw)
        y = Conv (d, pw)
    }
    """, dw=rng.normal(size=(16, 1, 3, 3)), pw=rng.normal(size=(32, 16, 1, 1)))
    data = {"x": rng.normal(size=(4, 16, 8, 8)).astype(np.float32)}
    _, stats = quantize(model, data)
    assert stats["weight_bits"] == ({8: 1, 7: 1} if _cpu.u8s8_saturates() else {8: 2})
    result = slimgraph.passes.manager.PassManager("quantize.static").run(
        model, PassContext(data=data, target="cuda", progress=False))
    assert result.report.rows[-1].stats["weight_bits"] == {8: 2}


# --- qparams rules ----------------------------------------------------------------------------------
def test_implies():
    relu_range = QParams.from_range(0.0, 3.0)
    assert implies(relu_range, 0.0, np.inf)
    assert implies(QParams.from_range(0.0, 5.9), 0.0, 6.0)
    assert not implies(QParams.from_range(-1.0, 3.0), 0.0, np.inf)
    assert not implies(QParams.from_range(0.0, 7.0), 0.0, 6.0)
    assert not implies(QParams.from_range(0.0, 3.0, dtype="int8", symmetric=True), 0.0, np.inf)


@pytest.mark.parametrize("clamp, low, high", [("Relu (c)", 0.0, np.inf), ("Clip (c, zero, six)", 0.0, 6.0)])
def test_relu_and_clip_fold_into_the_conv_range(clamp, low, high):
    rng = np.random.default_rng(0)
    model = with_weights(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,3,8,8] x, float[8,3,3,3] w) => (float[N,8,8,8] y) <float zero = {{0.0}}, float six = {{6.0}}> {{
        c = Conv <pads = [1,1,1,1]> (x, w)
        y = {clamp}
    }}
    """, w=rng.normal(size=(8, 3, 3, 3)))
    data = {"x": rng.normal(size=(16, 3, 8, 8)).astype(np.float32)}
    quantized, stats = quantize(model, data)
    assert stats["kinds"] == {"mac": 1, "fold": 1}
    assert ops(quantized) == {"QuantizeLinear": 1, "QLinearConv": 1, "DequantizeLinear": 1}
    y = outputs(quantized, data)["y"]
    assert y.min() >= low and y.max() <= high
    assert_within_steps(fake_quant_outputs(model, data, data)["y"], y, 1)


@pytest.mark.parametrize("clamp, kind, op", [
    ("Relu (a)", "clamp", "com.microsoft:QLinearLeakyRelu"),  # [0, max] implies it: a requantization
    ("Clip (a, one, five)", "lut", "GatherElements"),  # a grid holding 0 cannot: a table
])
def test_a_clamp_its_input_range_does_not_imply(clamp, kind, op):
    """The Add's output is also read by the second Conv: its range keeps its negative part,
    so the clamp cannot fold into it."""
    rng = np.random.default_rng(0)
    model = with_weights(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,4,8,8] x, float[4,4,1,1] w) => (float[N,4,8,8] y, float[N,4,8,8] z)
      <float one = {{1.0}}, float five = {{5.0}}> {{
        c = Conv (x, w)
        a = Add (c, x)
        y = {clamp}
        z = Conv (a, w)
    }}
    """, w=rng.normal(size=(4, 4, 1, 1)))
    data = {"x": rng.normal(size=(16, 4, 8, 8)).astype(np.float32)}
    quantized, stats = quantize(model, data)
    assert stats["kinds"].get("fold", 0) == 0 and stats["kinds"][kind] == 1
    assert ops(quantized)[op] == 1
    reference, got = fake_quant_outputs(model, data, data), outputs(quantized, data)
    assert got["y"].min() >= 0.0
    for name in ("y", "z"):
        assert_within_steps(reference[name], got[name], 1, name)


def test_concat_inputs_take_the_output_range_so_concat_copies_bytes():
    rng = np.random.default_rng(0)
    model = with_weights("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,3,8,8] x, float[4,3,1,1] w, float[6,3,1,1] v) => (float[N,10,8,8] y) {
        a = Conv (x, w)
        b = Conv (x, v)
        y = Concat <axis = 1> (a, b)
    }
    """, w=rng.normal(size=(4, 3, 1, 1)), v=3 * rng.normal(size=(6, 3, 1, 1)))
    data = {"x": rng.normal(size=(16, 3, 8, 8)).astype(np.float32)}
    quantized, _ = quantize(model, data)
    assert ops(quantized)["Concat"] == 1 and "com.microsoft:QLinearConcat" not in ops(quantized)
    assert_within_steps(fake_quant_outputs(model, data, data)["y"], outputs(quantized, data)["y"], 1)


# --- selection: exclude, op_types, nothing to do, bad input -----------------------------------------
@pytest.mark.parametrize("pattern", ["node_Conv_10", "features.1*"])
def test_exclude_keeps_a_node_float_with_a_warning(digits, caplog, pattern):
    float_model, data = digits
    with caplog.at_level(logging.WARNING, logger="slimgraph.passes.quantize.static"):
        quantized, stats = quantize(float_model, {"input": data["input"][:64]}, exclude=[pattern])
    assert "node_Conv_10 (Conv: excluded by" in caplog.text
    assert "node_Conv_10 (Conv)" in stats["float_nodes"]
    assert ops(quantized)["Conv"] == 1 and ops(quantized)["QLinearConv"] == 2
    assert ops(quantized)["DequantizeLinear"] >= 1 and ops(quantized)["QuantizeLinear"] >= 2
    logits = outputs(quantized, {"input": data["input"]})["logits"]
    assert (logits.argmax(1) == data["labels"]).mean() >= 0.98


def test_no_rounding_op_at_a_dead_end():
    """x * x read only by a float ReduceSum (a hand-built LayerNorm's variance) stays float:
    quantizing it would add a rounding and gain no integer op (magika: 87% -> 99% top-1
    agreement)."""
    model = with_weights("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,4,8,8] x, float[4,4,1,1] w) => (float[N,1,1,1] v, float[N,4,8,8] y) <int64[3] axes = {1, 2, 3}> {
        c = Conv (x, w)
        s = Mul (c, c)
        v = ReduceSum (s, axes)
        y = Conv (c, w)
    }
    """, w=RNG.normal(size=(4, 4, 1, 1)))
    data = {"x": RNG.normal(size=(8, 4, 8, 8)).astype(np.float32)}
    quantized, stats = quantize(model, data)
    assert stats["kinds"] == {"mac": 2} and stats["float_nodes"] == []
    assert ops(quantized)["Mul"] == 1 and "com.microsoft:QLinearMul" not in ops(quantized)


def test_the_warning_names_the_float_nodes_between_8bit_tensors(caplog):
    """Sub of two activations has no integer kernel: between two Convs it is an island."""
    model = with_weights("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N,4,8,8] x, float[4,4,1,1] w) => (float[N,4,8,8] y) {
        c = Conv (x, w)
        s = Sub (c, x)
        y = Conv (s, w)
    }
    """, w=RNG.normal(size=(4, 4, 1, 1)))
    with caplog.at_level(logging.WARNING, logger="slimgraph.passes.quantize.static"):
        _, stats = quantize(model, {"x": RNG.normal(size=(8, 4, 8, 8)).astype(np.float32)})
    assert "1 node(s) stay float between 8-bit tensors" in caplog.text
    assert "(Sub: Sub of two activations has no integer kernel)" in caplog.text
    assert len(stats["float_nodes"]) == 1


def test_layers_mixed_precision_keeps_in_float_stay_float(digits):
    float_model, data = digits
    model = float_model.clone()
    conv = next(n for n in model.graph if n.name == "node_Conv_10")
    Model.annotate(conv, "quantize.skip", True)
    Model.annotate(conv, "quantize.precision", "float")
    quantized, stats = quantize(model, {"input": data["input"][:64]})
    assert "node_Conv_10 (Conv)" in stats["float_nodes"]
    kept = next(n for n in quantized.graph if n.name == "node_Conv_10")
    assert kept.op_type == "Conv" and Model.annotation(kept, "quantize.precision") == "float"


def test_op_types_limits_the_selection(digits):
    float_model, data = digits
    quantized, stats = quantize(float_model, {"input": data["input"][:32]}, op_types=["Gemm", "Reshape"])
    assert ops(quantized)["Conv"] == 3 and ops(quantized)["com.microsoft:QGemm"] == 1


def test_a_model_with_nothing_to_quantize_warns_and_is_left_alone(caplog):
    model = parse("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2,3] a, float[2,3] b) => (float[2,3] y) { y = Sub (a, b) }
    """)
    data = {"a": np.ones((4, 2, 3), np.float32), "b": np.ones((4, 2, 3), np.float32)}
    with caplog.at_level(logging.WARNING, logger="slimgraph.passes.quantize.static"):
        result = slimgraph.run(model, "quantize.static", data=data)
    assert "nothing to quantize" in caplog.text and "Sub of two activations" in caplog.text
    assert not result.report.rows[-1].modified
    assert ops(result.model) == {"Sub": 1}


def test_missing_data_is_a_pipeline_error_before_any_work(digits):
    float_model, _ = digits
    with pytest.raises(PipelineError, match="quantize.static.*needs sample data"):
        slimgraph.run(float_model, "quantize.static")


def test_data_with_the_wrong_shape_is_a_clear_error(digits):
    float_model, _ = digits
    # Bad input found inside the pass keeps its type (the CLI exits 2) and names the pass.
    with pytest.raises(DataError, match="quantize.static.*calibration data: 'input' has shape .* axis 2 must be 8"):
        slimgraph.run(float_model, "quantize.static", data={"input": np.zeros((4, 1, 9, 9), np.float32)})


def test_old_opsets_ask_for_upgrade_opset():
    model = with_weights("""
    <ir_version: 7, opset_import: ["" : 12]>
    g (float[N,4,8,8] x, float[4,4,1,1] w) => (float[N,4,8,8] y) { y = Conv (x, w) }
    """, w=RNG.normal(size=(4, 4, 1, 1)))
    data = {"x": RNG.normal(size=(4, 4, 8, 8)).astype(np.float32)}
    with pytest.raises(PassError, match="format 'qdq' needs opset >= 13 .* run upgrade_opset"):
        quantize(model, data, format="qdq")
    quantized, _ = quantize(model, data)  # QOperator lowering needs opset 11
    assert ops(quantized)["QLinearConv"] == 1


def test_bad_config_is_a_pipeline_error():
    with pytest.raises(PipelineError, match="format must be one of"):
        get_pass("quantize.static")(format="qlinear")
    with pytest.raises(PipelineError, match="weight_bits must be one of"):
        get_pass("quantize.static")(weight_bits=6)


# --- the int8 recipes on a model from another toolchain (issue item 8) ------------------------------
def _mobilenet_v3_block_opset11(path):
    """A MobileNetV3-style network exported by torch at opset 11 with HardSwish and
    HardSigmoid written as x * relu6(x + 3) / 6, BatchNormalization kept, dynamic spatial
    size, and every weight re-materialized as a Constant node (as PaddlePaddle and TF
    converters write them)."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    def hswish(x):
        return x * F.relu6(x + 3) / 6

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            s = F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))
            return x * (F.relu6(self.fc2(s) + 3) / 6)

    class Block(nn.Module):
        def __init__(self, cin, hidden, cout, stride):
            super().__init__()
            self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden))
            self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                    nn.BatchNorm2d(hidden))
            self.se = SE(hidden)
            self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.project(self.se(hswish(self.dw(hswish(self.expand(x))))))
            return x + y if self.residual else y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16))
            self.blocks = nn.Sequential(Block(16, 64, 24, 2), Block(24, 72, 24, 1))
            self.head = nn.Linear(24, 10)

        def forward(self, x):
            x = self.blocks(hswish(self.stem(x)))
            return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    net = Net().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.onnx.export(net, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=11,
                      input_names=["input"], output_names=["logits"], training=torch.onnx.TrainingMode.PRESERVE,
                      do_constant_folding=False,
                      dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}})
    proto = onnx.load(str(path))
    nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in proto.graph.initializer]
    nodes += proto.graph.node
    del proto.graph.initializer[:]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def v3_block(tmp_path_factory):
    path = _mobilenet_v3_block_opset11(tmp_path_factory.mktemp("v3") / "v3_opset11.onnx")
    rng = np.random.default_rng(0)
    return path, {"input": rng.normal(size=(16, 3, 64, 64)).astype(np.float32)}


def test_int8_recipe_on_an_opset11_model_with_constant_weights(v3_block, tmp_path):
    path, data = v3_block
    original = onnx.load(str(path))
    assert original.opset_import[0].version == 11 and not original.graph.initializer
    result = slimgraph.run(path, "int8", data=data)
    quantized = result.model
    check(quantized)
    out = tmp_path / "v3.int8.onnx"
    slimgraph.save(quantized, out)
    assert out.stat().st_size < 0.7 * path.stat().st_size  # names and value infos weigh in on so small a model
    float_bytes = slimgraph.run(path, "optimize").model.analysis("params")["bytes"]
    assert quantized.analysis("params")["bytes"] < 0.4 * float_bytes
    stats = result.report.rows[-1].stats
    assert stats["integer_mac_fraction"] == 1.0 and stats["float_nodes"] == []
    assert stats["kinds"]["composite"] >= 5  # HardSwish: QLinearAdd + QLinearMul
    counts = ops(quantized)
    assert not {"HardSwish", "HardSigmoid", "Mul", "Clip", "Div"} & set(counts)
    assert_integer_only(quantized, {"input": data["input"][:1]})
    # dynamic spatial size survives; the logits stay close to the float model's
    for size in (64, 96):
        feeds = {"input": np.random.default_rng(size).normal(size=(2, 3, size, size)).astype(np.float32)}
        a, b = outputs(slimgraph.load(path), feeds)["logits"], outputs(quantized, feeds)["logits"]
        cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
        assert cosine > 0.99, (size, cosine)


def test_int8_qdq_recipe_loads_and_matches_int8(v3_block):
    path, data = v3_block
    qop = slimgraph.run(path, "int8", data=data).model
    qdq = slimgraph.run(path, "int8-qdq", data=data).model
    feeds = {"input": data["input"][:4]}
    a, b = outputs(qop, feeds)["logits"], outputs(qdq, feeds)["logits"]
    assert_within_steps(a, b, 2)


@pytest.mark.slow
def test_int8_recipe_makes_the_opset11_model_faster(v3_block):
    path, data = v3_block
    quantized = slimgraph.run(path, "int8", data=data).model
    stats = ort.bench({"float": path, "int8": quantized}, {"input": data["input"][:1]}, runs=40, threads=2)
    assert stats["int8"].ratio_to(stats["float"]) < 1.0
