"""quantize.fp8: E4M3FN round trip, QDQ structure, ORT CPU runs it (with the dequantized
weights' outputs, to float rounding), bad input, a real model."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import slimgraph
from slimgraph.errors import PassError, PipelineError
from slimgraph.passes.quantize.fp8 import E4M3_MAX, QuantizeFp8, dequantize_e4m3, quantize_e4m3, to_e4m3
from tests.helpers import ort_outputs
from tests.passes.quantize._models import with_weights

HEADER = '<ir_version: 8, opset_import: ["" : 21]>'


def test_e4m3_round_trip():
    # every finite E4M3FN value survives float -> fp8 -> float exactly
    every = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    finite = every[np.isfinite(every)]
    np.testing.assert_array_equal(to_e4m3(finite).astype(np.float32), finite)
    # out of range saturates to +-448 (no NaN), values in range round to 3 mantissa bits
    assert to_e4m3(np.array([1e6, -1e6], np.float32)).astype(np.float32).tolist() == [E4M3_MAX, -E4M3_MAX]
    x = np.random.default_rng(0).uniform(0.02, 400, 10_000).astype(np.float32)
    rel = np.abs(to_e4m3(x).astype(np.float32) - x) / x
    assert rel.max() <= 2.0 ** -4 + 1e-7


def test_per_channel_scales_use_the_full_range(rng):
    w = rng.standard_normal((16, 8)).astype(np.float32) * np.arange(1, 9)
    q, scale = quantize_e4m3(w, axis=1)
    assert scale.shape == (8,)
    np.testing.assert_allclose(np.abs(q.astype(np.float32)).max(axis=0), E4M3_MAX)
    assert np.abs(dequantize_e4m3(q, scale, 1) - w).max() <= np.abs(w).max() * 2.0 ** -4


@pytest.mark.parametrize("per_channel", [True, False])
def test_matmul_and_conv_weights_become_qdq_that_ort_cpu_runs(rng, per_channel):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    k = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    text = f"""{HEADER} g (float[2, 64] x, float[1, 8, 6, 6] img) => (float[2, 32] y, float[1, 16, 4, 4] z) {{
        y = MatMul(x, w)
        z = Conv(img, k)
    }}"""
    model = with_weights(text, w=w, k=k)
    result = slimgraph.run(model, [{"quantize.fp8": {"per_channel": per_channel, "min_weight_elements": 0}}])
    assert result.report.rows[-1].stats["weights"] == 2
    dqs = [n for n in result.model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2
    assert all(n.inputs[0].dtype.name == "FLOAT8E4M3FN" for n in dqs)
    assert "w" not in result.model.graph.initializers
    feeds = {"x": rng.standard_normal((2, 64)).astype(np.float32),
             "img": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)}
    out = ort_outputs(result.model, feeds)
    axis_w, axis_k = (1, 0) if per_channel else (None, None)
    wq = dequantize_e4m3(*quantize_e4m3(w, axis_w), axis_w)
    np.testing.assert_allclose(out["y"], feeds["x"] @ wq, rtol=1e-5, atol=1e-5)
    kq = dequantize_e4m3(*quantize_e4m3(k, axis_k), axis_k)
    ref = ort_outputs(with_weights(text, w=wq, k=kq), feeds)
    np.testing.assert_allclose(out["z"], ref["z"], rtol=1e-5, atol=1e-5)
    # and ORT with its optimizations on runs it too
    from slimgraph.backends import ort

    np.testing.assert_allclose(ort.run(ort.session(result.model), feeds)["y"], out["y"], rtol=1e-5, atol=1e-5)


def test_activation_qdq_needs_data_and_adds_fp8_pairs(rng):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    model = with_weights(f"{HEADER} g (float[2, 64] x) => (float[2, 32] y) {{ y = MatMul(x, w) }}", w=w)
    with pytest.raises(PassError, match="activations=true needs sample data"):
        slimgraph.run(model, [{"quantize.fp8": {"activations": True}}])
    data = {"x": rng.standard_normal((8, 64)).astype(np.float32)}
    result = slimgraph.run(model, [{"quantize.fp8": {"activations": True}}], data=data)
    assert [n.op_type for n in result.model.graph] == ["DequantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMul"]
    x = data["x"][:2]
    out = ort_outputs(result.model, {"x": x})["y"]
    assert np.abs(out - x @ w).max() / np.abs(x @ w).max() < 0.1  # two 3-bit-mantissa roundings


def test_old_opset_and_bad_config_are_clear_errors(rng):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    text = '<ir_version: 8, opset_import: ["" : 17]> g (float[2, 64] x) => (float[2, 32] y) { y = MatMul(x, w) }'
    with pytest.raises(PassError, match="needs opset >= 19.*run upgrade_opset first"):
        slimgraph.run(with_weights(text, w=w), ["quantize.fp8"])
    with pytest.raises(PipelineError, match=r"unknown op types \['Gather'\]"):
        QuantizeFp8(op_types=["Gather"])


def test_magika_fp8_weights_recipe():
    """magika through the fp8-weights recipe (opset 15 -> 21): ORT CPU loads and runs it,
    top-1 agrees with the float model on real files, the weights are 4x smaller."""
    from slimgraph import zoo
    from slimgraph.backends import ort

    path = zoo.magika_model_path()
    result = slimgraph.run(path, "fp8-weights")
    assert result.report.rows[-1].stats["weights"] == 3
    feeds = zoo.magika_inputs(48, seed=3)
    ref, out = ort.run(ort.session(path), feeds), ort.run(ort.session(result.model), feeds)
    name = next(iter(ref))
    assert (ref[name].argmax(1) == out[name].argmax(1)).mean() >= 46 / 48
    assert result.model.analysis("params")["bytes"] < 0.3 * slimgraph.load(path).analysis("params")["bytes"]
