import numpy as np
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.passes import PassContext, get_pass
from slimgraph.passes.quantize._layers import fake_quantize_weight, find_layers, set_weight
from tests.helpers import ops, ort_outputs
from tests.passes.quantize._models import with_weights

CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) {
  y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
}
"""

MATMUL_ADD = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N, 5, 8] x) => (float[N, 5, 6] y) {
  h = MatMul(x, w)
  y = Add(h, c)
}
"""

MATMUL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 8] x) => (float[N, 6] y) {
  y = MatMul(x, w)
}
"""


def fake_quantized(model, bits=8):
    """A copy with every layer's weight rounded as quantize.static rounds it."""
    work = model.clone()
    for layer in find_layers(work)[0]:
        set_weight(work, layer, fake_quantize_weight(layer, bits))
    return work


def correct(model, data, **config):
    work = model.clone()
    result = get_pass("quantize.bias_correction")(config)(work, PassContext(data=data, progress=False))
    return work, result


def mean_shift(model, other, feeds, axes):
    a, b = ort_outputs(model, feeds), ort_outputs(other, feeds)
    return {k: (b[k].astype(np.float64) - a[k]).mean(axis=axes) for k in a}


@pytest.mark.parametrize("bits", [8, 4])
def test_conv_mean_output_restored_after_weight_quantization(bits, rng):
    model = with_weights(CONV, w=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                         b=rng.standard_normal(4).astype(np.float32))
    x = (rng.standard_normal((64, 3, 6, 6)) + 1.0).astype(np.float32)  # non-zero mean input
    work, result = correct(model, {"x": x}, bits=bits)
    assert result.modified and result.stats["layers"] == 1 and result.stats["how"] == {"bias": 1}
    before = mean_shift(model, fake_quantized(model, bits), {"x": x}, (0, 2, 3))["y"]
    after = mean_shift(model, fake_quantized(work, bits), {"x": x}, (0, 2, 3))["y"]
    assert np.abs(before).max() > 1e-3
    np.testing.assert_allclose(after, 0.0, atol=1e-5 + 1e-3 * np.abs(before).max())
    assert np.array_equal(find_layers(work)[0][0].weight, find_layers(model)[0][0].weight)  # weights untouched


def test_conv_without_bias_gets_one(rng):
    model = with_weights(CONV.replace("(x, w, b)", "(x, w)"), w=rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    work, result = correct(model, {"x": (rng.standard_normal((16, 3, 6, 6)) + 1).astype(np.float32)}, bits=4)
    assert result.modified and len(work.graph.node(0).inputs) == 3


def test_matmul_bias_folds_into_add(rng):
    model = with_weights(MATMUL_ADD, w=rng.standard_normal((8, 6)).astype(np.float32),
                         c=rng.standard_normal(6).astype(np.float32))
    x = (rng.standard_normal((32, 5, 8)) + 0.5).astype(np.float32)
    work, result = correct(model, {"x": x}, bits=4)
    assert result.stats["how"] == {"folded into Add": 1} and ops(work) == ["MatMul", "Add"]
    after = mean_shift(model, fake_quantized(work, 4), {"x": x}, (0, 1))["y"]
    np.testing.assert_allclose(after, 0.0, atol=1e-4)


def test_matmul_output_gets_an_add_and_keeps_its_name(rng):
    model = with_weights(MATMUL, w=rng.standard_normal((8, 6)).astype(np.float32))
    x = (rng.standard_normal((32, 8)) + 0.5).astype(np.float32)
    work, result = correct(model, {"x": x}, bits=4)
    assert result.stats["how"] == {"Add inserted": 1} and ops(work) == ["MatMul", "Add"]
    assert [o.name for o in work.graph.outputs] == ["y"]
    after = mean_shift(model, fake_quantized(work, 4), {"x": x}, 0)["y"]
    np.testing.assert_allclose(after, 0.0, atol=1e-4)


@pytest.mark.parametrize("sequential, factor", [(True, 0.25), (False, 0.75)])
def test_lowers_the_output_shift_of_the_digits_cnn(sequential, factor):
    """Mean logit shift of int8 weights on held-out images: 0.0156 -> 0.0017 sequential,
    -> 0.0090 per layer (measured)."""
    model = slimgraph.run(slimgraph.load(zoo.digits_cnn()), "optimize").model
    x = zoo.digits_test_data()["input"]
    calib, test = x[:180], x[180:]
    work, result = correct(model, {"input": calib}, bits=8, sequential=sequential)
    assert result.stats["layers"] == 4
    before = np.abs(mean_shift(model, fake_quantized(model), {"input": test}, 0)["logits"]).mean()
    after = np.abs(mean_shift(model, fake_quantized(work), {"input": test}, 0)["logits"]).mean()
    assert after < factor * before


def test_gemm_with_a_full_bias_matrix_is_skipped(rng):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 8] x) => (float[2, 6] y) {
      y = Gemm(x, w, c)
    }
    """
    model = with_weights(text, w=rng.standard_normal((8, 6)).astype(np.float32),
                         c=rng.standard_normal((2, 6)).astype(np.float32))
    work, result = correct(model, {"x": rng.standard_normal((4, 2, 8)).astype(np.float32)})
    assert not result.modified
    assert result.stats["skipped"] == {"bias of shape [2, 6] is not per output channel": 1}


@pytest.mark.parametrize("saturates, expected", [(True, 7), (False, 8)])
def test_auto_bits_follow_quantize_static(saturates, expected, rng, monkeypatch):
    """bits="auto" is static's weight_bits="auto": 7 bits where u8s8 kernels may saturate
    (x86 without VNNI), except depthwise convolutions; the correction is annotated with it."""
    from slimgraph.passes.quantize import _cpu
    from slimgraph.passes.quantize._layers import weight_bits

    monkeypatch.setattr(_cpu, "u8s8_saturates", lambda: saturates)
    model = with_weights(CONV, w=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                         b=rng.standard_normal(4).astype(np.float32))
    work, result = correct(model, {"x": (rng.standard_normal((16, 3, 6, 6)) + 1).astype(np.float32)})
    node = find_layers(work)[0][0].node
    assert slimgraph.Model.annotation(node, "quantize.bias_correction.bits") == expected
    depthwise = with_weights(CONV.replace("Conv <", "Conv <group = 3, ").replace("4, 6, 6] y", "3, 6, 6] y"),
                             w=rng.standard_normal((3, 1, 3, 3)).astype(np.float32), b=np.zeros(3, np.float32))
    assert weight_bits(find_layers(depthwise)[0][0], "auto") == 8
    assert weight_bits(find_layers(depthwise)[0][0], 7) == 7
