"""pack.narrow: int32/int64 tensors stored in the narrowest integer type + a Cast ORT folds."""

import numpy as np
import onnx

import slimgraph
from slimgraph.passes.pack.narrow import narrowest
from tests.passes.pack._models import initializer_bytes, logits, quantized_digits
from tests.passes.pack.test_sparse import optimized_ops, pack_nodes


def test_narrowest_type_holds_every_value():
    assert narrowest(np.array([-128, 127], np.int32)) == np.int8
    assert narrowest(np.array([0, 255], np.int32)) == np.uint8
    assert narrowest(np.array([-129, 5], np.int32)) == np.int16
    assert narrowest(np.array([0, 40000], np.int64)) == np.uint16
    assert narrowest(np.array([-1, 1 << 20], np.int64)) == np.int32
    assert narrowest(np.array([-1, 1 << 20], np.int32)) is None  # nothing narrower holds it
    assert narrowest(np.array([], np.int32)) is None


def test_digits_mlp_biases_become_int16_and_run_the_same_graph(tmp_path):
    q = quantized_digits("mlp", sparsity=0.9)
    result = slimgraph.run(q, "pack.narrow")
    table = result.report.rows[-1].stats["table"]
    assert {r["dtype"] for r in table} == {"int32 -> int16"} and len(table) == 2  # the 300 and 100 biases
    narrowed = result.model
    assert len(pack_nodes(narrowed)) == 2
    np.testing.assert_array_equal(logits(q), logits(narrowed))
    assert optimized_ops(narrowed, tmp_path / "n.onnx") == optimized_ops(q, tmp_path / "q.onnx")
    path = slimgraph.save(narrowed, tmp_path / "n.onnx")
    stored = {t.data_type for t in onnx.load(str(path)).graph.initializer if t.dims and t.dims[0] in (100, 300)}
    assert onnx.TensorProto.INT16 in stored and onnx.TensorProto.INT32 not in stored
    back = slimgraph.run(narrowed, "unpack").model
    assert initializer_bytes(back) == initializer_bytes(q)


def test_float_models_and_small_tensors_are_left_alone():
    float_model = slimgraph.load(slimgraph.zoo.digits_mlp())
    assert slimgraph.run(float_model, "pack.narrow").report.rows[-1].modified is False
    q = quantized_digits("mlp", sparsity=0.9)
    assert slimgraph.run(q, "pack.narrow(min_size=1000)").report.rows[-1].modified is False
