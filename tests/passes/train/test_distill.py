"""train.distill: soft targets from a teacher recover a compressed student without labels."""

import numpy as np
import pytest

pytest.importorskip("torch")

import slimgraph  # noqa: E402
from slimgraph import zoo  # noqa: E402
from slimgraph.backends import ort  # noqa: E402
from slimgraph.errors import PassError  # noqa: E402

pytestmark = pytest.mark.torch


def _top1(model, test):
    (logits,) = ort.run_batched(model, {"input": test["input"]}).values()
    return float((logits.argmax(1) == test["labels"]).mean())


def test_unlabeled_distillation_recovers_a_pruned_mlp():
    d, test = zoo.digits_data(), zoo.digits_test_data()
    teacher = str(zoo.digits_mlp())
    pruned = slimgraph.run(teacher, "optimize, prune.magnitude(sparsity=0.85, keep_first_last=false, min_size=64)").model
    student = slimgraph.run(pruned, f"train.distill(teacher='{teacher}', epochs=3, lr=0.002)",
                            data={"input": d.x_train}).model  # no labels: soft targets only
    assert _top1(student, test) > _top1(pruned, test) + 0.03
    w = {n: v.const_value.numpy() for n, v in pruned.graph.initializers.items() if v.const_value.numpy().ndim == 2}
    for name, before in w.items():
        assert np.all(student.graph.initializers[name].const_value.numpy()[before == 0] == 0)


def test_feature_matching_and_bad_input():
    d = zoo.digits_data()
    teacher = str(zoo.digits_mlp())
    model = slimgraph.load(teacher)
    hidden = next(n.outputs[0].name for n in model.graph if n.op_type == "Relu")
    out = slimgraph.run(model, f"train.distill(teacher='{teacher}', epochs=1, features=['{hidden}={hidden}'])",
                        data={"input": d.x_train[:128]})
    assert [v.name for v in out.model.graph.outputs] == [v.name for v in model.graph.outputs]
    with pytest.raises(PassError, match="no tensor"):
        slimgraph.run(model, f"train.distill(teacher='{teacher}', features=['nope=nope'])", data={"input": d.x_train[:64]})
    with pytest.raises(PassError, match="labels"):
        slimgraph.run(model, f"train.distill(teacher='{teacher}', hard_weight=0.5)", data={"input": d.x_train[:64]})
    with pytest.raises(PassError, match=r"teacher needs inputs \['bytes'\]"):
        slimgraph.run(zoo.digits_cnn(), f"train.distill(teacher='{zoo.magika_model_path()}')", data={"input": d.x_train[:64]})


def test_teacher_and_student_outputs_must_match(tmp_path):
    import onnx
    import onnx.helper as oh

    graph = oh.make_graph([oh.make_node("Flatten", ["input"], ["f"]), oh.make_node("MatMul", ["f", "w"], ["y"])], "t",
                          [oh.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])],
                          [onnx.numpy_helper.from_array(np.ones((64, 5), np.float32), "w")])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), tmp_path / "t.onnx")
    with pytest.raises(PassError, match=r"shape \(N, 10\), the teacher's \(N, 5\)"):
        slimgraph.run(zoo.digits_mlp(), f"train.distill(teacher='{tmp_path / 't.onnx'}')",
                      data={"input": zoo.digits_data().x_train[:64]})


def test_teacher_runs_once_over_the_data_not_every_epoch(monkeypatch):
    calls = []
    real = ort.run_batched

    def counting(model, data, **kw):
        calls.append(len(next(iter(data.values()))))
        return real(model, data, **kw)

    monkeypatch.setattr(ort, "run_batched", counting)
    d = zoo.digits_data()
    teacher = str(zoo.digits_mlp())
    result = slimgraph.run(teacher, f"train.distill(teacher='{teacher}', epochs=3, batch_size=32)",
                           data={"input": d.x_train[:256]})
    assert calls == [256]  # one batched pass over all 256 samples for 3 epochs x 8 steps
    assert result.report.rows[-1].stats["steps"] == 24


def test_a_reused_instance_runs_the_teacher_on_its_new_data(monkeypatch):
    """Outputs kept for prune.gradual's next step are used by one run only: the same
    instance run again on other data must not train on the first data's targets."""
    from slimgraph.passes.base import get_pass

    calls = []
    real = ort.run_batched
    monkeypatch.setattr(ort, "run_batched", lambda model, data, **kw: calls.append(len(next(iter(data.values()))))
                        or real(model, data, **kw))
    d = zoo.digits_data()
    teacher = str(zoo.digits_mlp())
    distill = get_pass("train.distill")(teacher=teacher, epochs=1, batch_size=32)
    slimgraph.run(teacher, [distill], data={"input": d.x_train[:64]})
    slimgraph.run(teacher, [distill], data={"input": d.x_train[64:160]})
    assert calls == [64, 96]


def test_divergence_stops_with_a_message_and_leaves_the_input_untouched():
    d = zoo.digits_data()
    teacher = str(zoo.digits_mlp())
    model = slimgraph.load(teacher)
    before = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    with pytest.raises(PassError, match="diverged"):
        slimgraph.run(model, f"train.distill(teacher='{teacher}', epochs=2, optimizer=sgd, lr=1.0, loss=mse)",
                      data={"input": d.x_train[:256] * 1e6})
    for k, v in model.graph.initializers.items():
        np.testing.assert_array_equal(v.const_value.numpy(), before[k])
