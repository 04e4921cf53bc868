"""pack.clusters: packed indices + codebook, decoded by ORT at load into the same dense graph."""

import importlib

import numpy as np
import onnx
import pytest

import slimgraph
import slimgraph.passes.cluster  # noqa: F401  (registration)
from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.passes.pack._decode import unpack_codes
from slimgraph.passes.pack.clusters import bits_for, codebook, pack_indices

importlib.import_module("slimgraph.passes.pack.clusters")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_and_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    idx = rng.integers(0, 1 << bits, size=1001)
    packed = pack_indices(idx, bits)
    assert packed.nbytes == -(-1001 * bits // 8)
    assert np.array_equal(unpack_codes(packed, 1001, bits), idx)
    if bits in (1, 2, 4, 8):  # fields within bytes, lowest bits first
        per = 8 // bits
        assert np.array_equal((packed[:, None] >> (np.arange(per) * bits)) & ((1 << bits) - 1),
                              np.concatenate([idx, np.zeros((-1001) % per, int)]).reshape(-1, per))


def test_bits_and_codebook():
    assert [bits_for(k) for k in (2, 3, 4, 5, 8, 9, 16, 17, 256)] == [1, 2, 2, 3, 3, 4, 4, 5, 8]
    w = np.repeat(np.arange(6, dtype=np.float32)[:, None], 4, axis=1)  # 6 rows, one value each
    books, idx = codebook(w, 0)
    assert books.shape == (6, 1) and np.array_equal(np.take_along_axis(books, idx, 1), w)
    assert codebook(np.arange(300, dtype=np.float32), None) is None  # 300 values: not a codebook


def _optimized_ops(path, tmp_path):
    out = tmp_path / (path.name + ".opt.onnx")
    ort.session(path, optimized_model_path=out)
    return [n.op_type for n in onnx.load(out).graph.node]


def test_digits_cnn_packed_file_is_smaller_and_runs_the_same_dense_graph(tmp_path):
    test = zoo.digits_test_data()
    clustered = slimgraph.run(zoo.digits_cnn(), "cleanup, fuse, strip_metadata, cluster.kmeans(k=16, min_size=64)").model
    packed = slimgraph.run(clustered, "pack.clusters(min_size=64)").model
    dense_path, packed_path = tmp_path / "dense.onnx", tmp_path / "packed.onnx"
    slimgraph.save(clustered, dense_path)
    slimgraph.save(packed, packed_path)
    assert packed_path.stat().st_size < 0.4 * dense_path.stat().st_size
    a = ort.run_batched(dense_path, {"input": test["input"]})
    b = ort.run_batched(packed_path, {"input": test["input"]})
    assert all(np.array_equal(a[k], b[k]) for k in a)  # exact: the decode rebuilds the same bits
    assert _optimized_ops(dense_path, tmp_path) == _optimized_ops(packed_path, tmp_path)


def test_int8_clustered_weights_pack_with_int8_codebooks(tmp_path):
    test = zoo.digits_test_data()
    q = slimgraph.run(zoo.digits_cnn(), "cleanup, fuse, cluster.kmeans(k=16, min_size=64), int8",
                      data={"input": test["input"][:64]}).model
    packed = slimgraph.run(q, "pack.clusters(min_size=64)")
    table = packed.report.rows[-1].stats["table"]
    assert {row["dtype"] for row in table} >= {"int8"}
    slimgraph.save(q, tmp_path / "q.onnx")
    slimgraph.save(packed.model, tmp_path / "qp.onnx")
    a = ort.run_batched(tmp_path / "q.onnx", {"input": test["input"]})
    b = ort.run_batched(tmp_path / "qp.onnx", {"input": test["input"]})
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert _optimized_ops(tmp_path / "q.onnx", tmp_path) == _optimized_ops(tmp_path / "qp.onnx", tmp_path)


def test_strip_metadata_is_exact_and_keeps_slimgraph_keys():
    m = slimgraph.run(zoo.digits_cnn(), "cleanup, strip_metadata", verify=True).model
    keys = {k for n in m.graph for k in n.metadata_props}
    assert keys and all(k.startswith("slimgraph.") for k in keys)
