"""Strategies without running models: greedy keeps the pass that improved the score most and
builds on it; random never repeats a pipeline; optuna choosers record their decisions."""

from __future__ import annotations

from slimgraph.search.space import parse_space
from slimgraph.search.strategies import GreedyStrategy, RandomStrategy

SPACE = parse_space({"stages": [
    {"name": "cleanup", "pick": "all", "passes": {"optimize": {}}},
    {"name": "structure", "pick": "one", "passes": {"prune.magnitude": {"sparsity": [0.5]}, "lowrank.svd": {}}},
    {"name": "quantization", "pick": "one", "passes": {"quantize.static": {}, "quantize.dynamic": {}}},
]})


def test_greedy_adds_the_best_pass_then_builds_on_it():
    gains = {"prune.magnitude": 0.1, "lowrank.svd": 0.3, "quantize.static": 0.5, "quantize.dynamic": 0.2}

    def score(rec):  # synthetic: the sum of the gains of the passes in the pipeline
        return sum(gains.get(name, 0.0) for name in rec["names"])

    g = GreedyStrategy(SPACE, score)
    (start, _), = g.propose(4)
    assert str(start) == "optimize"
    g.observe(start, {"names": ["optimize"]})
    round1 = [c for c, _ in g.propose(10)]
    assert sorted(c.steps[-1][0] for c in round1) == sorted(gains)
    for c in round1:
        g.observe(c, {"names": [n for n, _ in c.steps]})
    round2 = [str(c) for c, _ in g.propose(10)]
    # quantize.static helped most: every new candidate keeps it, adding a structural pass before it
    assert round2 and all(s.endswith("quantize.static") for s in round2)
    assert "optimize,lowrank.svd,quantize.static" in round2


def test_random_never_repeats_and_stops_when_the_space_is_used_up():
    r = RandomStrategy(SPACE, seed=1, attempts=40)
    seen = [str(c) for c, _ in r.propose(50)]
    # structure: none/prune/lowrank x quantization: none/static/dynamic = 9 pipelines
    assert len(seen) == len(set(seen)) == 9
    assert r.propose(1) == []
