"""pack.outline: repeated decode subgraphs written once as a model-local function; ORT
inlines and folds it, unpack evaluates it."""

import os

import numpy as np
import onnx

import slimgraph
from slimgraph.passes.pack.outline import DOMAIN
from tests.passes.pack._models import initializer_bytes, logits, optimized_graph, quantized_digits
from tests.passes.pack.test_sparse import pack_nodes
from tests.passes.prune._graphs import mlp, weight
from tests.passes.prune.conftest import build

ONE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, 64] x, float[64, 64] w) => (float[B, 64] y) {
  y = MatMul(x, w)
}
"""

PACK = "pack.sparse(min_size=64), pack.clusters(min_size=16)"


def test_digits_cnn_decoders_become_calls_of_one_function(tmp_path):
    q = quantized_digits("cnn")
    packed = slimgraph.run(q, PACK).model
    result = slimgraph.run(packed, "pack.outline")
    table = result.report.rows[-1].stats["table"]
    assert all(row["calls"] >= 2 and row["nodes_per_call"] >= 4 for row in table)
    outlined = result.model
    calls = [n for n in outlined.graph if n.domain == DOMAIN]
    assert len(calls) == sum(row["calls"] for row in table) >= 2
    assert all("slimgraph.pack" in n.metadata_props for n in calls)
    assert len(outlined.ir.functions) == len(table)
    np.testing.assert_array_equal(logits(q), logits(outlined))
    assert optimized_graph(outlined, tmp_path / "o.onnx") == optimized_graph(q, tmp_path / "q.onnx")
    saved = slimgraph.save(outlined, tmp_path / "o.onnx")
    assert len(onnx.load(str(saved)).functions) == len(table)
    a = os.path.getsize(slimgraph.save(slimgraph.run(packed, "short_names").model, tmp_path / "a.onnx"))
    b = os.path.getsize(slimgraph.save(slimgraph.run(outlined, "short_names").model, tmp_path / "b.onnx"))
    assert b < a - 200
    back = slimgraph.run(slimgraph.load(saved), "unpack").model
    assert pack_nodes(back) == [] and not back.ir.functions
    assert initializer_bytes(back) == initializer_bytes(q)


def test_a_decode_shape_that_occurs_once_stays_inline():
    pruned = slimgraph.run(mlp(), "prune.magnitude(sparsity=0.9, keep_first_last=false)").model
    one = slimgraph.run(pruned, "pack.sparse(encoding=gaps, min_size=4096)").model
    shapes = slimgraph.run(one, "pack.outline").report.rows[-1].stats
    assert shapes.get("outlined", 0) >= 2  # w1, w2, w3: the same gap decode
    w1 = weight(pruned, "w1")
    single = build(ONE, w=w1)
    packed = slimgraph.run(single, "pack.sparse(encoding=gaps)").model
    assert len(pack_nodes(packed)) == 1 and len(list(packed.graph)) > 10  # one decode of ~16 nodes
    assert slimgraph.run(packed, "pack.outline").report.rows[-1].modified is False
