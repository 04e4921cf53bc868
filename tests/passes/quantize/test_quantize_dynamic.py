"""quantize.dynamic: golden structure, exactness against an integer reference, saturation on
x86 without VNNI, Conv as im2col, embeddings, skips and bad configs, real models.

Tolerances: a lowered layer is checked against a numpy simulation of the same integer
arithmetic (uint8 activation per tensor as DynamicQuantizeLinear computes it, our integer
weights, int32 accumulation): ORT must agree to float rounding (1e-5 of the output's
scale). Against the float model, the error is that of 8-bit quantization: a few percent of
the output's scale on random data, stated per test.
"""

from __future__ import annotations

import numpy as np
import pytest

import slimgraph
from slimgraph.errors import PipelineError
from slimgraph.passes.quantize.quantize_dynamic import QuantizeDynamic, pair_bound, quantize_weight
from tests.helpers import ort_outputs
from tests.passes.quantize._models import with_weights

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def linear_model(w: np.ndarray, b: np.ndarray | None = None, rows: int = 8):
    k, n = w.shape
    if b is None:
        text = f"{HEADER} g (float[2, {rows}, {k}] x) => (float[2, {rows}, {n}] y) {{ y = MatMul(x, w) }}"
        return with_weights(text, w=w)
    text = f"{HEADER} g (float[2, {rows}, {k}] x) => (float[2, {rows}, {n}] y) {{ m = MatMul(x, w)\n y = Add(m, b) }}"
    return with_weights(text, w=w, b=b)


def dynamic_quantize_linear(a: np.ndarray) -> tuple[np.ndarray, float, int]:
    """ONNX DynamicQuantizeLinear: uint8, range widened to include 0, round half to even."""
    lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    zp = int(np.clip(np.round(-lo / scale), 0, 255))
    return np.clip(np.round(a / scale) + zp, 0, 255).astype(np.int64), float(scale), zp


def integer_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, **params) -> np.ndarray:
    """What the lowered layer computes, in exact integer arithmetic."""
    q, qp = quantize_weight(w, **params)
    aq, a_scale, a_zp = dynamic_quantize_linear(x)
    acc = (aq - a_zp) @ (q.astype(np.int64) - qp.zero_point.astype(np.int64))
    y = acc.astype(np.float64) * a_scale * qp.scale.astype(np.float64)
    return y + (b if b is not None else 0)


def quantize(model, ctx_data=None, **config):
    """Run quantize.dynamic; the tiny test layers are quantized whatever their size."""
    config.setdefault("min_weight_elements", 0)
    return slimgraph.run(model, [{"quantize.dynamic": config}], data=ctx_data)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


DEFAULT_WEIGHTS = dict(dtype="int8", bits=8, symmetric=True, per_channel=True, pair_safe=True)


# --- golden structure and exactness --------------------------------------------------------------
def test_matmul_add_becomes_one_dynamic_quantize_matmul_with_the_bias(rng):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    result = quantize(linear_model(w, b))
    ops = [n.op_type for n in result.model.graph]
    assert ops == ["DynamicQuantizeMatMul"]
    node = next(iter(result.model.graph))
    assert node.domain == "com.microsoft" and node.inputs[4] is not None
    assert result.report.rows[-1].stats["matmul"] == 1
    assert result.model.graph.outputs[0].name == "y"  # the graph output keeps its name
    assert "w" not in result.model.graph.initializers  # the float weight is gone


def test_ort_computes_exactly_the_integer_reference(rng):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    x = rng.standard_normal((2, 8, 64)).astype(np.float32)
    out = ort_outputs(quantize(linear_model(w, b)).model, {"x": x})["y"]
    ref = integer_reference(x, w, b, **DEFAULT_WEIGHTS)
    assert rel_err(ref, out) < 1e-5
    # and it is an 8-bit approximation of the float layer (random data: ~1% of the scale)
    assert rel_err(x @ w + b, out) < 0.03


@pytest.mark.parametrize("config", [
    dict(per_channel=False),
    dict(weight_type="uint8"),
    dict(reduce_range=True),
    dict(weight_type="int8", symmetric=False, reduce_range=True),
    dict(weight_type="uint8", symmetric=False),
])
def test_weight_variants_match_their_integer_reference(rng, config):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    x = rng.standard_normal((2, 8, 64)).astype(np.float32)
    out = ort_outputs(quantize(linear_model(w), **config).model, {"x": x})["y"]
    params = QuantizeDynamic(config)._weight_params()
    ref = integer_reference(x, w, None, **params)
    assert rel_err(ref, out) < 1e-5
    assert rel_err(x @ w, out) < 0.05


def test_standard_integer_format_matches_the_contrib_op(rng, tmp_path):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    x = rng.standard_normal((2, 8, 64)).astype(np.float32)
    standard = quantize(linear_model(w, b), format="integer").model
    assert {n.op_type for n in standard.graph} == {"DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Add"}
    assert all(n.domain == "" for n in standard.graph)
    out = ort_outputs(standard, {"x": x})["y"]
    assert rel_err(integer_reference(x, w, b, **DEFAULT_WEIGHTS), out) < 1e-5
    # written in the shape ORT's own fusion recognizes: it runs one fused kernel
    import onnx

    from slimgraph.backends import ort

    ort.session(standard, optimized_model_path=tmp_path / "opt.onnx")
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["DynamicQuantizeMatMul"]


def test_gemm_with_trans_b_alpha_and_beta(rng):
    w = rng.standard_normal((32, 64)).astype(np.float32)  # [N, K] with transB
    c = rng.standard_normal(32).astype(np.float32)
    text = f"{HEADER} g (float[4, 64] x) => (float[4, 32] y) {{ y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, w, c) }}"
    x = rng.standard_normal((4, 64)).astype(np.float32)
    result = quantize(with_weights(text, w=w, c=c))
    assert [n.op_type for n in result.model.graph] == ["DynamicQuantizeMatMul"]
    out = ort_outputs(result.model, {"x": x})["y"]
    ref = integer_reference(x, 0.5 * w.T, 2.0 * c, **DEFAULT_WEIGHTS)
    assert rel_err(ref, out) < 1e-5


def test_layers_reading_one_activation_quantize_it_once(rng):
    """Attention's Q, K, V: one DynamicQuantizeLinear, three MatMulIntegerToFloat, each
    exactly its integer reference."""
    ws = [rng.standard_normal((64, 32)).astype(np.float32) for _ in range(3)]
    b = rng.standard_normal(32).astype(np.float32)
    text = f"""{HEADER} g (float[2, 8, 64] x) => (float[2, 8, 32] q, float[2, 8, 32] k, float[2, 8, 32] v) {{
        q = MatMul(x, wq)
        k = MatMul(x, wk)
        m = MatMul(x, wv)
        v = Add(m, b)
    }}"""
    model = quantize(with_weights(text, wq=ws[0], wk=ws[1], wv=ws[2], b=b)).model
    assert [n.op_type for n in model.graph] == ["DynamicQuantizeLinear"] + ["MatMulIntegerToFloat"] * 3
    x = rng.standard_normal((2, 8, 64)).astype(np.float32)
    out = ort_outputs(model, {"x": x})
    for name, w, bias in (("q", ws[0], None), ("k", ws[1], None), ("v", ws[2], b)):
        assert rel_err(integer_reference(x, w, bias, **DEFAULT_WEIGHTS), out[name]) < 1e-5


def test_a_shared_weight_is_stored_once(rng):
    w = rng.standard_normal((64, 64)).astype(np.float32)
    text = f"{HEADER} g (float[2, 64] x) => (float[2, 64] y) {{ h = MatMul(x, w)\n y = MatMul(h, w) }}"
    model = quantize(with_weights(text, w=w)).model
    nodes = list(model.graph)
    assert [n.op_type for n in nodes] == ["DynamicQuantizeMatMul"] * 2
    assert nodes[0].inputs[1] is nodes[1].inputs[1]


# --- saturation of u8s8 products on x86 without VNNI -----------------------------------------------
def saturating_layer(k: int = 64, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Weights whose even/odd row pairs are both near the column maximum, and activations at
    the top of their range: with full-range int8 weights, 255 * 127 * 2 > 32767."""
    w = np.full((k, n), 0.9, np.float32)
    w[::7] = 1.0
    x = np.full((1, k), 3.0, np.float32)
    x[0, ::5] = 0.0  # zero point 0: the quantized activation is 0 or 255
    return w, x


def test_pair_bound_keeps_every_same_sign_pair_within_128(rng):
    w = rng.standard_normal((129, 40)).astype(np.float32)
    w[10:12, 3] = 5.0  # one saturating pair
    q, _ = quantize_weight(w, **DEFAULT_WEIGHTS)
    pairs = q[0:128:2].astype(int), q[1:129:2].astype(int)
    same = np.sign(pairs[0]) == np.sign(pairs[1])
    assert np.all(np.where(same, np.abs(pairs[0]) + np.abs(pairs[1]), 0) <= 128)
    assert np.abs(q).max() <= 127
    assert pair_bound(w)[3] == pytest.approx(10.0)


def test_a_layer_that_would_saturate_gives_the_float_result_on_this_cpu():
    """Issue 3, item 7: after slimgraph quantization this CPU's output is the float model's
    within quantization tolerance, where full-range int8 weights lose up to half a product."""
    w, x = saturating_layer()
    x3 = x.reshape(1, 1, -1)
    model = linear_model(w, rows=1)
    exact = (x @ w).reshape(-1)
    safe = ort_outputs(quantize(model).model, {"x": np.broadcast_to(x3, (2, 1, 64)).copy()})["y"][0, 0]
    assert rel_err(exact, safe) < 0.01  # 8-bit steps: well under 1%
    for config in (dict(reduce_range=True), dict(weight_type="uint8")):
        other = ort_outputs(quantize(model, **config).model, {"x": np.broadcast_to(x3, (2, 1, 64)).copy()})["y"][0, 0]
        assert rel_err(exact, other) < 0.01
    # Full-range int8: exact on VNNI CPUs, saturated (~40% low) on AVX2 without VNNI.
    unsafe = ort_outputs(quantize(model, pair_safe=False).model,
                         {"x": np.broadcast_to(x3, (2, 1, 64)).copy()})["y"][0, 0]
    assert rel_err(exact, unsafe) < 0.01 or unsafe.max() < 0.9 * exact.max()


# --- Conv as im2col ---------------------------------------------------------------------------
@pytest.mark.parametrize("attrs, kernel", [
    ("", (5, 1)),
    ("pads = [2, 0, 2, 0], strides = [2, 1], dilations = [2, 1]", (3, 1)),
    ("pads = [1, 1, 1, 1], strides = [2, 2]", (3, 3)),
    ("", (1, 1)),
])
def test_conv_as_im2col_product(rng, attrs, kernel):
    w = (rng.standard_normal((48, 32, *kernel)) * 0.1).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    attr_text = f"<{attrs}>" if attrs else ""
    text = f"{HEADER} g (float[2, 32, 20, 9] x) => (float[2, 48, ?, ?] y) {{ y = Conv {attr_text} (x, w, b) }}"
    model = slimgraph.run(with_weights(text, w=w, b=b), "infer_shapes").model
    x = rng.standard_normal((2, 32, 20, 9)).astype(np.float32)
    result = quantize(model, max_conv_taps=9)
    ops = [n.op_type for n in result.model.graph]
    assert "Conv" not in ops and "DynamicQuantizeMatMul" in ops
    assert ops.count("Slice") == (0 if kernel == (1, 1) else int(np.prod(kernel)))
    ref, out = ort_outputs(model, {"x": x})["y"], ort_outputs(result.model, {"x": x})["y"]
    assert ref.shape == out.shape
    assert rel_err(ref, out) < 0.03


def test_conv_kept_float_when_it_has_too_many_taps_grouped_or_unknown_rank(rng):
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    text = f"{HEADER} g (float[1, 8, 10, 10] x) => (float[1, 8, 8, 8] y) {{ y = Conv(x, w) }}"
    result = quantize(with_weights(text, w=w), min_weight_elements=0)
    assert [n.op_type for n in result.model.graph] == ["Conv"]
    assert result.report.rows[-1].stats["skipped"] == {"Conv kernel has more than max_conv_taps taps": 1}
    dw = rng.standard_normal((8, 1, 5, 1)).astype(np.float32)
    text = f"{HEADER} g (float[1, 8, 10, 1] x) => (float[1, 8, 6, 1] y) {{ y = Conv <group = 8> (x, w) }}"
    result = quantize(with_weights(text, w=dw), min_weight_elements=0)
    assert result.report.rows[-1].stats["skipped"] == {"grouped or depthwise Conv": 1}


# --- embeddings -----------------------------------------------------------------------------------
def test_embedding_table_as_8_bit_blocks(rng):
    table = rng.standard_normal((100, 96)).astype(np.float32)
    table[3] *= 50  # one loud row: blocks keep the others precise
    text = f"{HEADER} g (int64[2, 5] ids) => (float[2, 5, 96] y) {{ y = Gather(table, ids) }}"
    result = quantize(with_weights(text, table=table), embeddings=True)
    node = next(iter(result.model.graph))
    assert node.op_type == "GatherBlockQuantized" and node.attributes.get_int("block_size") == 32
    ids = np.array([[0, 3, 7, 99, 50], [1, 2, 3, 4, 5]], np.int64)
    out = ort_outputs(result.model, {"ids": ids})["y"]
    rows = table[ids]
    step = np.abs(rows.reshape(2, 5, 3, 32)).max(-1, keepdims=True) / 127
    assert np.all(np.abs(out - rows).reshape(2, 5, 3, 32) <= step / 2 + 1e-6)
    assert result.model.analysis("params")["bytes"] < table.nbytes / 3.5


# --- what is left alone, and why ---------------------------------------------------------------------
def test_activation_products_small_weights_and_excluded_layers_are_skipped(rng):
    w = rng.standard_normal((64, 64)).astype(np.float32)
    small = rng.standard_normal((64, 8)).astype(np.float32)
    text = f"""{HEADER} g (float[2, 64] x, float[64, 2] z) => (float[2, 2] y, float[2, 8] s, float[2, 64] e) {{
        y = MatMul(x, z)
        s = MatMul(x, small)
        e = MatMul(x, w)
    }}"""
    model = with_weights(text, w=w, small=small)
    stats = quantize(model, exclude=["e"], min_weight_elements=4096).report.rows[-1].stats
    assert stats["matmul"] == 0
    assert stats["skipped"] == {"weight is not a constant": 1, "weight smaller than min_weight_elements": 1,
                                "excluded by pattern": 1}
    assert quantize(model, exclude=["e"], min_weight_elements=4096).report.rows[-1].modified is False


def test_bad_configs_are_clear_errors():
    with pytest.raises(PipelineError, match=r"unknown op types \['LSTM'\]"):
        QuantizeDynamic(op_types=["MatMul", "LSTM"])
    with pytest.raises(PipelineError, match="pair_safe needs symmetric int8"):
        QuantizeDynamic(weight_type="int8", symmetric=False)
    with pytest.raises(PipelineError, match="weight_type must be one of"):
        QuantizeDynamic(weight_type="int4")


# --- smoothing with data -------------------------------------------------------------------------------
def test_smoothing_runs_only_with_data_and_helps_outlier_channels(rng):
    w = rng.standard_normal((64, 64)).astype(np.float32) * 0.1
    model = linear_model(w)
    x = rng.standard_normal((16, 8, 64)).astype(np.float32)
    x[..., 5] *= 60  # an outlier channel, as after a transformer's LayerNorm
    plain = quantize(model, ctx_data={"x": x[:8]})
    no_data = quantize(model)
    assert "smoothquant" in plain.report.rows[-1].stats and "smoothquant" not in no_data.report.rows[-1].stats
    test = {"x": x[8:10]}
    ref = ort_outputs(model, test)["y"]
    err_smooth = rel_err(ref, ort_outputs(plain.model, test)["y"])
    err_plain = rel_err(ref, ort_outputs(no_data.model, test)["y"])
    assert err_smooth < 0.6 * err_plain


# --- real model: magika ---------------------------------------------------------------------------------
def test_magika_int8_dynamic_recipe_agrees_with_float():
    """The int8-dynamic recipe on magika: its one-hot MatMul, Conv (as im2col) and Gemm all
    quantized; top-1 agrees with the float model on real files of this machine."""
    from slimgraph import zoo
    from slimgraph.backends import ort

    path = zoo.magika_model_path()
    feeds = zoo.magika_inputs(48, seed=1)
    result = slimgraph.run(path, "int8-dynamic")
    stats = result.report.rows[-1].stats
    assert stats["matmul"] == 2 and stats["conv"] == 1
    ops = {n.op_type for n in result.model.graph}
    assert "Conv" not in ops and "MatMul" not in ops and "Gemm" not in ops
    ref = ort.run(ort.session(path), feeds)
    out = ort.run(ort.session(result.model), feeds)
    name = next(iter(ref))
    assert (ref[name].argmax(1) == out[name].argmax(1)).mean() >= 47 / 48
    assert result.model.analysis("params")["bytes"] < 0.4 * slimgraph.load(path).analysis("params")["bytes"]


@pytest.mark.slow
def test_minilm_int8_dynamic_recipe_cosine():
    """all-MiniLM-L6-v2 with the int8-dynamic recipe, smoothed on 32 calibration sentences:
    mean cosine of sentence embeddings >= 0.995 and min >= 0.985 on 64 other sentences."""
    from slimgraph import zoo
    from slimgraph.backends import ort

    path = zoo.minilm()
    calib = zoo.minilm_inputs(zoo.minilm_sentences(32, seed=1))
    feeds = zoo.minilm_inputs(zoo.minilm_sentences(64, seed=0))
    result = slimgraph.run(path, "int8-dynamic", data=calib)
    assert result.report.rows[-1].stats["matmul"] == 36
    ref = ort.run_batched(ort.session(path), feeds)[zoo.MINILM_OUTPUT]
    out = ort.run_batched(ort.session(result.model), feeds, batch_size=1)[zoo.MINILM_OUTPUT]
    cos = zoo.minilm_fidelity(ref, out)
    assert cos.mean() >= 0.995 and cos.min() >= 0.985
