"""The `distill` recipe: structured pruning, then train.distill(teacher: input), on unlabeled data."""

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

import slimgraph  # noqa: E402
from slimgraph import zoo  # noqa: E402
from slimgraph.backends import ort  # noqa: E402
from slimgraph.cli import main  # noqa: E402
from slimgraph.errors import PassError  # noqa: E402
from slimgraph.passes.base import PassContext, get_pass  # noqa: E402

pytestmark = pytest.mark.torch


def _top1(model, test):
    (logits,) = ort.run_batched(model, {"input": test["input"]}).values()
    return float((logits.argmax(1) == test["labels"]).mean())


def test_teacher_input_is_the_pipelines_own_input_model():
    d, test = zoo.digits_data(), zoo.digits_test_data()
    cnn = slimgraph.load(zoo.digits_cnn())
    before = {k: v.const_value.numpy().copy() for k, v in cnn.graph.initializers.items()}
    data = {"input": d.x_train[:256]}  # unlabeled
    pruned = slimgraph.run(cnn, "optimize, prune.structured(ratio=0.5)").model
    result = slimgraph.run(cnn, "optimize, prune.structured(ratio=0.5), train.distill(teacher=input, epochs=10, lr=0.005)",
                           data=data)
    assert _top1(result.model, test) > _top1(pruned, test) + 0.3  # 50% channels cut: ~0.34 without recovery
    assert sum(result.model.analysis("macs").values()) < 0.5 * sum(cnn.analysis("macs").values())
    for k, v in cnn.graph.initializers.items():  # the teacher (the input) is untouched
        np.testing.assert_array_equal(v.const_value.numpy(), before[k])


def test_teacher_input_outside_a_pipeline_is_a_clear_error():
    distill = get_pass("train.distill")(teacher="input")
    with pytest.raises(PassError, match="outside a pipeline"):
        distill(slimgraph.load(zoo.digits_mlp()), PassContext(data={"input": zoo.digits_data().x_train[:64]}))


def test_cli_runs_the_distill_recipe_on_unlabeled_data(tmp_path):
    d, test = zoo.digits_data(), zoo.digits_test_data()
    src = tmp_path / "cnn.onnx"
    src.write_bytes(zoo.digits_cnn().read_bytes())
    digest = src.read_bytes()
    np.savez(tmp_path / "train.npz", input=d.x_train[:192])  # no labels; few, to keep the recipe's 40 epochs short
    out = tmp_path / "cnn.distilled.onnx"
    assert main(["run", str(src), "-p", "distill", "--data", str(tmp_path / "train.npz"), "-o", str(out)]) == 0
    onnx.checker.check_model(str(out))
    assert src.read_bytes() == digest
    assert _top1(str(out), test) >= 0.8  # from ~0.34 with the channels cut and no recovery
