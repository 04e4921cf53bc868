"""Seeding a search with built-in recipes (a warm start: they are the first trials and count
toward --trials; a recipe also measured as a reference row is measured once), and optuna
proposals of pipelines already evaluated being re-sampled rather than wasting a trial."""

from __future__ import annotations

import pytest

from slimgraph.search import search
from tests.search.conftest import FAST, TINY_SPACE

EVALS = "tests.search.evals"
TWO_PIPELINES = {"stages": [{"name": "c", "pick": "all", "passes": {"optimize": {}}},
                            {"name": "q", "pick": "one", "passes": {"quantize.static": {"per_channel": [True]}}}]}


def _covers(front, ref) -> bool:
    return any(f["accuracy"] >= ref["accuracy"] and f["size_ratio"] <= ref["size_ratio"]
               and f["latency_ratio"] <= ref["latency_ratio"] for f in front)


def test_seeded_recipes_are_the_first_trials_and_the_front_covers_them(digits, tmp_path):
    model, data = digits
    refs = ["int8", "int8-dynamic"]
    result = search(model, data, output=tmp_path / "s", eval=f"{EVALS}:digits_accuracy", trials=4,
                    space=TINY_SPACE, references=refs, **{**FAST, "seed_recipes": True})
    assert [t.get("seeded") for t in result.trials] == [*refs, None, None]
    assert all(t["pipeline"].startswith("optimize") for t in result.trials[2:])
    for ref, trial in zip(result.references, result.trials):
        # the same measurement (built and timed once), recorded as a trial
        assert (trial["pipeline"], trial["accuracy"], trial["size_bytes"], trial["latency_ratio"]) == \
               (ref["pipeline"], ref["accuracy"], ref["size_bytes"], ref["latency_ratio"])
        assert ref["status"] == "ok" and (not ref["feasible"] or _covers(result.front, ref))
    report = (tmp_path / "s" / "report.md").read_text()
    assert "Seeded: the first 2 trials are built-in recipes applied alone (int8, int8-dynamic)" in report


@pytest.mark.slow
def test_default_seeds_without_references_and_none_when_turned_off(digits, tmp_path):
    model, data = digits
    seeded = search(model, data, output=tmp_path / "a", trials=2, space=TINY_SPACE, **{**FAST, "seed_recipes": True})
    assert [t.get("seeded") for t in seeded.trials] == ["int8-dynamic", "int4-weights"]  # the first DEFAULT_SEEDS
    assert any("only the first 2 of the" in n for n in seeded.notes)
    plain = search(model, data, output=tmp_path / "b", trials=2, space=TINY_SPACE, **FAST)
    assert not any(t.get("seeded") for t in plain.trials)


def test_a_resumed_search_does_not_seed_again(digits, tmp_path):
    model, data = digits
    out = tmp_path / "s"

    def stop(rec):
        if rec["number"] == 1:
            raise KeyboardInterrupt

    opts = dict(trials=3, space=TINY_SPACE, references=["int8"], **{**FAST, "seed_recipes": True})
    with pytest.raises(KeyboardInterrupt):
        search(model, data, output=out, on_trial=stop, **opts)
    result = search(model, data, output=out, resume=True, **opts)
    assert [t.get("seeded") for t in result.trials] == ["int8", None, None]
    assert [t["number"] for t in result.trials] == [0, 1, 2]


@pytest.mark.parametrize("strategy", ["tpe", pytest.param("nsga2", marks=pytest.mark.slow)])
def test_optuna_duplicates_are_resampled(digits, tmp_path, strategy):
    model, data = digits
    result = search(model, data, output=tmp_path / "s", trials=8, strategy=strategy, space=TINY_SPACE, **FAST)
    pipelines = [t["pipeline"] for t in result.trials]
    assert len(set(pipelines)) == len(pipelines) == 8  # TINY_SPACE holds 12 distinct pipelines


def test_an_exhausted_space_reuses_stored_results_and_says_so(digits, tmp_path):
    model, data = digits
    result = search(model, data, output=tmp_path / "s", trials=3, space=TWO_PIPELINES, **FAST)
    firsts = {t["pipeline"]: t for t in result.trials if t.get("duplicate_of") is None}
    assert set(firsts) == {"optimize", "optimize,quantize.static(per_channel=True)"}
    repeats = [t for t in result.trials if t.get("duplicate_of") is not None]
    assert len(repeats) == 1
    for t in repeats:
        assert t["accuracy"] == firsts[t["pipeline"]]["accuracy"] and t["duplicate_of"] < t["number"]
    assert "1 trial(s) repeat an earlier pipeline" in (tmp_path / "s" / "report.md").read_text()
