"""Round trips on the real models of MODELS.md: load -> cleanup -> save -> ONNX Runtime.

The reference is ORT running the untouched file shipped in the package; the candidate is ORT
running the file slimgraph saved. Both run with ORT's own graph optimizations off, so the
comparison measures slimgraph and not ORT. Inputs are real (zoo): magika sees files of this
machine, silero-vad sees voice-like audio with the recurrent state the model itself reached.
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.errors import ModelLoadError

RTOL = 1e-5
#: A variant with `If` subgraphs (opset 15, three of them); every variant runs in the fast set
#: (each takes 0.5-2.5 s), the 8 kHz runs are marked slow.
IF_VARIANT = "silero_vad_16k_op15.onnx"


def _silero_params():
    try:
        paths = zoo.silero_model_paths()
    except ModelLoadError as e:
        return [pytest.param(None, marks=pytest.mark.skip(reason=str(e)), id="silero-vad missing")]
    return [pytest.param(p, id=p.stem) for p in paths]


def _run_file(path: Path, feeds: dict) -> dict[str, np.ndarray]:
    return ort.run(ort.session(path, optimization="disable"), feeds)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _round_trip(path: Path, feeds: dict, tmp_path: Path) -> tuple[dict, dict, slimgraph.RunResult]:
    """(reference outputs, round-tripped outputs, cleanup result); checks the input file
    is left untouched and outputs match within RTOL relative to each output's scale."""
    before = _sha(path)
    model = slimgraph.load(path)
    result = slimgraph.run(model, "cleanup")
    out = slimgraph.save(result.model, tmp_path / f"{path.stem}.slim.onnx")
    ref, new = _run_file(path, feeds), _run_file(out, feeds)
    assert _sha(path) == before, "the input model file was modified"
    assert sorted(ref) == sorted(new)
    for name in ref:
        assert new[name].shape == ref[name].shape, name
        assert new[name].dtype == ref[name].dtype, name
        scale = max(float(np.abs(ref[name]).max()), 1e-12)
        err = float(np.abs(ref[name].astype(np.float64) - new[name]).max()) / scale
        assert err <= RTOL, f"{path.name} output {name!r}: relative error {err:.2e} > {RTOL:.0e}"
    return ref, new, result


def _nodes(model) -> int:
    return sum(1 for _ in model.nodes(recursive=True))


def test_magika_round_trip(tmp_path):
    path = zoo.magika_model_path()
    feeds = zoo.magika_inputs(32, seed=0)
    ref, new, result = _round_trip(path, feeds, tmp_path)
    name = next(iter(ref))
    assert ref[name].shape == (32, len(zoo.magika_config()["target_labels_space"]))
    np.testing.assert_array_equal(new[name].argmax(1), ref[name].argmax(1))
    assert _nodes(result.model) < _nodes(slimgraph.load(path))


@pytest.mark.parametrize("path", _silero_params())
def test_silero_round_trip(path, tmp_path):
    feeds = zoo.silero_inputs(path, seed=0)
    ref, _, result = _round_trip(path, feeds, tmp_path)
    assert _nodes(result.model) <= _nodes(slimgraph.load(path))
    assert all(np.isfinite(v).all() for v in ref.values())


@pytest.mark.slow
@pytest.mark.parametrize("path", _silero_params())
def test_silero_round_trip_at_8khz(path, tmp_path):
    """Variants with an `sr` input branch on it (`If`): the 8 kHz branch must survive too."""
    if "sr" not in {v.name for v in slimgraph.load(path).graph.inputs}:
        pytest.skip(f"{path.name} runs at 16 kHz only")
    _round_trip(path, zoo.silero_inputs(path, seed=1, sample_rate=8000), tmp_path)


def test_every_silero_variant_is_covered_including_if_subgraphs():
    paths = zoo.silero_model_paths()
    params = [p.values[0] for p in _silero_params()]
    assert params == paths
    with_if = [p.name for p in paths if any(n.op_type == "If" for n in slimgraph.load(p).graph)]
    assert IF_VARIANT in with_if
    assert len(with_if) >= 3, with_if
