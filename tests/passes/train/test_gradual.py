"""prune.gradual: cubic schedule, fine-tuning between steps, final sparsity reached."""

import numpy as np
import pytest

pytest.importorskip("torch")

import slimgraph  # noqa: E402
from slimgraph import zoo  # noqa: E402
from slimgraph.backends import ort  # noqa: E402
from slimgraph.passes.train.gradual import cubic_schedule  # noqa: E402

pytestmark = pytest.mark.torch


def test_cubic_schedule_front_loads_the_pruning():
    s = cubic_schedule(0.8, 4)
    assert s[-1] == pytest.approx(0.8) and all(a < b for a, b in zip(s, s[1:]))
    assert s[0] > 0.8 / 4  # more than a linear share in the first step
    assert s[1] - s[0] > s[3] - s[2]


def test_gradual_unstructured_on_the_mlp():
    d, test = zoo.digits_data(), zoo.digits_test_data()
    out = slimgraph.run(zoo.digits_mlp(), "optimize, prune.gradual(sparsity=0.8, steps=2, epochs_per_step=1, final_epochs=2, "
                        "keep_first_last=false)", data={"input": d.x_train}, labels=d.y_train)
    weights = [v.const_value.numpy() for v in out.model.graph.initializers.values() if v.const_value.numpy().ndim == 2]
    assert all(abs(float((w == 0).mean()) - 0.8) < 0.01 for w in weights)
    (logits,) = ort.run_batched(out.model, {"input": test["input"]}).values()
    assert float((logits.argmax(1) == test["labels"]).mean()) > 0.93
    assert [row["sparsity"] for row in out.report.rows[-1].stats["table"]] == [round(v, 4) for v in cubic_schedule(0.8, 2)]


def test_gradual_with_a_teacher_distils_every_fine_tune(monkeypatch):
    """teacher=input: each fine-tune is train.distill from the dense input model; sparsity still
    reached; the teacher runs over the data once, not at every step."""
    from slimgraph.passes.train import distill

    runs = []
    real = distill._Teacher.outputs
    monkeypatch.setattr(distill._Teacher, "outputs", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
    d, test = zoo.digits_data(), zoo.digits_test_data()
    out = slimgraph.run(zoo.digits_mlp(), "optimize, prune.gradual(sparsity=0.8, steps=2, epochs_per_step=1, "
                        "final_epochs=2, keep_first_last=false, teacher=input, temperature=4)",
                        data={"input": d.x_train}, labels=d.y_train)
    stats = out.report.rows[-1].stats
    assert stats["distilled"] is True
    assert len(runs) == 1  # 2 steps + the final fine-tune share one teacher run
    weights = [v.const_value.numpy() for v in out.model.graph.initializers.values() if v.const_value.numpy().ndim == 2]
    assert all(abs(float((w == 0).mean()) - 0.8) < 0.01 for w in weights)
    (logits,) = ort.run_batched(out.model, {"input": test["input"]}).values()
    assert float((logits.argmax(1) == test["labels"]).mean()) > 0.93


def test_gradual_teacher_that_cannot_run_on_the_data_is_refused():
    """A teacher whose inputs the data lacks (magika for digits) stops the pass, naming the inputs."""
    d = zoo.digits_data()
    with pytest.raises(slimgraph.errors.SlimgraphError, match=r"teacher needs inputs \['bytes'\]"):
        slimgraph.run(zoo.digits_mlp(), f"prune.gradual(sparsity=0.5, steps=1, epochs_per_step=1, final_epochs=0, "
                      f"teacher='{zoo.magika_model_path()}')", data={"input": d.x_train}, labels=d.y_train)
