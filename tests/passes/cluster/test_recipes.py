"""The cluster-16 and deep-compression recipes on the trained digits models (real top-1)."""

import zipfile

import onnx
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.passes import contracts


def _top1(path):
    test = zoo.digits_test_data()
    (logits,) = ort.run_batched(path, {"input": test["input"]}).values()
    return float((logits.argmax(1) == test["labels"]).mean())


def test_cluster16_on_the_digits_cnn(tmp_path):
    src = zoo.digits_cnn()
    calib = {"input": zoo.digits_data().x_train[:128]}
    out = tmp_path / "c16.onnx"
    result = slimgraph.run(src, "cluster-16", data=calib)
    slimgraph.save(result.model, out)
    assert _top1(out) >= _top1(src) - 0.01
    assert {k for k, _ in contracts.records(result.model)} == {"clusters"}
    packed = {n.op_type for n in onnx.load(out).graph.node}
    assert "Gather" in packed  # weights are decoded at load, not stored dense
    assert out.stat().st_size < 0.45 * src.stat().st_size


def test_deep_compression_on_the_lenet_mlp(tmp_path):
    src = zoo.digits_mlp()
    calib = {"input": zoo.digits_data().x_train[:128]}
    out = tmp_path / "dc.onnx"
    slimgraph.save(slimgraph.run(src, "deep-compression", data=calib).model, out)
    ratio = src.stat().st_size / out.stat().st_size
    assert ratio > 12  # 80% zeros, one bundle of gap + 4-bit index codes, short names (measured 15.4x)
    zipped = tmp_path / "dc.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(out, out.name)
    assert zipped.stat().st_size < out.stat().st_size
    # no fine-tuning: 80% magnitude pruning of a 50k-parameter MLP costs accuracy (measured
    # 97.8% -> 85.3%); the model must still run and classify far above chance
    assert _top1(out) > 0.6


@pytest.mark.slow
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_deep_compression_finetune_meets_the_issue_targets(which, tmp_path):
    """>= 20x smaller raw file with <= 1 point top-1 drop (measured: MLP 25.5x +0.00 pt,
    CNN 22.3x -0.56 pt; seeded training, ~15-30 s each)."""
    import torch

    torch.set_num_threads(1)
    src = zoo.digits_mlp() if which == "mlp" else zoo.digits_cnn()
    data = zoo.digits_data()
    out = tmp_path / "dcf.onnx"
    result = slimgraph.run(src, "deep-compression-finetune", data={"input": data.x_train}, labels=data.y_train)
    slimgraph.save(result.model, out)
    assert src.stat().st_size / out.stat().st_size >= 20
    assert _top1(out) >= _top1(src) - 0.01
    assert [n for n in onnx.load(out).graph.node if n.op_type == "ScatterElements"]  # the bundle's decode
