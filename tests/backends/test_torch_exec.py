"""The torch executor: parity with ONNX Runtime on real models, gradients, write-back."""

import numpy as np
import onnx
import onnx.helper as oh
import pytest

torch = pytest.importorskip("torch")

import slimgraph  # noqa: E402
from slimgraph import zoo  # noqa: E402
from slimgraph.backends import ort, torch_exec  # noqa: E402
from slimgraph.errors import UnsupportedOpError  # noqa: E402

pytestmark = pytest.mark.torch


def _parity(path, feeds, tol=1e-5):
    module = slimgraph.to_torch(path)
    out = torch_exec.run(module, feeds)
    ref = ort.run(ort.session(path), feeds)
    for name in ref:
        scale = np.abs(ref[name]).max() + 1e-12
        assert np.abs(out[name] - ref[name]).max() / scale < tol, name
    return module


def test_digits_cnn_and_mlp_match_ort():
    feeds = {"input": zoo.digits_test_data()["input"][:16]}
    _parity(zoo.digits_cnn(), feeds)
    _parity(zoo.digits_mlp(), feeds)


def test_magika_matches_ort():
    _parity(zoo.magika_model_path(), zoo.magika_inputs(8))


@pytest.mark.slow
def test_minilm_matches_ort():
    _parity(zoo.minilm(), zoo.minilm_inputs(zoo.minilm_sentences(4)))


def test_gradients_reach_every_weight_and_write_back(tmp_path):
    test = zoo.digits_test_data()
    module = slimgraph.to_torch(zoo.digits_cnn())
    x, y = torch.from_numpy(test["input"][:32]), torch.from_numpy(test["labels"][:32])
    (logits,) = module(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    weights = {k: p for k, p in module.params.items() if p.dim() > 1}
    assert weights and all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights.values())
    with torch.no_grad():  # a visible change, then back to the IR and through ORT
        for p in weights.values():
            p.mul_(0.5)
    changed = module.to_model()
    slimgraph.save(changed, tmp_path / "changed.onnx")
    expected = torch_exec.run(module, {"input": test["input"][:4]})["logits"]
    got = ort.run(ort.session(tmp_path / "changed.onnx"), {"input": test["input"][:4]})["logits"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_unsupported_ops_are_listed_by_node():
    graph = oh.make_graph([oh.make_node("Hardmax", ["x"], ["y"], name="hm"),
                           oh.make_node("MyOp", ["y"], ["z"], name="custom", domain="my.domain")], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                          [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 3])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("my.domain", 1)])
    with pytest.raises(UnsupportedOpError, match=r"Hardmax \(node 'hm'\), MyOp \(node 'custom'\)"):
        slimgraph.to_torch(slimgraph.load(model))


@pytest.mark.parametrize("text, feeds", [
    # asymmetric pads, auto_pad, avg pool excluding pads, opset-11 Softmax, negative-step Slice
    ("""<ir_version: 8, opset_import: ["" : 11]>
    g (float[1, 2, 5, 5] x) => (float[1, 2, 3, 3] y) {
      a = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 0, 0], strides = [2, 2]> (x)
      y = Softmax <axis = 1> (a)
    }""", {"x": np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)}),
    ("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 2, 6, 6] x) => (float[1, 2, 6, 3] y) {
      m = MaxPool <kernel_shape = [2, 2], auto_pad = "SAME_UPPER"> (x)
      y = Slice (m, starts, ends, axes, steps)
    }""", {"x": np.random.default_rng(1).standard_normal((1, 2, 6, 6)).astype(np.float32)}),
])
def test_op_semantics_match_ort(text, feeds):
    import onnx.parser

    model = onnx.parser.parse_model(text)
    if "Slice" in text:
        for name, v in (("starts", [5]), ("ends", [-100]), ("axes", [3]), ("steps", [-2])):
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(v, np.int64), name))
    m = slimgraph.load(model)
    out = torch_exec.run(slimgraph.to_torch(m), feeds)
    ref = ort.run(ort.session(m), feeds)
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6)
