import numpy as np
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.passes import get_pass
from slimgraph.passes.quantize._layers import find_layers
from tests.helpers import assert_same_outputs
from tests.passes.quantize._models import spread_channels, with_weights

CONV_CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3, 8, 8] x) => (float[2, 4, 4, 4] y) {
  a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  r = Relu(a)
  p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
  y = Conv <pads = [1, 1, 1, 1]> (p, w2, b2)
}
"""

DEPTHWISE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 6, 8, 8] x) => (float[2, 5, 8, 8] y) {
  a = Conv <group = 6, pads = [1, 1, 1, 1]> (x, dw, db)
  r = LeakyRelu <alpha = 0.1> (a)
  y = Conv (r, pw)
}
"""

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[5, 7] x) => (float[5, 3] y) {
  h = MatMul(x, w1)
  hb = Add(h, b1)
  r = Relu(hb)
  z = Gemm <transB = 1> (r, w2, b2)
  t = Relu(z)
  y = MatMul(t, w3)
}
"""


def _ranges(model):
    """{layer name: (max |w| per output channel, max |w| per input channel)}."""
    out = {}
    for layer in find_layers(model)[0]:
        w = np.abs(layer.weight)
        outs = w.max(axis=tuple(a for a in range(w.ndim) if a != layer.out_axis))
        ins = np.moveaxis(w, layer.in_axis, 0).reshape(w.shape[layer.in_axis], -1).max(axis=1)
        out[layer.name] = (outs, ins)
    return out


def _equalize(model, **config):
    work = model.clone()
    result = get_pass("quantize.equalize")(config)(work)
    return work, result


def test_conv_relu_maxpool_conv_is_exact_and_equalizes(rng):
    model = with_weights(
        CONV_CONV, w1=spread_channels(rng, (6, 3, 3, 3)), b1=rng.standard_normal(6).astype(np.float32),
        w2=rng.standard_normal((4, 6, 3, 3)).astype(np.float32), b2=rng.standard_normal(4).astype(np.float32),
    )
    work, result = _equalize(model)
    assert result.modified and result.stats["pairs"] == 1
    feeds = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert_same_outputs(model, work, feeds, rtol=1e-5)
    layers = find_layers(work)[0]
    r1 = np.abs(layers[0].weight).max(axis=(1, 2, 3))
    r2 = np.abs(layers[1].weight).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # one pair: equal ranges after one step
    before = np.abs(find_layers(model)[0][0].weight).max(axis=(1, 2, 3))
    assert r1.max() / r1.min() < before.max() / before.min() / 5


def test_depthwise_then_pointwise(rng):
    model = with_weights(
        DEPTHWISE, dw=spread_channels(rng, (6, 1, 3, 3), spread=1e4), db=rng.standard_normal(6).astype(np.float32),
        pw=rng.standard_normal((5, 6, 1, 1)).astype(np.float32),
    )
    work, result = _equalize(model)
    assert result.stats["pairs"] == 1
    assert_same_outputs(model, work, {"x": rng.standard_normal((2, 6, 8, 8)).astype(np.float32)}, rtol=1e-5)
    dw, pw = (np.abs(layer.weight) for layer in find_layers(work)[0])
    np.testing.assert_allclose(dw.max(axis=(1, 2, 3)), pw.max(axis=(0, 2, 3)), rtol=1e-5)
    before = np.abs(find_layers(model)[0][0].weight).max(axis=(1, 2, 3))
    after = dw.max(axis=(1, 2, 3))
    assert after.max() / after.min() < 0.1 * before.max() / before.min()


def test_matmul_bias_gemm_chain(rng):
    model = with_weights(
        MLP, w1=spread_channels(rng, (7, 8), axis=1), b1=rng.standard_normal(8).astype(np.float32),
        w2=spread_channels(rng, (6, 8), axis=0), b2=rng.standard_normal(6).astype(np.float32),
        w3=rng.standard_normal((6, 3)).astype(np.float32),
    )
    work, result = _equalize(model, iterations=30)
    assert result.stats["pairs"] == 2
    assert_same_outputs(model, work, {"x": rng.standard_normal((5, 7)).astype(np.float32)}, rtol=1e-5)
    ranges = _ranges(work)
    names = [layer.name for layer in find_layers(work)[0]]
    # middle layer: its output channels now match the next layer's input channels
    np.testing.assert_allclose(ranges[names[1]][0], ranges[names[2]][1], rtol=2e-2)


def test_digits_cnn_through_flatten_is_exact():
    model = slimgraph.run(slimgraph.load(zoo.digits_cnn()), "optimize").model
    work, result = _equalize(model)
    assert result.stats["pairs"] == 3  # conv-conv, conv-conv (through MaxPool), conv-Gemm (Reshape)
    x = zoo.digits_test_data()["input"][:32]
    assert_same_outputs(model, work, {"input": x}, rtol=1e-5)


@pytest.mark.parametrize("between, reason", [
    ("r = Clip(a, lo, hi)", "Clip between the layers"),
    ("r = Sigmoid(a)", "Sigmoid between the layers"),
])
def test_not_scale_equivariant_ops_stop_it(between, reason, rng):
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y) {{
      a = Conv(x, w1)
      {between}
      y = Conv(r, w2)
    }}
    """
    model = with_weights(text, w1=spread_channels(rng, (6, 3, 1, 1)), w2=rng.standard_normal((4, 6, 1, 1)).astype(np.float32),
                         lo=np.array(0, np.float32), hi=np.array(6, np.float32))
    work, result = _equalize(model)
    assert not result.modified
    assert any(reason in k for k in result.stats["skipped"])


def test_branch_and_shared_weight_are_skipped(rng):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 4, 4] x) => (float[1, 3, 4, 4] y, float[1, 3, 4, 4] z) {
      a = Conv(x, w)
      r = Relu(a)
      y = Conv(r, w)
      z = Relu(a)
    }
    """
    model = with_weights(text, w=spread_channels(rng, (3, 3, 1, 1)))
    work, result = _equalize(model)
    assert not result.modified
    assert result.stats["skipped"] == {"weight is shared or a graph input": 2}
