"""short_names: short tensor names, no node names / doc strings / intermediate value_info,
schema-default and implied attributes dropped; the interface and the outputs unchanged."""

import os

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph.errors import PipelineError
from slimgraph.passes import contracts
from slimgraph.passes.pipeline import order_graph
from tests.helpers import assert_same_outputs, parse
from tests.passes.pack._models import initializer_bytes, logits, quantized_digits
from tests.passes.pack.test_sparse import optimized_ops

POOL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 8, 8] x) => (float[1, 3, 4, 4] y) {
  c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [1, 1], dilations = [1, 1], group = 1> (x, w)
  y = MaxPool <kernel_shape = [2, 2], strides = [2, 2], pads = [0, 0, 0, 0], ceil_mode = 0, storage_order = 0,
               auto_pad = "NOTSET"> (c)
}
"""


def _with_weight(text):
    """The model with its Conv weight `w` as an initializer."""
    model = parse(text.replace("(float[1, 2, 8, 8] x)", "(float[1, 2, 8, 8] x, float[3, 2, 3, 3] w)"))
    w = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    value = next(v for v in model.graph.inputs if v.name == "w")
    model.graph.inputs.remove(value)
    value.const_value = ir.tensor(w, name="w")
    model.graph.register_initializer(value)
    return model


def test_default_and_implied_attributes_are_dropped_and_outputs_unchanged():
    model = _with_weight(POOL)
    out = slimgraph.run(model, "short_names").model
    conv, pool = list(out.graph)
    assert set(conv.attributes) == {"pads"}  # kernel_shape = w's, strides/dilations 1, group 1
    assert set(pool.attributes) == {"kernel_shape", "strides"}
    x = np.random.default_rng(1).standard_normal((1, 2, 8, 8)).astype(np.float32)
    assert_same_outputs(model, out, {"x": x}, rtol=0)


def test_quantized_digits_cnn_gets_short_names_and_the_same_outputs(tmp_path):
    q = slimgraph.run(quantized_digits("cnn"), "pack.sparse(min_size=64), pack.clusters(min_size=16)").model
    result = slimgraph.run(q, "short_names")
    short = result.model
    assert [v.name for v in short.graph.inputs] == ["input"] and [v.name for v in short.graph.outputs] == ["logits"]
    assert all(len(name) <= 2 for name in short.graph.initializers)
    assert all(not n.name for n in short.graph)
    np.testing.assert_array_equal(logits(q), logits(short))
    assert optimized_ops(short, tmp_path / "s.onnx") == optimized_ops(q, tmp_path / "q.onnx")
    saved = slimgraph.save(short, tmp_path / "s.onnx")
    proto = onnx.load(str(saved))
    kept = {n.output[0] for n in proto.graph.node if any(p.key == "slimgraph.pack" for p in n.metadata_props)}
    assert {v.name for v in proto.graph.value_info} <= kept  # only the decoded weights, for the contracts
    for node in proto.graph.node:  # pack marks follow the renaming
        for p in node.metadata_props:
            assert p.key == "slimgraph.pack" and p.value.split(":")[1] == node.output[0]
    assert os.path.getsize(saved) < 0.6 * os.path.getsize(slimgraph.save(q, tmp_path / "q.onnx"))
    assert contracts.check(slimgraph.load(saved)) == []
    back = slimgraph.run(slimgraph.load(saved), "unpack").model
    assert initializer_bytes(back) == initializer_bytes(slimgraph.run(q, "unpack").model)
    bare = slimgraph.run(q, "short_names(contracts=false)").model
    assert contracts.records(bare) == [] and contracts.records(short) != []


def test_short_names_runs_last():
    with pytest.raises(PipelineError, match="'short_names' must run after 'cse'"):
        slimgraph.run(quantized_digits("mlp", sparsity=0.9), "short_names, cse")
    graph = order_graph()
    assert nx.is_directed_acyclic_graph(graph)
    assert graph.has_edge("pack.sparse", "short_names") and not graph.has_edge("short_names", "pack.sparse")
