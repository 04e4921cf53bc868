"""End to end on the real digits CNN (test top-1 through an eval function, or fidelity):
outputs, a best.yaml that `slimgraph run` reproduces exactly, failed trials that do not
stop the search, a budget nobody meets, resume after an interruption, every strategy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimgraph import cli
from slimgraph.backends import ort
from slimgraph.search import search
from tests.search.conftest import FAST, TINY_SPACE

EVALS = "tests.search.evals"


def test_search_writes_every_output_and_best_yaml_reproduces_best_onnx(digits, tmp_path):
    model, data = digits
    out = tmp_path / "s"
    result = search(model, data, output=out, eval=f"{EVALS}:digits_accuracy", trials=5, strategy="exhaustive",
                    space=TINY_SPACE, references=["int8"], **FAST)
    for name in ("best.onnx", "best.yaml", "trials.csv", "trials.jsonl", "report.md", "pareto.png", "search.db"):
        assert (out / name).is_file(), name
    assert result.baseline["accuracy"] == pytest.approx(0.9917, abs=1e-3)  # the CNN's real test top-1
    assert result.budget_met and result.best["feasible"]
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["baseline", "reference"] + ["trial"] * 5
    report = (out / "report.md").read_text()
    assert "Pareto front" in report and "Budget met" in report and "`int8`" in report
    # the recipe reproduces the file exactly
    repro = tmp_path / "repro.onnx"
    assert cli.main(["run", str(model), "-p", str(out / "best.yaml"), "--data", str(data), "-o", str(repro), "-q"]) == 0
    x = {"input": np.load(data)["input"]}
    np.testing.assert_array_equal(ort.run_batched(out / "best.onnx", x)["logits"], ort.run_batched(repro, x)["logits"])


def test_fidelity_objective_without_eval(digits, tmp_path):
    model, data = digits
    result = search(model, data, output=tmp_path / "s", trials=3, strategy="random", space=TINY_SPACE, **FAST)
    assert result.baseline["accuracy"] == 1.0 and "fidelity_top1" in result.best["metrics"]


def test_eval_that_raises_fails_only_that_trial(digits, tmp_path):
    model, data = digits
    result = search(model, data, output=tmp_path / "s", eval=f"{EVALS}:raises_for_quantized", trials=6,
                    strategy="exhaustive", space=TINY_SPACE, proxy_samples=0, **FAST)
    failed = [r for r in result.trials if r["status"] == "failed"]
    assert failed and all("quantize.static" in r["pipeline"] for r in failed)
    assert all("deliberate failure" in r["error"] and "Traceback" in r["traceback"] for r in failed)
    assert any(r["status"] == "ok" for r in result.trials) and len(result.trials) == 6
    assert "## Failed trials" in (tmp_path / "s" / "report.md").read_text()


def test_eval_returning_nan_fails_that_trial(digits, tmp_path):
    model, data = digits
    space = {"stages": [{"name": "p", "pick": "one", "optional": False,
                         "passes": {"prune.magnitude": {"sparsity": [0.5, 0.6]}}}]}
    result = search(model, data, output=tmp_path / "s", eval=f"{EVALS}:nan_for_pruned", trials=2,
                    strategy="exhaustive", space=space, proxy_samples=0, **FAST)
    assert [r["status"] for r in result.trials] == ["failed", "failed"]
    assert all("returned nan" in r["error"] for r in result.trials)
    assert not result.budget_met and result.best is None


def test_budget_nobody_meets_still_lists_the_best_found(digits, tmp_path):
    model, data = digits
    space = {"stages": [{"name": "p", "pick": "one", "optional": False,
                         "passes": {"prune.structured": {"ratio": [0.5, 0.75]}}}]}
    result = search(model, data, output=tmp_path / "s", eval=f"{EVALS}:digits_accuracy", max_drop=0.001,
                    trials=2, strategy="exhaustive", space=space, proxy_samples=0, **FAST)
    assert not result.budget_met
    assert result.best["drop"] == min(r["drop"] for r in result.trials) > 0.001
    report = (tmp_path / "s" / "report.md").read_text()
    assert "No candidate meets the budget" in report and result.best["pipeline"] in report
    assert "does NOT meet" in (tmp_path / "s" / "best.yaml").read_text()
