"""Latency-aware structured pruning: the one-layer latency table (signatures, measuring,
the JSON cache) and the greedy `choose_keep`, on hand-written graphs, the digits CNN and an
exported ResNet-18. Timing-dependent checks use a deterministic table (latency from a
formula) so that they test the greedy, not the machine; the real table is checked for what
is stable (it measures, caches, and a big layer is slower than a tiny one)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.passes.prune import latency
from slimgraph.passes.prune._sensitivity import floor_count
from slimgraph.passes.prune.channels import analyze, estimate_macs
from slimgraph.passes.prune.latency import LatencyTable, LayerShape, choose_keep, layer_shape
from slimgraph.passes.prune.structured import PruneStructured, _prepare
from tests.passes.prune.conftest import build


def conv(cin, cout, hw, k=3, group=1, stride=1) -> LayerShape:
    attrs = {"group": group, "kernel_shape": (k, k), "pads": (k // 2,) * 4, "strides": (stride, stride)}
    return LayerShape("Conv", (1, cin, hw, hw), (cout, cin // group, k, k), tuple(sorted(attrs.items())), True)


def macs_of(shape: LayerShape) -> float:
    """MACs of a signature (batch 1), for the deterministic table."""
    cin, cout = shape.channels()
    if shape.op == "Conv":
        attrs = dict(shape.attrs)
        stride = attrs.get("strides", (1, 1))[0]
        spatial = int(np.prod(shape.x[2:])) // (stride * stride)
        return spatial * cout * (cin // attrs.get("group", 1)) * int(np.prod(shape.w[2:]))
    return float(np.prod(shape.x[:-1]) * cin * cout) if shape.op == "MatMul" else float(cin * cout)


class FormulaTable(LatencyTable):
    """A table whose 'measurement' is `cost(shape)`: deterministic, instant."""

    def __init__(self, path, cost=None):
        super().__init__(path, progress=False)
        self.cost = cost or (lambda s: 1e-3 + macs_of(s) * 1e-6)

    def _measure(self, shape):
        return float(self.cost(shape))


@dataclasses.dataclass(frozen=True)
class Cfg:
    """The fields of prune.structured's Config that choose_keep reads."""

    ratio: float = 0.5
    target_macs: float | None = None
    multiple: int = 8
    min_keep: float = 0.1
    min_channels: int = 1


# --- signatures ------------------------------------------------------------------------------------
def test_signature_key_names_every_shape_field():
    key = conv(64, 128, 56, stride=2).key()
    assert key.startswith("Conv|x=1x64x56x56|w=128x64x3x3|")
    assert "group=1" in key and "strides=2/2" in key and "pads=1/1/1/1" in key and key.endswith("bias=1")
    assert conv(64, 128, 56).key() != conv(64, 128, 56, stride=2).key()


@pytest.mark.parametrize("shape, cin, cout, expect_w", [
    (conv(64, 128, 14), 40, 96, (96, 40, 3, 3)),
    (conv(64, 64, 14, group=64), 24, 24, (24, 1, 3, 3)),  # depthwise: group follows
    (LayerShape("Gemm", (1, 512), (1000, 512), (("transB", 1),), True), 384, 1000, (1000, 384)),
    (LayerShape("Gemm", (1, 512), (512, 10), (), False), 256, 10, (256, 10)),
    (LayerShape("MatMul", (128, 384), (384, 1536), (), False), 384, 768, (384, 768)),
])
def test_resized_shape_builds_a_layer_ort_runs(shape, cin, cout, expect_w):
    small = shape.resized(cin, cout)
    assert small.w == expect_w and small.channels() == (cin, cout)
    if shape.op == "Conv" and dict(shape.attrs)["group"] > 1:
        assert dict(small.attrs)["group"] == cin
    out = ort.run(ort.session(small.proto()), small.feed())["Y"]
    assert out.shape[-1 if shape.op != "Conv" else 1] == cout


def test_layer_shape_reads_a_real_model():
    model = slimgraph.load(zoo.digits_cnn())
    _prepare(model)
    shapes = {node.op_type: layer_shape(node) for node in model.graph if layer_shape(node) is not None}
    assert shapes["Conv"].x[0] == 1  # the dynamic batch is timed at 1
    assert shapes["Gemm"].channels() == (512, 10)


# --- the table -------------------------------------------------------------------------------------
def test_table_measures_once_and_caches_to_json(tmp_path):
    path = tmp_path / "t.json"
    big, tiny = conv(64, 64, 56), conv(8, 8, 8)
    with LatencyTable(path, runs=10, progress=False) as table:
        t_big, t_tiny = table.latency(big), table.latency(tiny)
        assert table.latency(big) == t_big and table.measured == 2  # memoised
    assert t_big > 5 * t_tiny > 0  # 3136x the MACs: far slower on any CPU
    saved = json.loads(path.read_text())
    assert saved["threads"] == 2 and saved["entries"][big.key()] == t_big
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temp file left behind
    again = LatencyTable(path, progress=False)
    assert again.latency(big) == t_big and again.measured == 0


def test_table_merges_with_entries_written_meanwhile(tmp_path):
    path = tmp_path / "t.json"
    a, b = FormulaTable(path), FormulaTable(path)
    a.latency(conv(8, 8, 8))
    b.latency(conv(16, 16, 8))
    a.save()
    b.save()
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_unreadable_or_other_thread_count_cache_is_measured_again(tmp_path, caplog):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    assert FormulaTable(path).entries == {}
    assert "unreadable" in caplog.text
    path.write_text(json.dumps({"version": latency.TABLE_VERSION, "threads": 4, "entries": {"k": 1.0}}))
    assert FormulaTable(path).entries == {}


def test_default_path_is_per_cpu_ort_version_and_threads(tmp_path):
    import onnxruntime

    path = latency.default_path(threads=2, cache_dir=tmp_path)
    assert path.parent == tmp_path / "latency"
    assert path.name.endswith(f"-{onnxruntime.__version__}-2t.json")


# --- the greedy ------------------------------------------------------------------------------------
CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,8,32,32] x) => (float[1,8,8,8] y) {
    a = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (x, w1)
    ra = Relu (a)
    b = Conv <pads = [1,1,1,1], kernel_shape = [3,3], strides = [4,4]> (ra, w2)
    rb = Relu (b)
    y = Conv <kernel_shape = [1,1]> (rb, w3)
}
"""


@pytest.fixture
def chain(rng):
    model = build(CHAIN, w1=rng.standard_normal((64, 8, 3, 3)).astype(np.float32),
                  w2=rng.standard_normal((64, 64, 3, 3)).astype(np.float32),
                  w3=rng.standard_normal((8, 64, 1, 1)).astype(np.float32))
    _prepare(model)
    return model, analyze(model)


def _groups(analysis, producer):
    return next(g.id for g in analysis.safe_groups() if producer in " ".join(g.producers))


def test_greedy_cuts_where_latency_is_cheapest_to_save(chain, tmp_path):
    """Group A (64 ch at 32x32) feeds the costly layers; group B (64 ch after a stride-4
    conv, 8x8) costs 16x less per channel. With equal importance, A is cut first."""
    model, analysis = chain
    names = [n.name for n in model.graph if n.op_type == "Conv"]
    ga, gb = _groups(analysis, names[0]), _groups(analysis, names[1])
    scores = {ga: np.ones(64), gb: np.ones(64)}
    counts = choose_keep(model, analysis, scores, Cfg(target_macs=0.3), table=FormulaTable(tmp_path / "t.json"))
    assert counts[ga] < 64 and counts[gb] == 64
    assert all(c % 8 == 0 for c in counts.values())


def test_greedy_spares_important_channels(chain, tmp_path):
    """Same layers, but half of B's channels are nearly worthless (scores are compared after
    dividing by each group's mean): those go first, although A saves more time."""
    model, analysis = chain
    names = [n.name for n in model.graph if n.op_type == "Conv"]
    ga, gb = _groups(analysis, names[0]), _groups(analysis, names[1])
    scores = {ga: np.ones(64), gb: np.r_[np.full(32, 1e-3), np.full(32, 2.0)]}
    counts = choose_keep(model, analysis, scores, Cfg(target_macs=0.15), table=FormulaTable(tmp_path / "t.json"))
    assert counts == {ga: 64, gb: 32}


def _goal(model, analysis, table, floors: dict, target: float) -> float:
    dense = latency.predicted_latency(model, analysis, {g: analysis.groups[g].size for g in floors}, table)
    floor = latency.predicted_latency(model, analysis, floors, table)
    return floor + (1 - target) * (dense - floor)


def test_greedy_meets_the_target_and_respects_floors(chain, tmp_path):
    model, analysis = chain
    table = FormulaTable(tmp_path / "t.json")
    scores = {g.id: np.random.default_rng(g.id).random(g.size) for g in analysis.safe_groups() if g.size > 1}
    cfg = Cfg(target_macs=0.5, min_keep=0.25)
    counts = choose_keep(model, analysis, scores, cfg, table=table)
    goal = _goal(model, analysis, table, {g: 16 for g in counts}, 0.5)  # min_keep 0.25 of 64
    assert latency.predicted_latency(model, analysis, counts, table) <= goal
    assert all(c >= 16 and c % 8 == 0 for c in counts.values())
    # one step less on any group would have missed the goal: the greedy stops as soon as it can
    assert any(latency.predicted_latency(model, analysis, {**counts, g: counts[g] + 8}, table) > goal
               for g in counts if counts[g] < 64)


def test_target_applies_to_the_reducible_latency(chain, tmp_path):
    """Fixed per-layer overhead cannot be pruned: a 99% target takes every group nearly to
    its floor, not past it, and the prediction ends between floor and goal."""
    model, analysis = chain
    table = FormulaTable(tmp_path / "t.json", cost=lambda s: 5.0 + macs_of(s) * 1e-6)  # overhead-dominated
    scores = {g.id: np.ones(g.size) for g in analysis.safe_groups() if g.size > 1}
    counts = choose_keep(model, analysis, scores, Cfg(target_macs=0.99, min_keep=0.5), table=table)
    assert all(32 <= c <= 40 for c in counts.values())
    assert latency.predicted_latency(model, analysis, counts, table) <= _goal(model, analysis, table,
                                                                               {g: 32 for g in counts}, 0.99)


def test_target_follows_ratio_unless_target_macs_is_set(chain):
    model, analysis = chain
    ids = [g.id for g in analysis.safe_groups() if g.size > 1]
    macs = dict(model.analysis("macs"))
    uniform = estimate_macs(analysis, macs, {g: 32 for g in ids}) / sum(macs.values())
    assert latency.latency_target(model, analysis, ids, Cfg(ratio=0.5)) == pytest.approx(1 - uniform)
    assert latency.latency_target(model, analysis, ids, Cfg(ratio=0.5, target_macs=0.2)) == 0.2
    # the real Config: target_macs has a default; only an explicit one overrides the ratio
    cfg = PruneStructured.Config(ratio=0.5, mode="latency")
    assert latency.latency_target(model, analysis, ids, cfg) == pytest.approx(1 - uniform)
    cfg = PruneStructured.Config(ratio=0.5, mode="latency", target_macs=0.2)
    assert latency.latency_target(model, analysis, ids, cfg) == 0.2


def test_choose_keep_does_not_modify_the_model(chain, tmp_path):
    model, analysis = chain
    before = [np.array(v.const_value.numpy()) for v in model.graph.initializers.values()]
    scores = {g.id: np.ones(g.size) for g in analysis.safe_groups() if g.size > 1}
    choose_keep(model, analysis, scores, Cfg(target_macs=0.5), table=FormulaTable(tmp_path / "t.json"))
    after = [v.const_value.numpy() for v in model.graph.initializers.values()]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


# --- real models -----------------------------------------------------------------------------------
def test_digits_cnn_latency_mode_measures_caches_and_runs(tmp_path, monkeypatch):
    """The pass end to end on the trained digits CNN, with a real (measured) table in a
    fresh cache: a valid smaller model, channel counts multiples of 8. (Its accuracy is not
    asserted: layers this small take about the same time at any width, so how far the greedy
    cuts depends on timing noise.)"""
    path, test = zoo.digits_cnn(), zoo.digits_test_data()
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))  # the latency table goes here
    model = slimgraph.load(path)
    result = slimgraph.run(model, "cleanup,fuse,prune.structured(mode=latency, target_macs=0.3)")
    stats = result.report.rows[-1].stats
    assert stats["macs_after"] <= stats["macs_before"]  # how far it cuts depends on timing noise here
    tables = list((tmp_path / "latency").glob("*-2t.json"))
    assert len(tables) == 1 and json.loads(tables[0].read_text())["entries"]
    logits = ort.run(ort.session(result.model), {"input": test["input"]})["logits"]
    assert logits.shape == (len(test["labels"]), 10) and np.isfinite(logits).all()
    for row in stats["table"]:
        before, after = (int(c) for c in row["out ch"].split(" -> "))
        assert after == before or after % 8 == 0


@pytest.mark.slow
def test_resnet18_latency_mode_prunes_where_time_is(exported, tmp_path):
    """ResNet-18 (224x224): with a MAC-proportional table the greedy is MAC-driven and
    keeps the predicted time within the target; the pruned model is valid and runs."""
    model = slimgraph.load(exported("resnet18", 224))
    prepared = slimgraph.run(model, "cleanup,fuse").model
    _prepare(prepared)
    analysis = analyze(prepared)
    from slimgraph.passes.prune import _importance

    groups = [g for g in analysis.safe_groups() if g.size > 1]
    scores = _importance.scores(prepared, analysis, groups, "l1", data=None, samples=1, rng=np.random.default_rng(0))
    table = FormulaTable(tmp_path / "t.json")
    counts = choose_keep(prepared, analysis, {g.id: scores[g.id] for g in groups}, Cfg(ratio=0.3), table=table)
    dense = latency.predicted_latency(prepared, analysis, {g.id: g.size for g in groups}, table)
    target = latency.latency_target(prepared, analysis, [g.id for g in groups], Cfg(ratio=0.3))
    floors = {g.id: floor_count(g.size, Cfg(ratio=0.3)) for g in groups}
    goal = _goal(prepared, analysis, table, floors, target)  # the reducible part is cut by the target
    assert goal < dense and latency.predicted_latency(prepared, analysis, counts, table) <= goal
    keep = {g.id: np.argsort(-scores[g.id])[:counts[g.id]] for g in groups if counts[g.id] < g.size}
    analysis.apply(prepared, keep)
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    (logits,) = ort.run(ort.session(prepared), feeds).values()
    assert logits.shape == (1, 1000) and np.isfinite(logits).all()


# --- lookahead, importance, calibration --------------------------------------------------------------
def test_greedy_looks_past_a_slower_count(chain, tmp_path):
    """Measured latency is not monotone in the channels: here group A's layers are slower
    at 56 and 48 channels than at 64. One step at a time the greedy would never cut A (it
    would stop at the bump); with the lookahead it jumps to 40, where time is saved."""
    model, analysis = chain
    names = [n.name for n in model.graph if n.op_type == "Conv"]
    ga, gb = _groups(analysis, names[0]), _groups(analysis, names[1])

    def cost(s):
        base = 1e-3 + macs_of(s) * 1e-6
        return base * 3 if s.x[2] == 32 and any(48 <= c < 64 for c in s.channels()) else base

    counts = choose_keep(model, analysis, {ga: np.ones(64), gb: np.ones(64)}, Cfg(target_macs=0.3),
                         table=FormulaTable(tmp_path / "t.json", cost))
    assert counts[ga] <= 40


def test_importance_kept_is_the_geometric_mean_of_group_shares():
    from slimgraph.passes.prune.channels import Group
    from slimgraph.passes.prune.structured import importance_kept

    groups = [Group(0, 4, True, "", [], []), Group(1, 2, True, "", [], [])]
    scores = {0: np.array([4.0, 3.0, 2.0, 1.0]), 1: np.array([1.0, 1.0])}
    # group 0 keeps its best two (7 of 10), group 1 one of two (1 of 2)
    assert importance_kept(groups, scores, {0: 2, 1: 1}) == pytest.approx(np.sqrt(0.7 * 0.5))
    assert importance_kept(groups, scores, {}) == 1.0
    # a group read by three layers counts three times (a residual stream)
    from slimgraph.passes.prune.channels import Slice

    groups[1].slices = [(Slice(None, 0, name, role), 0) for name, role in
                        (("c1", "producer"), ("c2", "consumer"), ("c3", "consumer"))]
    assert importance_kept(groups, scores, {0: 2, 1: 1}) == pytest.approx(np.exp((np.log(0.7) + 3 * np.log(0.5)) / 4))


def test_calibration_on_the_digits_cnn(tmp_path):
    """The calibration profiles the real model with ORT and gives every weight layer a
    positive in-model / alone factor; the calibrated cost scales with the table time and
    never falls to zero."""
    model = slimgraph.run(slimgraph.load(zoo.digits_cnn()), "cleanup,fuse").model
    _prepare(model)
    analysis = analyze(model)
    ids = [g.id for g in analysis.safe_groups() if g.size > 1]
    table = LatencyTable(tmp_path / "t.json", progress=False)
    cal = latency.calibrate(model, analysis, ids, table, rounds=1, runs=5)
    weight_layers = [n.name for n in model.graph if n.op_type in ("Conv", "Gemm")]
    assert set(cal.factors) == set(weight_layers) and all(f > 0 for f in cal.factors.values())
    assert cal.overhead > 0
    name = weight_layers[1]
    assert cal.cost(name, 2 * cal.overhead + 1.0) > cal.cost(name, cal.overhead + 0.5) > 0
    assert cal.cost(name, cal.overhead / 2) > 0
