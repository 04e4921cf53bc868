"""zoo's all-MiniLM-L6-v2: the export reproduces sentence-transformers, the sentences are
real and deterministic, the tokenizer is the packaged one."""

from __future__ import annotations

import numpy as np
import pytest

from slimgraph import zoo


def test_sentences_are_deterministic_distinct_english_prose():
    a, b = zoo.minilm_sentences(500, seed=0), zoo.minilm_sentences(500, seed=0)
    assert a == b and len(set(a)) == 500
    assert zoo.minilm_sentences(500, seed=1) != a
    for s in a:
        assert s[0].isupper() and s[-1] in ".!?" and len(s.split()) >= 6 and s.isascii()


def test_inputs_are_the_packaged_tokenizer_padded_to_a_fixed_length():
    feeds = zoo.minilm_inputs(["Hello world.", "A slightly longer sentence about quantization."])
    assert set(feeds) == set(zoo.MINILM_INPUTS)
    for array in feeds.values():
        assert array.shape == (2, zoo.MINILM_MAX_LENGTH) and array.dtype == np.int64
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids[0, 0] == 101 and ids[0, mask[0].sum() - 1] == 102  # [CLS] ... [SEP]
    assert (ids[mask == 0] == 0).all() and not feeds["token_type_ids"].any()
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(zoo.minilm_model_dir()), local_files_only=True)
    sentences = zoo.minilm_sentences(20)
    ref = tok(sentences, padding="max_length", max_length=zoo.MINILM_MAX_LENGTH, truncation=True, return_tensors="np")
    ours = zoo.minilm_inputs(sentences)
    for name in zoo.MINILM_INPUTS:
        np.testing.assert_array_equal(ours[name], ref[name])


def test_fidelity_is_the_cosine():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(zoo.minilm_fidelity(a, b), [1.0, -1.0])


@pytest.mark.slow
def test_export_reproduces_sentence_transformers():
    """The cached ONNX export gives SentenceTransformer.encode's embeddings (1e-5)."""
    st = pytest.importorskip("sentence_transformers")
    from slimgraph.backends import ort

    sentences = zoo.minilm_sentences(16, seed=2)
    ref = st.SentenceTransformer(str(zoo.minilm_model_dir()), device="cpu", local_files_only=True).encode(sentences)
    sess = ort.session(zoo.minilm())
    assert [i.name for i in sess.get_inputs()] == list(zoo.MINILM_INPUTS)
    out = ort.run(sess, zoo.minilm_inputs(sentences))[zoo.MINILM_OUTPUT]
    assert out.shape == (16, 384)
    np.testing.assert_allclose(out, ref, atol=1e-5)
