"""The latency mode's accuracy side and its speed-up target: data-driven sensitivity of
channel groups (`_sensitivity`), `target_speedup` honoured by the predictor, extra MAC /
parameter budgets, and bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.errors import PassError
from slimgraph.passes.prune import _importance, _sensitivity, latency
from slimgraph.passes.prune.channels import analyze
from slimgraph.passes.prune.latency import choose_keep
from slimgraph.passes.prune.structured import PruneStructured, _layer_params, _prepare
from tests.passes.prune.test_latency import Cfg, FormulaTable, chain, macs_of  # noqa: F401 - fixture


def _prepared(model: slimgraph.Model):
    model = slimgraph.run(model, "cleanup,fuse").model
    _prepare(model)
    analysis = analyze(model)
    groups = PruneStructured()._selected(model, analysis)
    return model, analysis, groups, _importance.scores(model, analysis, groups, "l1")


@pytest.fixture(scope="module")
def digits():
    return _prepared(slimgraph.load(str(zoo.digits_cnn())))


def test_masking_equals_pruning_on_the_digits_cnn(digits):
    """Zeroing the weights that read a group's channels gives the outputs of the model
    with those channels physically removed (so a trial needs no new session)."""
    model, analysis, groups, scores = digits
    test = zoo.digits_test_data()
    feeds = [{"input": test["input"][i:i + 1]} for i in range(4)]
    runner = _sensitivity.MaskedRunner(model, groups, feeds)
    keep = {g.id: np.sort(np.argsort(-scores[g.id])[:g.size // 2]) for g in groups}
    removed = {g.id: np.setdiff1d(np.arange(g.size), keep[g.id]) for g in groups}
    masked = runner.outputs(removed)
    pruned = model.clone()
    analyze(pruned).apply(pruned, keep)  # the same analysis of the copy: same group ids
    sess = ort.session(pruned)
    for feed, got in zip(feeds, masked):
        want = ort.run(sess, feed)["logits"]
        np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert runner.error({}) == 0.0 and runner.cosine({}) == pytest.approx(1.0)


def test_sensitivity_curves_on_the_digits_cnn(digits):
    """Real trained weights and real digits: each group's output error is 0 when whole,
    never falls as more channels go, and is positive at its floor; it agrees with the
    error of the model pruned to a measured count."""
    model, analysis, groups, scores = digits
    test = zoo.digits_test_data()
    feeds = [{"input": test["input"][i:i + 1]} for i in range(8)]
    floors = {g.id: _sensitivity.floor_count(g.size, Cfg()) for g in groups}
    curves = _sensitivity.sensitivity(model, groups, scores, floors, 8, feeds)
    assert sorted(curves) == sorted(g.id for g in groups)
    for g in groups:
        c = curves[g.id]
        assert len(c) == g.size + 1 and c[g.size] == 0
        assert np.all(np.diff(c) <= 1e-12) and c[floors[g.id]] > 0
    # a measured point is the relative squared error of that cut, recomputed here by hand
    g = max(groups, key=lambda g: g.size)
    k = _sensitivity.measured_counts(g.size, floors[g.id], 8)[0]
    runner = _sensitivity.MaskedRunner(model, groups, feeds)
    drop = np.argsort(scores[g.id], kind="stable")[:g.size - k]
    got, want = runner.outputs({g.id: drop}), runner.reference
    err = np.mean([np.sum((a[0] - b[0]) ** 2) / np.sum(b[0] ** 2) for a, b in zip(got, want)])
    assert curves[g.id][k] == pytest.approx(err, rel=1e-6)
    # cached: the same inputs give the same object without running the model again
    assert _sensitivity.sensitivity(model, groups, scores, floors, 8, feeds) is curves


def test_curve_interpolates_and_never_rises_with_kept_channels():
    c = _sensitivity.curve(8, {6: 0.2, 4: 0.1, 2: 0.5})  # a noisy dip at 4 is lifted to 0.2
    assert c[8] == 0 and c[7] == pytest.approx(0.1) and c[6] == pytest.approx(0.2)
    assert c[4] == pytest.approx(0.2) and c[2] == pytest.approx(0.5) and c[0] == pytest.approx(0.5)
    assert _sensitivity.measured_counts(64, 8, 8) == [48, 32, 16, 8]
    assert _sensitivity.measured_counts(16, 8, 8) == [8]


def test_greedy_spends_the_loss_where_the_output_does_not_care(chain, tmp_path):  # noqa: F811
    """Same layers and scores; the measured losses say group A's cuts hurt the output and
    group B's do not: with `losses`, B is cut although A saves more time per channel."""
    model, analysis = chain
    ids = [g.id for g in analysis.safe_groups() if g.size > 1]
    ga, gb = ids
    scores = {ga: np.ones(64), gb: np.ones(64)}
    losses = {ga: np.linspace(1.0, 0.0, 65), gb: np.linspace(1e-3, 0.0, 65)}
    table = FormulaTable(tmp_path / "t.json")
    plain = choose_keep(model, analysis, scores, Cfg(target_macs=0.2), table=table)
    informed = choose_keep(model, analysis, scores, Cfg(target_macs=0.2), table=table, losses=losses)
    assert plain[ga] < 64 and informed[gb] < 64 and informed[ga] > plain[ga]


@dataclasses.dataclass(frozen=True)
class SpeedCfg(Cfg):
    target_speedup: float | None = None
    target_params: float | None = None


def test_target_speedup_is_honoured_by_the_predictor(chain, tmp_path):  # noqa: F811
    """Predicted time <= dense / target_speedup, and the greedy stops soon after (one step
    back on any cut group misses it); info reports the predicted speed-up."""
    model, analysis = chain
    table = FormulaTable(tmp_path / "t.json")
    scores = {g.id: np.random.default_rng(g.id).random(g.size) for g in analysis.safe_groups() if g.size > 1}
    whole = {g: analysis.groups[g].size for g in scores}
    dense = latency.predicted_latency(model, analysis, whole, table)
    for speedup in (1.5, 2.5):
        info: dict = {}
        counts = choose_keep(model, analysis, scores, SpeedCfg(target_speedup=speedup), table=table, info=info)
        predicted = latency.predicted_latency(model, analysis, counts, table)
        assert predicted <= dense / speedup
        assert info["predicted_speedup"] == pytest.approx(dense / predicted) and info["goal_ms"] == pytest.approx(
            dense / speedup)
        assert any(latency.predicted_latency(model, analysis, {**counts, g: counts[g] + 8}, table) > dense / speedup
                   for g in counts if counts[g] < whole[g])


def test_target_speedup_counts_the_time_outside_the_weight_layers(chain, tmp_path, monkeypatch):  # noqa: F811
    """With a calibration measuring the whole model at `other` ms more than its weight
    layers, the goal is for the whole model: (predicted + other) <= (dense + other) / s."""
    model, analysis = chain
    table = FormulaTable(tmp_path / "t.json")
    scores = {g.id: np.ones(g.size) for g in analysis.safe_groups() if g.size > 1}
    dense = latency.predicted_latency(model, analysis, {g: analysis.groups[g].size for g in scores}, table)
    other = 0.2 * dense
    monkeypatch.setattr(latency, "calibrate", lambda *a, **k: latency.Calibration(other_ms=other))

    @dataclasses.dataclass(frozen=True)
    class Calibrated(SpeedCfg):
        calibrate: bool = True

    info: dict = {}
    counts = choose_keep(model, analysis, scores, Calibrated(target_speedup=1.5, min_keep=0.0), table=table,
                         info=info)
    predicted = latency.predicted_latency(model, analysis, counts, table)
    assert info["other_ms"] == pytest.approx(other)
    assert predicted + other <= (dense + other) / 1.5 and predicted < dense / 1.5  # deeper than the layers alone
    assert info["predicted_speedup"] == pytest.approx((dense + other) / (predicted + other))


def test_target_params_is_a_budget_of_the_latency_mode(chain, tmp_path):  # noqa: F811
    """With target_params the greedy goes on past the time goal until the weight layers'
    parameters are down by it too."""
    model, analysis = chain
    table = FormulaTable(tmp_path / "t.json")
    scores = {g.id: np.ones(g.size) for g in analysis.safe_groups() if g.size > 1}
    params = _layer_params(model)
    from slimgraph.passes.prune.channels import estimate_macs

    counts = choose_keep(model, analysis, scores, SpeedCfg(target_speedup=1.2, target_params=0.7), table=table)
    assert estimate_macs(analysis, params, counts) <= 0.3 * sum(params.values())


def test_target_speedup_on_the_digits_cnn_pass(tmp_path, monkeypatch):
    """The pass end to end on the trained digits CNN (its table from a MAC formula, so the
    test is fast and deterministic; test_latency measures a real one): the latency stats
    carry the predicted speed-up, which meets the target; the model is valid and smaller."""
    model = slimgraph.load(str(zoo.digits_cnn()))  # from the usual cache, before it moves
    test = zoo.digits_test_data()
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))  # the table goes here
    monkeypatch.setattr(latency.LatencyTable, "_measure", lambda self, shape: 1e-3 + macs_of(shape) * 1e-6)
    result = slimgraph.run(model,
                           "cleanup,fuse,prune.structured(mode=latency, target_speedup=1.5, calibrate=false)")
    stats = result.report.rows[-1].stats
    info = stats["latency"]
    assert info["objective"] == "sensitivity" and info["predicted_error"] is not None
    assert info["predicted_speedup"] >= 1.5
    assert stats["macs_after"] < stats["macs_before"]
    logits = ort.run(ort.session(result.model), {"input": test["input"][:16]})["logits"]
    assert logits.shape == (16, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("config, message", [
    ({"mode": "latency", "target_speedup": 1.0}, "must be > 1"),
    ({"mode": "latency", "target_speedup": 0.5}, "must be > 1"),
    ({"mode": "macs", "target_speedup": 2.0}, "needs mode=latency"),
    ({"mode": "uniform", "target_speedup": 2.0}, "needs mode=latency"),
])
def test_bad_target_speedup_is_a_pass_error(config, message):
    model = slimgraph.load(str(zoo.digits_cnn()))
    before = model.to_bytes()
    with pytest.raises(PassError, match=message):
        slimgraph.run(model, [{"prune.structured": config}])
    assert model.to_bytes() == before
