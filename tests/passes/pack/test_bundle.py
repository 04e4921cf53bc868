"""pack.sparse(bundle=true): every sparse few-valued weight of a model in one decode of
(gap, codebook index) codes; bit-exact, folded by ORT into the dense graph, undone by unpack."""

import os

import numpy as np
import pytest

import slimgraph
from slimgraph.passes import contracts
from slimgraph.passes.pack import _bundle
from slimgraph.passes.pack.sparse import background, split
from tests.passes.pack._models import initializer_bytes, logits, optimized_graph, quantized_digits
from tests.passes.pack.test_sparse import optimized_ops, pack_nodes


def _member(name, a):
    _, _, keep = split(a)
    return _bundle.member(name, a, keep, background(a))


def test_bundle_codes_rebuild_mixed_dtypes_and_a_dense_member_bit_exactly():
    rng = np.random.default_rng(0)
    sparse = rng.choice(np.array([-3, 5, 7, 11], np.int8), (40, 30))
    sparse[rng.random(sparse.shape) < 0.9] = 0
    dense = rng.choice(np.array([0.5, -0.25, 2.0], np.float32), (7, 9))  # no zeros at all
    wide = rng.choice(np.arange(1, 7, dtype=np.float32), 500)
    wide[::3] = 0
    members = [_member("a", sparse), _member("b", dense), _member("c", wide)]
    gap_bits, v, _ = _bundle.plan(members)
    assert v == 3  # the member with the most values (6) sets the index width
    packed, count = _bundle.encode(members, gap_bits, v)
    for m, rebuilt in zip(members, _bundle.rebuild(members, packed, count, gap_bits, v)):
        assert rebuilt.dtype == m.array.dtype and rebuilt.tobytes() == m.array.tobytes()


def test_more_than_256_values_is_not_a_bundle_member():
    assert _member("x", np.arange(300, dtype=np.float32)) is None


def test_digits_cnn_bundle_runs_the_dense_graph_and_unpacks_exactly(tmp_path):
    q = quantized_digits("cnn")
    result = slimgraph.run(q, "pack.sparse(bundle=true, min_size=64)")
    table = result.report.rows[-1].stats["table"]
    assert len(table) == 4 and all(r["encoding"].startswith("bundle") and r["encoding"].endswith("+3-bit")
                                   for r in table)  # K=8: 3-bit indices
    packed = result.model
    assert len(pack_nodes(packed)) == 4  # one marked Reshape per weight, one shared decode
    np.testing.assert_array_equal(logits(q), logits(packed))
    assert optimized_graph(packed, tmp_path / "p.onnx") == optimized_graph(q, tmp_path / "q.onnx")
    assert contracts.check(packed) == []
    back = slimgraph.run(packed, "unpack").model
    assert pack_nodes(back) == [] and initializer_bytes(back) == initializer_bytes(q)
    per_tensor = slimgraph.run(q, "pack.sparse(min_size=64), pack.clusters(min_size=16)").model
    assert (os.path.getsize(slimgraph.save(packed, tmp_path / "b.onnx"))
            < 0.8 * os.path.getsize(slimgraph.save(per_tensor, tmp_path / "t.onnx")))


def test_bundle_respects_min_sparsity_and_min_size():
    q = quantized_digits("cnn")
    table = slimgraph.run(q, "pack.sparse(bundle=true, min_size=1024)").report.rows[-1].stats["table"]
    assert len(table) == 3  # the 576-weight stem stays out
    out = slimgraph.run(q, "pack.sparse(bundle=true, min_size=64, min_sparsity=0.8)")
    # the stem was not pruned (min_size=200 when pruning); its zeros (75%) are the input
    # channels int8 lowering pads from 1 to 4
    assert len(out.report.rows[-1].stats["table"]) == 3


@pytest.mark.parametrize("which", ["mlp"])
def test_digits_mlp_bundle(which, tmp_path):
    q = quantized_digits(which, sparsity=0.9)
    packed = slimgraph.run(q, "pack.sparse(bundle=true, min_size=64)").model
    np.testing.assert_array_equal(logits(q), logits(packed))
    assert optimized_ops(packed, tmp_path / "p.onnx") == optimized_ops(q, tmp_path / "q.onnx")
