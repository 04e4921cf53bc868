"""Legal orders: the DAG built from the passes' declared after/before constraints, permuted
stages sorted legally whatever the sampled permutation, and no sampled candidate of the
default space ever breaking a constraint."""

from __future__ import annotations

import itertools
import random

from slimgraph.passes.pipeline import order_violations, parse
from slimgraph.search.order import arrange, item_graph
from slimgraph.search.space import load_space, parse_space
from slimgraph.search.strategies import ExhaustiveStrategy, RandomChooser


def test_item_graph_follows_declared_constraints():
    space = parse_space({"stages": [{"name": "s", "pick": "any", "permute": True, "passes": {
        "quantize.static": {}, "cluster.kmeans": {}, "prune.magnitude": {}, "pack.sparse": {}}}]})
    g = item_graph(space.stages[0].items)
    assert g.has_edge("prune.magnitude", "cluster.kmeans")      # cluster.kmeans after prune.*
    assert g.has_edge("cluster.kmeans", "quantize.static")      # quantize.static after cluster.*
    assert g.has_edge("prune.magnitude", "pack.sparse")
    assert not g.has_edge("quantize.static", "prune.magnitude")


def test_every_sampled_permutation_is_arranged_legally():
    space = parse_space({"stages": [{"name": "s", "pick": "any", "permute": True, "passes": {
        "quantize.static": {}, "cluster.kmeans": {}, "prune.magnitude": {}, "pack.sparse": {}}}]})
    stage = space.stages[0]
    for perm in itertools.permutations([i.name for i in stage.items]):
        order = [i.name for i in arrange(stage, list(stage.items), perm)]
        assert order == ["prune.magnitude", "cluster.kmeans", "quantize.static", "pack.sparse"]


def test_random_candidates_of_the_default_space_are_always_legal():
    space = load_space()
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        chosen = space.sample(RandomChooser(rng))
        spec = [{i.name: c} if c else i.name for i, c in chosen]
        assert order_violations(list(parse(spec).passes())) == [], spec
        seen.add(tuple(i.name for i, _ in chosen))
    assert len(seen) > 50  # and the space is really explored


def test_exhaustive_enumerates_a_small_space_once_each():
    space = parse_space({"stages": [
        {"name": "a", "pick": "all", "passes": {"optimize": {}}},
        {"name": "b", "pick": "one", "passes": {"prune.magnitude": {"sparsity": {"float": [0.3, 0.9]}}}},
        {"name": "c", "pick": "any", "passes": {"pack.sparse": {}}}]})
    strategy = ExhaustiveStrategy(space, grid=3)
    found = [str(c) for c, _ in strategy.propose(100)]
    # b: skip or 3 grid points; c: with or without -> 8 distinct pipelines
    assert len(found) == len(set(found)) == 8
    assert "optimize,prune.magnitude(sparsity=0.6),pack.sparse" in found
    assert strategy.propose(5) == []


def test_incompatible_declarations_make_pairs_illegal_and_the_sampler_never_proposes_them():
    from slimgraph.search.order import drop_conflicts, legal

    # quantize.weight_only: incompatible_after cluster.kmeans (int4 blocks cannot hold the
    # codebooks); after pruning it keeps the zeros at 4 and 8 bits; quantize.dynamic: incompatible_before pack.clusters (after k-means it always fails)
    assert not legal(("cluster.kmeans", "quantize.weight_only"))
    assert legal(("prune.magnitude", "quantize.weight_only")) and legal(("cluster.kmeans", "quantize.dynamic"))
    assert not legal(("cluster.kmeans", "quantize.dynamic", "pack.clusters"))
    assert legal(("cluster.kmeans", "quantize.static", "pack.clusters"))
    space = parse_space({"stages": [
        {"name": "c", "pick": "one", "passes": {"cluster.kmeans": {}, "prune.magnitude": {}}},
        {"name": "q", "pick": "one", "passes": {"quantize.weight_only": {"bits": [4, 8]}, "quantize.dynamic": {}}},
        {"name": "p", "pick": "any", "passes": {"pack.clusters": {}}}]})
    rng = random.Random(0)
    picks = [tuple((i.name, c.get("bits")) for i, c in space.sample(RandomChooser(rng))) for _ in range(400)]
    names = [tuple(n for n, _ in p) for p in picks]
    assert ("cluster.kmeans", "quantize.dynamic") in names and ("prune.magnitude", "quantize.weight_only") in names
    assert not any("cluster.kmeans" in n and "quantize.weight_only" in n for n in names)
    assert not any("quantize.dynamic" in n and "pack.clusters" in n for n in names)
    assert all(any(("prune.magnitude", None) in p and ("quantize.weight_only", bits) in p for p in picks)
               for bits in (4, 8))
    # drop_conflicts reads the sampled configs: k-means then weight_only loses the later item
    items = {i.name: i for st in space.stages for i in st.items}
    kept = drop_conflicts([(items["cluster.kmeans"], {}), (items["quantize.weight_only"], {"bits": 8})])
    assert [i.name for i, _ in kept] == ["cluster.kmeans"]
    kept = drop_conflicts([(items["prune.magnitude"], {}), (items["quantize.weight_only"], {"bits": 8})])
    assert [i.name for i, _ in kept] == ["prune.magnitude", "quantize.weight_only"]
