"""pack.sparse and unpack: bit-exact bitmask + values storage, decoded by a constant
subgraph that ORT folds at session creation (same optimized graph as the dense model),
smaller files; on small graphs, the digits CNN and MiniLM."""

import collections
import os

import numpy as np
import onnx
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.errors import PassError, PipelineError
from slimgraph.passes import contracts
from slimgraph.passes.pack.sparse import PackSparse, packed_nbytes, rebuild, split
from tests.helpers import ort_outputs
from tests.passes.prune._graphs import mlp, weight


def optimized_ops(model, path) -> collections.Counter:
    """Op counts of the graph ORT executes (after its constant folding)."""
    ort.session(model, optimized_model_path=path)
    graph = onnx.load(str(path)).graph
    return collections.Counter(n.op_type for n in graph.node)


def pack_nodes(model):
    return [n for n in model.graph if "slimgraph.pack" in n.metadata_props]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint8])
def test_split_and_rebuild_are_bit_exact(dtype):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        a = rng.standard_normal((7, 13)).astype(dtype)
        a[rng.random(a.shape) < 0.7] = 0
        a[0, 0], a[0, 1], a[0, 2] = -0.0, np.nan, np.inf  # -0.0 is a value, not a zero
    else:
        a = rng.integers(0, 256, (7, 13)).astype(np.uint8).view(dtype)
        a[rng.random(a.shape) < 0.7] = np.array(128, np.uint8).view(dtype)  # the zero point
    mask, values, keep = split(a)
    assert mask.dtype == np.uint8 and mask.size == -(-a.size // 8)
    assert rebuild(mask, values, a.shape).tobytes() == a.tobytes()
    assert len(values) == keep.sum() + 1


def test_packed_mlp_runs_identically_and_ort_folds_the_decoder(tmp_path):
    pruned = slimgraph.run(mlp(), "prune.magnitude(sparsity=0.8, keep_first_last=false)").model
    result = slimgraph.run(pruned, "pack.sparse")
    packed = result.model
    assert result.report.rows[-1].stats["packed"] == 4
    assert {n.metadata_props["slimgraph.pack"] for n in pack_nodes(packed)} == {"sparse:w1", "sparse:w2", "sparse:w3", "sparse:w4"}
    assert not {"w1", "w2", "w3", "w4"} & set(packed.graph.initializers)
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)}
    a, b = ort_outputs(pruned, feeds), ort_outputs(packed, feeds)
    np.testing.assert_array_equal(a["y"], b["y"])  # ORT without its optimizations: decode run as ops
    a = ort.run(ort.session(pruned), feeds)["y"]
    b = ort.run(ort.session(packed), feeds)["y"]
    np.testing.assert_array_equal(a, b)
    assert optimized_ops(packed, tmp_path / "p.onnx") == optimized_ops(pruned, tmp_path / "d.onnx")
    dense_file = slimgraph.save(pruned, tmp_path / "dense.onnx")
    packed_file = slimgraph.save(packed, tmp_path / "packed.onnx")
    assert os.path.getsize(packed_file) < 0.35 * os.path.getsize(dense_file)


def test_unpack_restores_plain_identical_weights():
    pruned = slimgraph.run(mlp(), "prune.magnitude(sparsity=0.8)").model
    packed = slimgraph.run(pruned, "pack.sparse").model
    result = slimgraph.run(packed, "unpack")
    back = result.model
    assert pack_nodes(back) == [] and result.report.rows[-1].stats["unpacked"] == 2
    for name in ("w1", "w2", "w3", "w4"):
        assert weight(back, name).tobytes() == weight(pruned, name).tobytes()
    assert [n.op_type for n in back.graph] == [n.op_type for n in pruned.graph]
    assert set(back.graph.initializers) == set(pruned.graph.initializers)
    assert slimgraph.run(pruned, "unpack").report.rows[-1].modified is False


def test_cleanup_unpacks_first():
    packed = slimgraph.run(mlp(), "prune.magnitude(sparsity=0.8),pack.sparse").model
    cleaned = slimgraph.run(packed, "cleanup").model
    assert pack_nodes(cleaned) == [] and "w2" in cleaned.graph.initializers


def test_dense_and_small_tensors_stay_as_they_are():
    model = mlp()  # no zeros: packing would not pay
    assert slimgraph.run(model, "pack.sparse").report.rows[-1].modified is False
    pruned = slimgraph.run(model, "prune.magnitude(sparsity=0.8, keep_first_last=false)").model
    out = slimgraph.run(pruned, "pack.sparse(min_size=2000)").model  # w4 is 64x16 = 1024
    assert {n.metadata_props["slimgraph.pack"] for n in pack_nodes(out)} == {"sparse:w1", "sparse:w2", "sparse:w3"}
    out = slimgraph.run(pruned, "pack.sparse(min_sparsity=0.9)").model
    assert pack_nodes(out) == []


def test_break_even_is_where_packing_gets_smaller():
    n = 4096  # float32: n/8 + 4 (k + 1) + overhead < 4 n  <=>  about 3.2% zeros
    assert packed_nbytes(n, int(n * 0.95), 4, 2) < 4 * n
    assert packed_nbytes(n, int(n * 0.975), 4, 2) > 4 * n


def test_order_and_opset_errors():
    with pytest.raises(PipelineError, match=r"'pack.sparse' must run after 'prune.magnitude'"):
        slimgraph.run(mlp(), "pack.sparse,prune.magnitude")
    old = mlp()
    old.ir.opset_imports[""] = 10  # (Gemm would need its C at opset 10: call the pass directly)
    with pytest.raises(PassError, match=r"pack.sparse.*opset >= 11 .*run upgrade_opset first"):
        PackSparse()(old)


def test_int8_weights_after_quantization_are_packed_at_their_zero_point(tmp_path):
    model = slimgraph.load(zoo.digits_cnn())
    data = {"input": zoo.digits_data().x_train[:128]}
    q = slimgraph.run(model, "cleanup,prune.magnitude(sparsity=0.8),int8", data=data).model
    packed = slimgraph.run(q, "pack.sparse(min_size=1024)").model
    marks = {n.metadata_props["slimgraph.pack"] for n in pack_nodes(packed)}
    assert len(marks) == 2  # the two pruned int8 conv weights
    feeds = {"input": zoo.digits_test_data()["input"]}
    np.testing.assert_array_equal(ort.run(ort.session(q), feeds)["logits"], ort.run(ort.session(packed), feeds)["logits"])
    assert optimized_ops(packed, tmp_path / "p.onnx") == optimized_ops(q, tmp_path / "q.onnx")


def test_digits_cnn_sparse_80(tmp_path):
    """The sparse-80 pipeline on the digits CNN: identical outputs to the masked dense model,
    the same optimized ORT graph, a smaller file."""
    model = slimgraph.load(zoo.digits_cnn())
    masked = slimgraph.run(model, "cleanup,prune.magnitude(sparsity=0.8)").model
    packed = slimgraph.run(masked, "pack.sparse").model
    feeds = {"input": zoo.digits_test_data()["input"]}
    np.testing.assert_array_equal(ort.run(ort.session(masked), feeds)["logits"],
                                  ort.run(ort.session(packed), feeds)["logits"])
    assert optimized_ops(packed, tmp_path / "p.onnx") == optimized_ops(masked, tmp_path / "d.onnx")
    dense = os.path.getsize(slimgraph.save(masked, tmp_path / "dense.onnx"))
    small = os.path.getsize(slimgraph.save(packed, tmp_path / "packed.onnx"))
    assert small < 0.7 * dense  # stem conv and classifier are kept dense by default


@pytest.mark.slow
def test_minilm_sparse_80_with_embeddings(tmp_path):
    model = slimgraph.load(zoo.minilm())
    masked = slimgraph.run(model, "cleanup,prune.magnitude(sparsity=0.8, embeddings=true)").model
    packed = slimgraph.run(masked, "pack.sparse").model
    dense = os.path.getsize(zoo.minilm())
    small = os.path.getsize(slimgraph.save(packed, tmp_path / "packed.onnx"))
    assert dense / small >= 3.0
    feeds = zoo.minilm_inputs(zoo.minilm_sentences(16))
    a = ort.run(ort.session(masked), feeds)[zoo.MINILM_OUTPUT]
    b = ort.run(ort.session(tmp_path / "packed.onnx"), feeds)[zoo.MINILM_OUTPUT]
    np.testing.assert_array_equal(a, b)
    assert optimized_ops(packed, tmp_path / "p.onnx") == optimized_ops(masked, tmp_path / "d.onnx")


def test_sparse_80_recipe_on_digits(tmp_path):
    model = slimgraph.load(zoo.digits_cnn())
    result = slimgraph.run(model, "sparse-80")
    names = [r.name for r in result.report.rows]
    assert names[0] == "unpack" and names[-2:] == ["prune.magnitude", "pack.sparse"]
    assert len(pack_nodes(result.model)) == 3  # the two inner convs and the classifier; the stem is under min_size
    again = slimgraph.load(slimgraph.save(result.model, tmp_path / "s.onnx"))
    assert contracts.check(again) == []
