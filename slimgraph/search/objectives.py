"""Objectives and constraints: accuracy (a user function or fidelity to the original),
latency, size; the feasibility test and the scalar score used to pick one best pipeline.

Accuracy comes from `--eval module:function` (called with the candidate's ONNX path,
returning a number or a dict with an `accuracy` key; a raise or NaN fails that trial), or
is the fidelity of the candidate's first output to the original's on the data:

- `top1`: fraction of samples whose argmax agrees (classifiers; the default when the
  output's last axis looks like scores),
- `cosine`: mean cosine similarity per sample (embeddings; the default otherwise),
- `rel_error`: 1 - ||out - ref|| / ||ref|| over the whole output.

The original's fidelity is 1 by definition. Latency is the median over paired runs of the
candidate's time divided by the original's (`ort.bench(...).ratio_to`), size the ONNX file
bytes divided by the original's; both are minimised. A candidate is feasible when its
accuracy drop from the original is at most `max_drop`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from slimgraph.errors import PipelineError

FIDELITY_METRICS = ("auto", "top1", "cosine", "rel_error")
COST_OBJECTIVES = ("latency", "size")


def load_eval(spec: str | Callable | None) -> Callable | None:
    """`module:function` -> the function (the current directory is importable)."""
    if spec is None or callable(spec):
        return spec
    import os
    import sys

    if ":" not in spec:
        raise PipelineError(f"--eval {spec!r}: write it as module:function, e.g. my_eval:accuracy")
    module_name, _, fn_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PipelineError(f"--eval {spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise PipelineError(f"--eval {spec!r}: module {module_name!r} has no function {fn_name!r}")
    return fn


def eval_value(result: Any) -> tuple[float, dict]:
    """A user function's result as (accuracy, all reported metrics). Raises ValueError for
    NaN, a dict without a number, or anything that is not a number."""
    metrics: dict = {}
    if isinstance(result, dict):
        metrics = {k: v for k, v in result.items() if isinstance(v, (int, float, np.number))}
        if "accuracy" in result:
            value = result["accuracy"]
        elif metrics:
            value = next(iter(metrics.values()))
        else:
            raise ValueError(f"the eval function returned a dict without a number: {result!r}")
    else:
        value = result
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"the eval function returned {type(value).__name__} {value!r}, not a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"the eval function returned {value}")
    return value, {k: float(v) for k, v in metrics.items()}


def resolve_metric(metric: str, reference: np.ndarray) -> str:
    if metric not in FIDELITY_METRICS:
        raise PipelineError(f"fidelity metric {metric!r}: choose one of {', '.join(FIDELITY_METRICS)}")
    if metric != "auto":
        return metric
    scores = reference.ndim == 2 and 1 < reference.shape[-1] <= 10000 and np.issubdtype(reference.dtype, np.floating)
    return "top1" if scores else "cosine"


def fidelity(reference: np.ndarray, output: np.ndarray, metric: str) -> float:
    """How close `output` is to `reference` (1 = identical); see module docstring."""
    a = np.asarray(reference, np.float64)
    b = np.asarray(output, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"the candidate's output has shape {b.shape}, the original's {a.shape}")
    if metric == "top1":
        return float(np.mean(a.reshape(-1, a.shape[-1]).argmax(-1) == b.reshape(-1, b.shape[-1]).argmax(-1)))
    if metric == "cosine":
        a2, b2 = a.reshape(len(a), -1), b.reshape(len(b), -1)
        norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
        return float(np.mean((a2 * b2).sum(axis=1) / np.maximum(norms, 1e-12)))
    if metric == "rel_error":
        return float(1.0 - np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
    raise PipelineError(f"fidelity metric {metric!r}: choose one of {', '.join(FIDELITY_METRICS)}")


def check_objectives(objectives: list[str] | tuple[str, ...] | str) -> tuple[str, ...]:
    items = [o.strip() for o in objectives.split(",")] if isinstance(objectives, str) else list(objectives)
    items = [o for o in items if o and o != "accuracy"]
    bad = [o for o in items if o not in COST_OBJECTIVES]
    if bad:
        raise PipelineError(f"unknown objective(s) {bad}: accuracy is always one; add any of "
                            f"{', '.join(COST_OBJECTIVES)}, e.g. --objectives latency,size")
    if not items:
        raise PipelineError("give at least one of latency, size in --objectives (accuracy is always one)")
    return tuple(dict.fromkeys(items))


def values(record: dict, objectives: tuple[str, ...]) -> list[float]:
    """The optuna objective vector: accuracy (max), then each cost ratio (min)."""
    return [record["accuracy"], *(record[f"{o}_ratio"] for o in objectives)]


def score(record: dict, objectives: tuple[str, ...]) -> float:
    """One number to rank feasible candidates (higher is better): minus the sum of the log
    cost ratios, i.e. the geometric mean speed-up x shrink factor. -inf when infeasible."""
    if record.get("status") != "ok" or not record.get("feasible"):
        return -math.inf
    return -sum(math.log(max(record[f"{o}_ratio"], 1e-12)) for o in objectives)


def dominates(a: dict, b: dict, objectives: tuple[str, ...], latency_tol: float = 0.0) -> bool:
    """a is at least as good as b in every objective (latency within `latency_tol`, a
    relative noise allowance) and strictly better in one."""
    ge = a["accuracy"] >= b["accuracy"]
    better = a["accuracy"] > b["accuracy"]
    for o in objectives:
        tol = latency_tol if o == "latency" else 0.0
        x, y = a[f"{o}_ratio"], b[f"{o}_ratio"]
        ge &= x <= y * (1 + tol)
        better |= x < y
    return bool(ge and better)


def pareto_front(records: list[dict], objectives: tuple[str, ...]) -> list[dict]:
    """The feasible records no other feasible record dominates."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("feasible")]
    return [r for r in ok if not any(dominates(o, r, objectives) for o in ok if o is not r)]


def hypervolume(records: list[dict], objectives: tuple[str, ...], max_drop: float) -> float:
    """Hypervolume of the feasible points, all objectives minimised and normalised: accuracy
    drop / max_drop and the cost ratios, against the reference point (1, 1, ...) = the
    budget's edge at the original's latency and size. Exact, by slicing (few points)."""
    pts = []
    for r in records:
        if r.get("status") == "ok" and r.get("feasible"):
            p = [r["drop"] / max_drop if max_drop > 0 else 0.0, *(r[f"{o}_ratio"] for o in objectives)]
            if all(x < 1.0 for x in p):
                pts.append(p)
    return _hv(np.asarray(pts, np.float64).reshape(-1, 1 + len(objectives)), np.ones(1 + len(objectives)))


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(ref[0] - points[:, 0].min())
    order = np.argsort(points[:, 0])
    pts = points[order]
    total = 0.0
    for i, p in enumerate(pts):
        nxt = pts[i + 1, 0] if i + 1 < len(pts) else ref[0]
        width = nxt - p[0]
        if width > 0:
            total += width * _hv(pts[: i + 1, 1:], ref[1:])
    return float(total)
