"""quantize.weight_only after pruning keeps the pruned zeros (GPTQ included: a zero is coded
as its block's zero point, so it dequantizes to exactly 0), and after k-means it cannot keep
the codebooks: it declares `incompatible_after` (k-means), so the search never proposes that
pair."""

from __future__ import annotations

import numpy as np
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.errors import PassError
from slimgraph.passes.quantize.weight_only import dequantize_blocks, gptq
from slimgraph.search.order import legal


def _sparse_layer(rng, k=64, n=16, sparsity=0.6):
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.random((k, n)) < sparsity] = 0.0
    # correlated inputs (as real activations are): GPTQ then moves later weights a lot
    x = rng.standard_normal((512, 8)) @ rng.standard_normal((8, k)) + 0.1 * rng.standard_normal((512, k))
    return w, x.T @ x / len(x)


def _dense(codes, scale, zero, k, n):
    return dequantize_blocks(codes, scale, zero).reshape(n, k).T


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_keeps_every_zero_when_asked(rng, symmetric):
    w, h = _sparse_layer(rng)
    kept = _dense(*gptq(w, h, bits=4, block_size=16, symmetric=symmetric, keep_zeros=True), *w.shape)
    assert np.all(kept[w == 0] == 0.0)
    # without the mask GPTQ pushes rounding errors onto the zeros (why the contract broke)
    filled = _dense(*gptq(w, h, bits=4, block_size=16, symmetric=symmetric), *w.shape)
    assert np.count_nonzero(filled[w == 0]) > 0
    # and the kept zeros cost little: the output error stays close to unmasked GPTQ's
    x = (rng.standard_normal((128, 8)) @ rng.standard_normal((8, w.shape[0]))).astype(np.float32)
    err_kept = np.abs(x @ kept - x @ w).mean()
    err_free = np.abs(x @ filled - x @ w).mean()
    assert err_kept < 1.5 * err_free


def _digits():
    d = zoo.digits_data()
    return str(zoo.digits_cnn()), {"input": d.x_train[:64]}


def test_pruned_digits_cnn_then_gptq_int4_keeps_the_sparsity_contract():
    model, data = _digits()
    pipeline = ["optimize", {"prune.magnitude": {"sparsity": 0.5, "keep_first_last": False}},
                {"quantize.weight_only": {"method": "gptq"}}]
    result = slimgraph.run(model, pipeline, data=data)  # the manager checks the contract after each pass
    assert result.report.rows[-1].stats["matmul"] >= 1
    assert legal(("prune.magnitude", "quantize.weight_only"))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_8_bit_after_pruning_keeps_the_sparsity_contract(method):
    # the contract check reads 8-bit MatMulNBits codes back too (a code at its zero point is a zero)
    model, data = _digits()
    result = slimgraph.run(model, ["optimize", {"prune.magnitude": {"sparsity": 0.5, "keep_first_last": False}},
                                   {"quantize.weight_only": {"bits": 8, "method": method}}], data=data)
    assert result.report.rows[-1].stats["matmul"] >= 1
    assert legal(("prune.magnitude", "quantize.weight_only"))


def test_clustered_digits_cnn_then_weight_only_fails_and_the_search_never_proposes_it():
    model, data = _digits()
    with pytest.raises(PassError, match="clusters contract"):
        slimgraph.run(model, ["optimize", {"cluster.kmeans": {"k": 16}}, "quantize.weight_only"], data=data)
    assert not legal(("cluster.kmeans", "quantize.weight_only"))
    assert not legal(("optimize", "cluster.kmeans", "quantize.static", "quantize.weight_only"))
