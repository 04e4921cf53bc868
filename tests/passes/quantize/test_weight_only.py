"""quantize.weight_only: 4-bit packing, MatMulNBits and GatherBlockQuantized against a numpy
dequantization (ORT must agree to float rounding, 1e-5 of the output's scale: this checks
the packed layouts), the error-reducing methods, bad configs, real models."""

from __future__ import annotations

import numpy as np
import pytest

import slimgraph
from slimgraph.errors import PassError
from slimgraph.passes.quantize.weight_only import (
    dequantize_blocks, gptq, pack, quantize_blocks, unpack,
)
from tests.helpers import ort_outputs
from tests.passes.quantize._models import with_weights

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def quantize(model, data=None, **config):
    config.setdefault("min_weight_elements", 0)
    return slimgraph.run(model, [{"quantize.weight_only": config}], data=data)


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def dequantized_weight(w: np.ndarray, block: int, **kwargs) -> np.ndarray:
    """What MatMulNBits should multiply by: w [K, N] through quantize_blocks along K."""
    k, n = w.shape
    codes, scale, zero = quantize_blocks(np.ascontiguousarray(w.T).reshape(n, k // block, block), **kwargs)
    return dequantize_blocks(codes, scale, zero).reshape(n, k).T


# --- packing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, n", [(4, 64), (4, 33), (8, 17)])
def test_pack_round_trip_is_exact(rng, bits, n):
    codes = rng.integers(0, 1 << bits, (5, 3, n)).astype(np.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, 3, -(-n * bits // 8))
    np.testing.assert_array_equal(unpack(packed, bits, n), codes)
    if bits == 4:
        assert packed[0, 0, 0] == codes[0, 0, 0] | (codes[0, 0, 1] << 4)  # low nibble first


# --- MatMulNBits -------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric, block", [(False, 32), (True, 32), (False, 128), (True, 16)])
def test_matmul_becomes_matmul_nbits_computing_the_dequantized_weight(rng, symmetric, block):
    w = rng.standard_normal((256, 48)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    text = f"{HEADER} g (float[3, 256] x) => (float[3, 48] y) {{ m = MatMul(x, w)\n y = Add(m, b) }}"
    result = quantize(with_weights(text, w=w, b=b), method="rtn", symmetric=symmetric, block_size=block)
    nodes = list(result.model.graph)
    assert [n.op_type for n in nodes] == ["MatMulNBits"]
    attrs = nodes[0].attributes
    assert (attrs.get_int("K"), attrs.get_int("N"), attrs.get_int("bits"), attrs.get_int("block_size")) == (256, 48, 4, block)
    assert (nodes[0].inputs[3] is None) == symmetric  # zero points only when asymmetric
    x = rng.standard_normal((3, 256)).astype(np.float32)
    out = ort_outputs(result.model, {"x": x})["y"]
    ref = x @ dequantized_weight(w, block, bits=4, symmetric=symmetric) + b
    assert rel_err(ref, out) < 1e-5
    # 4-bit blocks of Gaussian weights: ~10% relative weight error, less on the output
    assert rel_err(x @ w + b, out) < 0.2


def test_gemm_trans_b(rng):
    w = rng.standard_normal((16, 64)).astype(np.float32)
    text = f"{HEADER} g (float[2, 64] x) => (float[2, 16] y) {{ y = Gemm <transB = 1> (x, w) }}"
    result = quantize(with_weights(text, w=w), method="rtn")
    x = rng.standard_normal((2, 64)).astype(np.float32)
    ref = x @ dequantized_weight(np.ascontiguousarray(w.T), 32, bits=4, symmetric=False)
    assert rel_err(ref, ort_outputs(result.model, {"x": x})["y"]) < 1e-5


def test_block_size_not_dividing_k_names_the_layer(rng):
    w = rng.standard_normal((100, 8)).astype(np.float32)
    text = f"{HEADER} g (float[2, 100] x) => (float[2, 8] y) {{ y = MatMul(x, w) }}"
    with pytest.raises(PassError, match=r"layer .*weight 'w' with K=100.*block_size 32 does not divide K"):
        quantize(with_weights(text, w=w))


def test_gptq_without_data_is_a_clear_error(rng):
    w = rng.standard_normal((64, 8)).astype(np.float32)
    text = f"{HEADER} g (float[2, 64] x) => (float[2, 8] y) {{ y = MatMul(x, w) }}"
    with pytest.raises(PassError, match="method 'gptq' needs sample data"):
        quantize(with_weights(text, w=w), method="gptq")
    assert quantize(with_weights(text, w=w)).report.rows[-1].stats["method"] == "hqq"  # auto, no data


# --- the error-reducing methods -----------------------------------------------------------------
def test_hqq_never_raises_a_blocks_weight_error(rng):
    blocks = rng.standard_normal((64, 8, 32)).astype(np.float32)
    blocks[::5, :, 3] *= 8  # outliers: where HQQ helps
    errors = {}
    for method in ("rtn", "hqq"):
        codes, scale, zero = quantize_blocks(blocks, bits=4, symmetric=False, method=method)
        assert codes.max() <= 15 and zero.max() <= 15
        errors[method] = ((dequantize_blocks(codes, scale, zero) - blocks) ** 2).sum(axis=-1)
    assert np.all(errors["hqq"] <= errors["rtn"] + 1e-6)
    assert errors["hqq"].sum() < 0.97 * errors["rtn"].sum()


def test_gptq_lowers_the_output_error_on_correlated_inputs(rng):
    k, n = 128, 64
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((2000, k)) @ mix + 0.3 * rng.standard_normal((2000, k))  # correlated channels
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = x.T @ x / len(x)
    codes, scale, zero = gptq(w, h, bits=4, block_size=32, symmetric=False)
    w_gptq = dequantize_blocks(codes, scale, zero).reshape(n, k).T
    w_rtn = dequantized_weight(w, 32, bits=4, symmetric=False)
    out = lambda ww: np.linalg.norm(x @ ww - x @ w)  # noqa: E731
    assert out(w_gptq) < 0.8 * out(w_rtn)


def test_gptq_with_data_runs_in_the_pass(rng):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    text = f"{HEADER} g (float[2, 64] x) => (float[2, 32] y) {{ y = MatMul(x, w) }}"
    data = {"x": (rng.standard_normal((40, 64)) @ rng.standard_normal((64, 64))).astype(np.float32)}
    model = with_weights(text, w=w)
    stats = quantize(model, data=data).report.rows[-1].stats
    assert stats["method"] == "gptq" and stats["matmul"] == 1


# --- embeddings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_embedding_table_as_gather_block_quantized(rng, symmetric):
    table = rng.standard_normal((50, 64)).astype(np.float32)
    text = f"{HEADER} g (int64[2, 3] ids) => (float[2, 3, 64] y) {{ y = Gather(table, ids) }}"
    result = quantize(with_weights(text, table=table), method="rtn", symmetric=symmetric)
    node = next(iter(result.model.graph))
    assert node.op_type == "GatherBlockQuantized" and node.attributes.get_int("bits") == 4
    codes, scale, zero = quantize_blocks(table.reshape(50, 2, 32), bits=4, symmetric=symmetric)
    expected = dequantize_blocks(codes, scale, zero).reshape(50, 64)
    ids = np.array([[0, 49, 7], [7, 1, 2]], np.int64)
    np.testing.assert_allclose(ort_outputs(result.model, {"ids": ids})["y"], expected[ids], rtol=0, atol=1e-6)
    # 4-bit data + a float scale (+ a 4-bit zero point) per 32 values: 7x+ smaller
    assert result.model.analysis("params")["bytes"] < table.nbytes / 6


# --- real model: magika ---------------------------------------------------------------------------
def test_magika_int4_weights_recipe():
    """magika's one-hot Dense has K=257, which no block size divides: the recipe says so,
    naming the layer; excluding it, the rest is 4-bit and top-1 mostly agrees."""
    from slimgraph import zoo
    from slimgraph.backends import ort

    path = zoo.magika_model_path()
    with pytest.raises(slimgraph.PassError, match=r"Dense_0.*K=257"):
        slimgraph.run(path, "int4-weights")
    result = slimgraph.run(path, ["optimize", {"quantize.weight_only": {"exclude": ["*Dense_0*"]}}])
    assert result.report.rows[-1].stats["matmul"] == 1
    feeds = zoo.magika_inputs(48, seed=2)
    ref, out = ort.run(ort.session(path), feeds), ort.run(ort.session(result.model), feeds)
    name = next(iter(ref))
    assert (ref[name].argmax(1) == out[name].argmax(1)).mean() >= 0.9


@pytest.mark.slow
def test_minilm_int4_weights_recipe_cosine_and_size(tmp_path):
    """all-MiniLM-L6-v2, embedding table included, GPTQ on 64 sentences: file >= 5x
    smaller than float, mean cosine >= 0.975 on 64 other sentences."""
    from slimgraph import zoo
    from slimgraph.backends import ort

    path = zoo.minilm()
    calib = zoo.minilm_inputs(zoo.minilm_sentences(64, seed=1))
    feeds = zoo.minilm_inputs(zoo.minilm_sentences(64, seed=0))
    result = slimgraph.run(path, "int4-weights", data=calib)
    stats = result.report.rows[-1].stats
    assert stats["matmul"] == 36 and stats["embedding"] == 1 and stats["method"] == "gptq"
    out_path = slimgraph.save(result.model, tmp_path / "int4.onnx")
    assert path.stat().st_size / out_path.stat().st_size >= 5
    ref = ort.run_batched(ort.session(path), feeds)[zoo.MINILM_OUTPUT]
    out = ort.run_batched(ort.session(out_path), feeds)[zoo.MINILM_OUTPUT]
    assert zoo.minilm_fidelity(ref, out).mean() >= 0.975
