"""The search space: parsing a space file, narrowing declared domains, and rejecting
unknown passes/fields, domains outside the declared ones, empty and contradictory spaces."""

from __future__ import annotations

import pytest

from slimgraph.search.space import SpaceError, load_space, parse_space
from slimgraph.search.strategies import RandomChooser


def _space(*stages):
    return parse_space({"stages": list(stages)})


def test_default_space_loads_every_stage():
    space = load_space()
    assert [s.name for s in space.stages] == [
        "cleanup", "structure", "training", "clustering", "quantization", "packing"]
    prune = next(i for i in space.items() if i.name == "prune.structured")
    ratio = next(p for p in prune.params if p.name == "ratio")
    assert (ratio.kind, ratio.values) == ("float", (0.1, 0.5))


def test_search_keyword_takes_the_declared_domain():
    space = _space({"name": "s", "passes": {"cluster.kmeans": {"k": "search", "granularity": "search"}}})
    k, gran = space.items()[0].params
    assert (k.kind, k.values, k.log) == ("int", (2, 256), True)  # declared in cluster.kmeans
    assert gran.kind == "choice" and set(gran.values) == {"channel", "tensor"}


def test_conditional_param_only_sampled_when_its_condition_holds():
    space = _space({"name": "s", "passes": {"prune.structured": {
        "mode": ["uniform", "macs"], "target_macs": {"float": [0.2, 0.4], "when": {"mode": "macs"}}}}})
    import random

    rng = random.Random(0)
    configs = [space.items()[0].sample_config(RandomChooser(rng)) for _ in range(40)]
    assert all(("target_macs" in c) == (c["mode"] == "macs") for c in configs)
    assert {c["mode"] for c in configs} == {"uniform", "macs"}


@pytest.mark.parametrize("params, message", [
    ({"ratio": {"float": [0.1, 0.95]}}, "outside its declared range [0.0, 0.9]"),
    ({"criterion": ["l1", "l7"]}, "outside its declared choices"),
    ({"ratio": {"float": [0.5, 0.1]}}, "low <= high"),
    ({"ratoi": 0.3}, "has no config field 'ratoi'"),
    ({"ratio": []}, "empty list"),
])
def test_bad_domains_are_rejected(params, message):
    with pytest.raises(SpaceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _space({"name": "s", "passes": {"prune.structured": params}})


def test_unknown_pass_is_named_with_suggestions(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("stages:\n  - name: s\n    passes: {prune.structurd: {}}\n")
    with pytest.raises(SpaceError, match=r"unknown pass 'prune.structurd'.*did you mean prune.structured"):
        load_space(path)


def test_empty_space_is_rejected():
    with pytest.raises(SpaceError, match="no stages"):
        parse_space({"stages": []})
    with pytest.raises(SpaceError, match="offers no passes"):
        _space({"name": "s", "passes": {}})


def test_contradictory_fixed_order_is_rejected():
    # quantize.static must run after fold_batchnorm: a stage that always runs it first is contradictory
    with pytest.raises(SpaceError, match="contradictory space.*'quantize.static' must run after 'fold_batchnorm'"):
        _space({"name": "s", "pick": "all", "passes": {"quantize.static": {}, "fold_batchnorm": {}}})


def test_optional_items_that_can_never_join_the_fixed_ones_are_contradictory():
    with pytest.raises(SpaceError, match="contradictory space: none of"):
        _space({"name": "q", "pick": "all", "passes": {"quantize.static": {}}},
               {"name": "late", "pick": "one", "passes": {"prune.magnitude": {}}})


def test_requirements_filter_drops_training_without_labels():
    space, dropped = load_space().filtered({"data", "torch"})
    names = {i.name for i in space.items()}
    assert "train.finetune" not in names and "prune.structured" in names
    assert any("train.finetune (needs labels)" in d for d in dropped)
