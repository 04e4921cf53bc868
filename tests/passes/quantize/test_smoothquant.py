import numpy as np
import pytest

import slimgraph
from slimgraph.errors import PipelineError
from slimgraph.passes import PassContext, get_pass
from slimgraph.passes.quantize._layers import find_layers
from slimgraph.passes.quantize.qparams import QParams
from tests.helpers import assert_same_outputs, ops
from tests.passes.quantize._models import with_weights

LAYERNORM_QK = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4, 5, 8] x) => (float[4, 5, 6] q, float[4, 5, 6] k) {
  n = LayerNormalization <axis = -1> (x, gamma, beta)
  q = MatMul(n, wq)
  k = MatMul(n, wk)
}
"""

WRITTEN_OUT_NORM = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4, 5, 8] z) => (float[4, 6] y) {
  m = Mul(z, gamma)
  a = Add(m, beta)
  r = Reshape(a, shape)
  y = Gemm <transB = 1> (r, w, bias)
}
"""

INPUT_MATMUL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4, 8] x) => (float[4, 6] y) {
  y = MatMul(x, w)
}
"""

GAMMA = np.array([1.0, 0.5, 40.0, 1.2, 0.8, 25.0, 1.0, 0.7], np.float32)  # two outlier channels


def _model(rng):
    return with_weights(LAYERNORM_QK, gamma=GAMMA, beta=rng.standard_normal(8).astype(np.float32) * 0.1,
                        wq=rng.standard_normal((8, 6)).astype(np.float32),
                        wk=rng.standard_normal((8, 6)).astype(np.float32))


def _smooth(model, data, **config):
    work = model.clone()
    result = get_pass("quantize.smoothquant")(config)(work, PassContext(data=data, progress=False))
    return work, result


def _fake_quant_error(n, w):
    """||Q(n) @ Q(w) - n @ w|| / ||n @ w|| with n per-tensor uint8, w per-channel int8."""
    qa = QParams.from_range(n.min(), n.max(), dtype="uint8")
    qw = QParams.from_range(w.min(axis=0), w.max(axis=0), dtype="int8", symmetric=True, axis=1)
    ref = n @ w
    got = qa.dequantize(qa.quantize(n)) @ qw.dequantize(qw.quantize(w))
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _layernorm(x, gamma, beta):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * gamma + beta


def test_folds_into_layernorm_exactly_and_helps_quantization(rng):
    model = _model(rng)
    x = rng.standard_normal((16, 4, 5, 8)).astype(np.float32)  # stacked: 16 samples of [4, 5, 8]
    work, result = _smooth(model, {"x": x})
    assert result.stats == {"layers": 2, "folded": 1, "inserted_mul": 0, "skipped": {}}
    assert ops(work) == ops(model)
    assert_same_outputs(model, work, {"x": x[0]}, rtol=1e-5)

    gamma = work.graph.node(0).inputs[1].const_value.numpy()
    beta = work.graph.node(0).inputs[2].const_value.numpy()
    before = _layernorm(x, GAMMA, model.graph.node(0).inputs[2].const_value.numpy()).reshape(-1, 8)
    after = _layernorm(x, gamma, beta).reshape(-1, 8)
    w_before, w_after = find_layers(model)[0][0].weight, find_layers(work)[0][0].weight
    assert np.abs(after).max(0).max() / np.abs(after).max(0).min() < np.abs(before).max(0).max() / np.abs(before).max(0).min() / 4
    assert _fake_quant_error(after, w_after) < 0.7 * _fake_quant_error(before, w_before)


def test_shared_scale_for_layers_reading_one_activation(rng):
    model = _model(rng)
    work, _ = _smooth(model, {"x": rng.standard_normal((8, 4, 5, 8)).astype(np.float32)})
    (q0, k0), (q1, k1) = ([layer.weight for layer in find_layers(m)[0]] for m in (model, work))
    np.testing.assert_allclose(q1[:, 0] / q0[:, 0], k1[:, 0] / k0[:, 0], rtol=1e-5)


def test_alpha_zero_moves_nothing_into_activations(rng):
    """alpha = 0: s = 1 / max|W_j|, every weight row ends with max 1."""
    model = _model(rng)
    work, _ = _smooth(model, {"x": rng.standard_normal((8, 4, 5, 8)).astype(np.float32)}, alpha=0.0)
    both = np.concatenate([layer.weight for layer in find_layers(work)[0]], axis=1)
    np.testing.assert_allclose(np.abs(both).max(axis=1), 1.0, rtol=1e-5)


def test_gemm_behind_a_reshape_gets_a_mul(rng):
    """The Reshape cannot absorb 1/s: a Mul is inserted before the Gemm (transB=1, bias)."""
    model = with_weights(
        WRITTEN_OUT_NORM, gamma=GAMMA, beta=rng.standard_normal(8).astype(np.float32),
        shape=np.array([0, -1], np.int64), w=rng.standard_normal((6, 40)).astype(np.float32),
        bias=rng.standard_normal(6).astype(np.float32),
    )
    z = rng.standard_normal((16, 4, 5, 8)).astype(np.float32)
    work, result = _smooth(model, {"z": z})
    assert result.stats == {"layers": 1, "folded": 0, "inserted_mul": 1, "skipped": {}}
    assert ops(work) == ["Mul", "Add", "Reshape", "Mul", "Gemm"]
    assert_same_outputs(model, work, {"z": z[0]}, rtol=1e-5)


def test_folds_into_mul_add_pair(rng):
    text = WRITTEN_OUT_NORM.replace("r = Reshape(a, shape)\n", "").replace("float[4, 6] y", "float[4, 5, 6] y") \
        .replace("Gemm <transB = 1> (r, w, bias)", "MatMul(a, w)")
    model = with_weights(text, gamma=GAMMA, beta=rng.standard_normal(8).astype(np.float32),
                         w=rng.standard_normal((8, 6)).astype(np.float32))
    z = rng.standard_normal((16, 4, 5, 8)).astype(np.float32)
    work, result = _smooth(model, {"z": z})
    assert result.stats["folded"] == 1 and result.stats["inserted_mul"] == 0
    assert ops(work) == ["Mul", "Add", "MatMul"]
    assert_same_outputs(model, work, {"z": z[0]}, rtol=1e-5)


def test_graph_input_gets_a_mul_or_is_skipped(rng):
    x = rng.standard_normal((32, 4, 8)).astype(np.float32) * GAMMA
    model = with_weights(INPUT_MATMUL, w=rng.standard_normal((8, 6)).astype(np.float32))
    work, result = _smooth(model, {"x": x})
    assert ops(work) == ["Mul", "MatMul"] and result.stats["inserted_mul"] == 1
    assert_same_outputs(model, work, {"x": x[0]}, rtol=1e-5)
    work, result = _smooth(model, {"x": x}, insert_mul=False)
    assert not result.modified and result.stats["skipped"] == {"the activation is a graph input": 1}


def test_needs_data(rng):
    model = _model(rng)
    with pytest.raises(PipelineError, match="needs sample data"):
        slimgraph.run(model, "quantize.smoothquant")
