"""Objectives: fidelity metrics, reading a user eval function's result, Pareto front,
dominance with a latency noise allowance, and hypervolume."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slimgraph.errors import PipelineError
from slimgraph.search import objectives as obj


def test_fidelity_metrics():
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    assert obj.fidelity(ref, ref, "top1") == 1.0
    assert obj.fidelity(ref, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0]]), "top1") == 0.5
    assert obj.fidelity(ref, 3 * ref, "cosine") == pytest.approx(1.0)
    assert obj.fidelity(ref, 1.1 * ref, "rel_error") == pytest.approx(0.9)
    assert obj.resolve_metric("auto", ref.astype(np.float32)) == "top1"
    assert obj.resolve_metric("auto", np.zeros((4, 10, 384), np.float32)) == "cosine"


def test_eval_results():
    assert obj.eval_value(0.9) == (0.9, {})
    assert obj.eval_value({"accuracy": 0.8, "loss": 1.5}) == (0.8, {"accuracy": 0.8, "loss": 1.5})
    with pytest.raises(ValueError, match="nan"):
        obj.eval_value(float("nan"))
    with pytest.raises(ValueError, match="not a number"):
        obj.eval_value("good")
    with pytest.raises(PipelineError, match="module:function"):
        obj.load_eval("no_colon")
    with pytest.raises(PipelineError, match="cannot import module"):
        obj.load_eval("no_such_module_xyz:f")


def _rec(acc, lat, size, feasible=True):
    return {"status": "ok", "feasible": feasible, "accuracy": acc, "drop": 1.0 - acc,
            "latency_ratio": lat, "size_ratio": size}


def test_pareto_front_and_dominance():
    objs = ("latency", "size")
    a, b, c, d = _rec(0.99, 0.5, 0.5), _rec(0.99, 0.6, 0.6), _rec(1.0, 0.9, 0.9), _rec(0.5, 0.1, 0.1, feasible=False)
    front = obj.pareto_front([a, b, c, d], objs)
    assert front == [a, c]
    assert obj.dominates(a, b, objs) and not obj.dominates(b, a, objs)
    # 3% slower counts as equal with a 5% noise allowance
    assert obj.dominates(_rec(0.99, 0.515, 0.4), _rec(0.99, 0.5, 0.5), objs, latency_tol=0.05)
    assert obj.score(a, objs) == pytest.approx(-2 * math.log(0.5))
    assert obj.score(d, objs) == -math.inf


def test_hypervolume_of_known_points():
    # normalised drop 0 (acc 1.0), latency 0.5, size 0.5 against (1, 1, 1): 1 * 0.5 * 0.5
    assert obj.hypervolume([_rec(1.0, 0.5, 0.5)], ("latency", "size"), 0.01) == pytest.approx(0.25)
    # two points on one objective: union of the boxes
    hv = obj.hypervolume([_rec(1.0, 0.5, 1.0 - 1e-9), _rec(1.0, 0.8, 0.5)], ("latency", "size"), 0.01)
    assert hv == pytest.approx(0.5 * 1e-9 + 0.2 * 0.5, rel=1e-6)
    assert obj.hypervolume([_rec(0.5, 0.1, 0.1, feasible=False)], ("latency", "size"), 0.01) == 0.0


def test_objective_names_are_checked():
    assert obj.check_objectives("latency,size") == ("latency", "size")
    with pytest.raises(PipelineError, match="unknown objective"):
        obj.check_objectives("speed")
