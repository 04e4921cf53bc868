"""Layer dropping: a 3-layer MiniLM student initialised from the 6-layer teacher."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402

from slimgraph import zoo  # noqa: E402
from slimgraph.backends import ort  # noqa: E402
from slimgraph.errors import SlimgraphError  # noqa: E402
from slimgraph.passes.train.layers import copy_weights, drop_layers, export_student, kept_layers  # noqa: E402

pytestmark = pytest.mark.torch


def test_kept_layers_indices_and_bad_input():
    assert kept_layers(6, keep_every=2) == [0, 2, 4]
    assert kept_layers(6, keep_every=3) == [0, 3]
    assert kept_layers(6, keep=[1, 5]) == [1, 5]
    bad = ({}, {"keep_every": 2, "keep": [0]}, {"keep_every": 0}, {"keep": [0, 6]}, {"keep": [2, 1]}, {"keep": []})
    for kwargs in bad:
        with pytest.raises(SlimgraphError):
            kept_layers(6, **kwargs)


def test_drop_layers_copies_teacher_layers_and_leaves_teacher_intact():
    teacher = zoo.minilm_torch()
    layers = teacher.encoder.encoder.layer
    before = [p.detach().clone() for p in teacher.parameters()]
    student = drop_layers(teacher, keep=[0, 2, 4])
    kept = student.encoder.encoder.layer
    assert len(kept) == 3 and student.encoder.config.num_hidden_layers == 3
    assert len(layers) == 6 and teacher.encoder.config.num_hidden_layers == 6  # argument untouched
    for s_layer, t_index in zip(kept, [0, 2, 4]):
        for (name, p), q in zip(s_layer.named_parameters(), layers[t_index].parameters()):
            assert torch.equal(p, q), name
            assert p.data_ptr() != q.data_ptr()  # a copy, not shared storage
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    # keeping every layer reproduces the teacher exactly (the wiring is untouched)
    feeds = zoo.minilm_inputs(zoo.minilm_sentences(16, seed=3))
    args = [torch.from_numpy(feeds[k]) for k in zoo.MINILM_INPUTS]
    with torch.no_grad():
        np.testing.assert_allclose(drop_layers(teacher, keep_every=1)(*args).numpy(), teacher(*args).numpy(), atol=1e-6)
        emb = student(*args).numpy()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_no_bert_encoder_is_a_clear_error():
    with pytest.raises(SlimgraphError, match="no BERT-style encoder"):
        drop_layers(torch.nn.Linear(3, 3), keep_every=2)


@pytest.mark.slow
def test_exported_student_matches_torch_and_has_minilm_io():
    teacher = zoo.minilm_torch()
    student = drop_layers(teacher, keep_every=2)
    model = export_student(student)
    reference = __import__("slimgraph").load(zoo.minilm())
    assert [v.name for v in model.graph.inputs] == [v.name for v in reference.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in reference.graph.outputs]
    feeds = zoo.minilm_inputs(zoo.minilm_sentences(8, seed=5))
    (got,) = ort.run(model, feeds).values()
    with torch.no_grad():
        want = student(*[torch.from_numpy(feeds[k]) for k in zoo.MINILM_INPUTS]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    macs, full = sum(model.analysis("macs").values()), sum(reference.analysis("macs").values())
    assert 0.4 * full < macs < 0.6 * full  # half the encoder layers


def test_copy_weights_moves_trained_values_by_name_and_checks_shapes():
    import slimgraph

    cnn = slimgraph.load(zoo.digits_cnn())
    trained = cnn.clone()
    name = next(k for k, v in trained.graph.initializers.items() if v.const_value.numpy().ndim == 4)
    changed = trained.graph.initializers[name].const_value.numpy() + 1.0
    import onnx_ir as ir

    trained.graph.initializers[name].const_value = ir.tensor(changed, name=name)
    out = copy_weights(trained, cnn)
    np.testing.assert_array_equal(out.graph.initializers[name].const_value.numpy(), changed)
    assert not np.array_equal(cnn.graph.initializers[name].const_value.numpy(), changed)  # target untouched
    with pytest.raises(SlimgraphError, match="no same-shaped match"):
        copy_weights(slimgraph.load(zoo.digits_mlp()), cnn)


@pytest.mark.slow
def test_short_export_computes_the_same_embeddings_for_sentences_that_fit():
    student = drop_layers(zoo.minilm_torch(), keep=[0, 2, 5])
    full, short = export_student(student), export_student(student, length=48)
    assert short.graph.inputs[0].shape[1] == 48
    feeds = zoo.minilm_inputs(["A short sentence.", "Another sentence that is not long either."])
    (want,) = ort.run(full, feeds).values()
    (got,) = ort.run(copy_weights(short, full), feeds).values()
    np.testing.assert_allclose(got, want, atol=1e-5)
    (got_short,) = ort.run(short, {k: v[:, :48] for k, v in feeds.items()}).values()
    np.testing.assert_allclose(got_short, want, atol=1e-5)
