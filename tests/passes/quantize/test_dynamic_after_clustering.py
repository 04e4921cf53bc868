"""quantize.dynamic after cluster.kmeans keeps the codebooks: SmoothQuant (which rescales each
input channel, so every codebook value would become another number) is skipped on clustered
weights, and per-channel int8 of K values takes at most K codes. Real model: the digits CNN."""

from __future__ import annotations

import numpy as np
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.errors import PassError
from slimgraph.search.order import legal


@pytest.mark.parametrize("granularity, per_channel", [("tensor", True), ("channel", False)])
def test_dynamic_int8_after_kmeans_keeps_the_clusters_contract(granularity, per_channel):
    d = zoo.digits_data()
    data = {"input": d.x_train[:128]}
    clustered = slimgraph.run(str(zoo.digits_cnn()), ["optimize", {"cluster.kmeans": {"k": 16,
                                                                                      "granularity": granularity}}])
    # the manager checks the clusters contract after quantize.dynamic (it failed before)
    result = slimgraph.run(clustered.model, [{"quantize.dynamic": {"per_channel": per_channel}}], data=data)
    stats = result.report.rows[-1].stats
    assert stats["matmul"] >= 1 and "skipped" in str(stats["smoothquant"])
    x = {"input": d.x_test[:64]}
    a = ort.run(clustered.model, x)["logits"]
    b = ort.run(result.model, x)["logits"]
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.95
    assert legal(("cluster.kmeans", "quantize.dynamic"))


def test_pack_clusters_after_kmeans_and_dynamic_fails_and_is_declared_incompatible():
    d = zoo.digits_data()
    with pytest.raises(PassError, match="clusters contract"):
        slimgraph.run(str(zoo.digits_cnn()), ["optimize", {"cluster.kmeans": {"k": 16}}, "quantize.dynamic",
                                              "pack.clusters"], data={"input": d.x_train[:64]})
    assert not legal(("cluster.kmeans", "quantize.dynamic", "pack.clusters"))


def test_dynamic_int8_still_smooths_unclustered_weights():
    d = zoo.digits_data()
    result = slimgraph.run(str(zoo.digits_cnn()), ["optimize", "quantize.dynamic"], data={"input": d.x_train[:128]})
    assert isinstance(result.report.rows[-1].stats["smoothquant"], dict)
