"""The zoo: packaged models are found, inputs are the ones the packages themselves build."""

import importlib.util
import json

import numpy as np
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.errors import DataError, ModelLoadError


# --- magika -------------------------------------------------------------------------------------
def test_magika_features_reproduce_the_package():
    """Our features give the model the labels magika's own pipeline gives the same files."""
    magika = pytest.importorskip("magika")
    files = zoo.magika_files(24, seed=3)
    feeds = zoo.magika_inputs(24, seed=3)
    assert feeds[zoo.MAGIKA_INPUT].shape == (24, 2048) and feeds[zoo.MAGIKA_INPUT].dtype == np.int32
    scores = ort.run(ort.session(zoo.magika_model_path()), feeds)
    labels = zoo.magika_config()["target_labels_space"]
    ours = [labels[i] for i in next(iter(scores.values())).argmax(1)]
    theirs = [str(r.dl.label) for r in magika.Magika().identify_paths(files)]
    assert ours == theirs
    assert len(set(ours)) >= 3  # several kinds of files: libraries, Python, docs


def test_magika_skips_files_the_package_answers_without_the_model(tmp_path):
    magika = pytest.importorskip("magika")
    short = tmp_path / "short.txt"
    short.write_bytes(b"\n\n\t\t    abc")  # 11 bytes, 3 left after stripping the start
    assert zoo.magika_features(short) is None
    assert str(magika.Magika().identify_path(short).dl.label) == "undefined"  # no model run
    padded = tmp_path / "padded.txt"
    padded.write_bytes(b"\n\n  hello, world\n\n")
    features = zoo.magika_features(padded)
    pad = zoo.magika_config()["padding_token"]
    # as magika does: the beginning is only left-stripped, the end only right-stripped
    assert list(features[:14]) == list(b"hello, world\n\n")
    assert (features[14:1024] == pad).all() and (features[1024:-16] == pad).all()
    assert list(features[-16:]) == list(b"\n\n  hello, world")


def test_magika_inputs_are_deterministic():
    a, b = zoo.magika_inputs(6, seed=0), zoo.magika_inputs(6, seed=0)
    np.testing.assert_array_equal(a[zoo.MAGIKA_INPUT], b[zoo.MAGIKA_INPUT])
    assert zoo.magika_files(6, seed=0) != zoo.magika_files(6, seed=1)


def test_wide_file_pool_draws_from_every_kind_in_turn():
    """wide=True adds kinds (headers, /usr/share, packages, ...) for larger training sets; the
    round robin takes one file per kind in turn, and the default draw keeps its three kinds."""
    narrow, wide = zoo.machine_files(), zoo.machine_files(wide=True)
    assert set(narrow) < set(wide)
    kind_of = {p: kind for kind, paths in wide.items() for p in paths}
    present = [k for k, paths in wide.items() if paths]
    files = zoo.magika_files(3 * len(present), seed=0, wide=True)
    assert len(set(files)) == len(files)
    assert len({kind_of[p] for p in files}) >= len(present) - 1  # a kind may hold no modelable file
    assert {kind_of[p] for p in zoo.magika_files(12, seed=0)} <= set(narrow)


def test_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "magika" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install magika==1\.0\.3"):
        zoo.magika_model_path()


# --- silero-vad ---------------------------------------------------------------------------------
def test_silero_inputs_fit_every_variant():
    for path in zoo.silero_model_paths():
        model = slimgraph.load(path)
        feeds = zoo.silero_inputs(path, seed=0)
        assert list(feeds) == [v.name for v in model.graph.inputs], path.name
        window = feeds["input"].shape[-1]
        assert window == 512 + 64, path.name
        if "sr" in feeds:
            assert feeds["sr"].shape == () and feeds["sr"].dtype == np.int64 and feeds["sr"] == 16000
        outputs = ort.run(ort.session(path), feeds)  # ORT accepts them as they are
        probs = next(iter(outputs.values()))
        assert ((probs >= 0) & (probs <= 1)).all(), path.name


def test_silero_state_comes_from_the_model_itself():
    path = next(p for p in zoo.silero_model_paths() if p.name == "silero_vad_16k_op15.onnx")
    feeds = zoo.silero_inputs(path, seed=0)
    assert feeds["state"].shape == (2, 1, 128) and np.abs(feeds["state"]).max() > 0
    assert not np.array_equal(feeds["state"], zoo.silero_inputs(path, seed=0, warmup=1)["state"])


def test_silero_8khz_needs_an_sr_input():
    path = next(p for p in zoo.silero_model_paths() if p.name == "silero_vad_half.onnx")
    with pytest.raises(DataError, match="16000 Hz only"):
        zoo.silero_inputs(path, sample_rate=8000)
    op15 = next(p for p in zoo.silero_model_paths() if p.name == "silero_vad_16k_op15.onnx")
    feeds = zoo.silero_inputs(op15, sample_rate=8000)
    assert feeds["input"].shape == (1, 256 + 32) and feeds["sr"] == 8000


# --- digits -------------------------------------------------------------------------------------
def test_digits_split_is_stratified_and_fixed():
    d = zoo.digits_data()
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == np.float32 and 0 <= d.x_train.min() and d.x_train.max() <= 1
    assert sorted(np.bincount(d.y_test))[0] >= 35  # every class present in the test split
    np.testing.assert_array_equal(zoo.digits_data().y_test, d.y_test)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    assert zoo.cache_root() == tmp_path
    assert zoo.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(zoo.CACHE_ENV)
    assert zoo.cache_root().parts[-2:] == (".cache", "slimgraph")


@pytest.mark.slow  # trains for ~3 s and exports with torch (~15 s with the first torch import)
@pytest.mark.torch
def test_digits_cnn_trains_exports_and_caches(tmp_path):
    pytest.importorskip("torch")
    path = zoo.digits_cnn(tmp_path)
    assert path.parent == tmp_path
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["test_top1"] >= 0.95 and info["test_top1_onnxruntime"] == info["test_top1"]
    model = slimgraph.load(path)
    ops = [n.op_type for n in model.graph]
    assert ops.count("BatchNormalization") == 3 and ops.count("Conv") == 3  # kept for fusion
    assert [v.name for v in model.graph.inputs] == [zoo.DIGITS_INPUT]
    test = zoo.digits_test_data(tmp_path)
    assert sorted(test) == [zoo.DIGITS_INPUT, "labels"]
    logits = ort.run(ort.session(model), {zoo.DIGITS_INPUT: test[zoo.DIGITS_INPUT]})
    top1 = float((next(iter(logits.values())).argmax(1) == test["labels"]).mean())
    assert top1 == info["test_top1_onnxruntime"]
    mtime = path.stat().st_mtime_ns
    assert zoo.digits_cnn(tmp_path) == path and path.stat().st_mtime_ns == mtime  # cached
