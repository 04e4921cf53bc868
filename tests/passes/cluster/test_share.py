"""cluster.share: identical and near-identical tensors become one; hashed sharing decodes in ORT."""

import numpy as np
import onnx
import onnx.helper as oh

import slimgraph
import slimgraph.passes.cluster  # noqa: F401  (registration)
from slimgraph.backends import ort
from slimgraph.passes.cluster.share import bucket_index


def _chain(weights):
    nodes, prev = [], "x"
    for i in range(len(weights)):
        nodes.append(oh.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = oh.make_graph(nodes, "chain", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 32])],
                          [oh.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, [2, 32])],
                          [onnx.numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    return slimgraph.load(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))


def test_identical_tensors_share_exactly():
    w = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32) / 6
    m = _chain([w, w.copy(), w * 2])
    out = slimgraph.run(m, "cluster.share", verify=True)
    assert len(out.model.graph.initializers) == 2
    assert out.report.rows[-1].stats["shared"] == 1


def test_near_identical_within_tolerance_only():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 32)).astype(np.float32) / 6
    close = w + 0.005 * rng.standard_normal(w.shape).astype(np.float32) / 6  # ~0.5% away
    far = w + 0.2 * rng.standard_normal(w.shape).astype(np.float32) / 6
    m = _chain([w, close, far])
    assert len(slimgraph.run(m, "cluster.share(tolerance=0.01)").model.graph.initializers) == 2
    assert len(slimgraph.run(m, "cluster.share(tolerance=0.001)").model.graph.initializers) == 3


def test_hashed_sharing_stores_buckets_and_ort_rebuilds_the_weights(tmp_path):
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((32, 32)).astype(np.float32) / 6 for _ in range(2)]
    m = _chain(ws)
    out = slimgraph.run(m, "cluster.share(hashed=true, bucket_ratio=0.25)").model
    path = tmp_path / "hashed.onnx"
    slimgraph.save(out, path)
    stored = sum(v.const_value.nbytes for v in out.graph.initializers.values())
    assert stored < 0.3 * sum(w.nbytes for w in ws)
    # ORT's result equals numpy with the weights rebuilt from the buckets
    x = rng.standard_normal((2, 32)).astype(np.float32)
    (y,) = ort.run(path, {"x": x}).values()
    expected = x
    for i, w in enumerate(ws):
        name = f"w{i}"
        node = next(n for n in out.graph if n.outputs[0].name == f"{name}_hash_flat")
        buckets = node.inputs[0].const_value.numpy()
        a = int(out.graph.initializers[f"{name}_ha"].const_value.numpy())
        c = int(out.graph.initializers[f"{name}_hc"].const_value.numpy())
        rebuilt = buckets[bucket_index(w.size, a, c, buckets.size)].reshape(w.shape)
        expected = expected @ rebuilt
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    opt = tmp_path / "opt.onnx"
    ort.session(path, optimized_model_path=opt)
    assert [n.op_type for n in onnx.load(opt).graph.node] == ["MatMul", "MatMul"]  # folded at load


def test_hashed_weights_unpack_to_the_same_dense_values():
    rng = np.random.default_rng(1)
    m = _chain([rng.standard_normal((32, 32)).astype(np.float32) for _ in range(2)])
    hashed = slimgraph.run(m, "cluster.share(hashed=true)").model
    dense = slimgraph.run(hashed, "unpack").model
    assert {n.op_type for n in dense.graph} == {"MatMul"}
    x = {"x": rng.standard_normal((2, 32)).astype(np.float32)}
    np.testing.assert_allclose(ort.run(ort.session(dense), x)["h1"], ort.run(ort.session(hashed), x)["h1"], rtol=1e-6)
