"""What one worker does for one candidate: build it (through the prefix cache), save it,
check it cheaply on a few samples (the proxy), then measure its accuracy. Latency is not
measured here: the driver times candidates one at a time, in one lane (`api.py`).

Everything a worker needs travels in a picklable `Settings`; the input model, the data and
the original's outputs are loaded once per worker process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.search.cache import ModelCache, chain, data_hash, root_key
from slimgraph.search.candidate import Candidate
from slimgraph.search.objectives import eval_value, fidelity, load_eval, resolve_metric


@dataclasses.dataclass(frozen=True)
class Settings:
    model_path: str
    data_path: str | None
    cache_dir: str
    use_cache: bool = True
    seed: int = 0
    eval: str | Callable | None = None
    metric: str = "auto"
    #: samples of the cheap proxy check; 0 turns it off
    proxy_samples: int = 32
    #: the proxy fidelity below which the full evaluation is skipped (None: never skipped)
    proxy_min: float | None = None
    #: return the model's bytes (executors whose workers do not share the driver's disk)
    return_bytes: bool = False


@dataclasses.dataclass
class Outcome:
    status: str  # ok | failed | pruned
    accuracy: float | None = None
    proxy: float | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    size_bytes: int | None = None
    path: str | None = None
    model_bytes: bytes | None = None
    cache_hits: int = 0
    steps_built: int = 0
    build_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: str | None = None
    traceback: str | None = None


# --- per-process state -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _inputs(model_path: str, data_path: str | None) -> tuple[dict, Any, str, bytes]:
    """(data, labels, data digest, model bytes)."""
    import slimgraph
    from slimgraph import data as sgdata

    model_bytes = Path(model_path).read_bytes()
    if data_path is None:
        return {}, None, data_hash(None), model_bytes
    data, labels = sgdata.load_npz(data_path, slimgraph.load(model_path))
    return data, labels, data_hash(data, labels), model_bytes


@functools.lru_cache(maxsize=4)
def _reference(model_path: str, data_path: str | None) -> np.ndarray:
    """The original's first output on the whole data."""
    from slimgraph.backends import ort

    data = _inputs(model_path, data_path)[0]
    return next(iter(ort.run_batched(model_path, data).values()))


def _outputs(path: str, data: dict, n: int | None = None) -> np.ndarray:
    from slimgraph.backends import ort
    from slimgraph.data import count

    if n is not None and n < count(data):
        data = {k: v[:n] for k, v in data.items()}
    return next(iter(ort.run_batched(path, data).values()))


# --- building ----------------------------------------------------------------------------------------
def build(settings: Settings, candidate: Candidate) -> tuple[Path, int, int]:
    """Build `candidate`, reusing the longest cached prefix. Returns (ONNX path, steps taken
    from the cache, steps run). The model of every step is stored under its chain key."""
    import slimgraph
    from slimgraph.ir.io import save

    data, labels, digest, model_bytes = _inputs(settings.model_path, settings.data_path)
    cache = ModelCache(settings.cache_dir, settings.use_cache)
    if candidate.is_baseline:
        return Path(settings.model_path), 0, 0
    keys = chain(root_key(model_bytes, digest, settings.seed), candidate)
    start, path, failure = cache.longest_prefix(keys)
    if failure is not None:
        raise CachedFailure(failure["error"], failure["traceback"])
    steps = candidate.spec()
    if not settings.use_cache:  # the plain path: the whole pipeline in one run
        result = slimgraph.run(settings.model_path, steps, data=data or None, labels=labels, seed=settings.seed)
        out = Path(settings.cache_dir) / "uncached" / f"{candidate.key()}.onnx"
        save(result.model, out)
        return out, 0, len(steps)
    model = slimgraph.load(path) if path is not None else slimgraph.load(settings.model_path)
    for i in range(start, len(steps)):
        try:
            model = slimgraph.run(model, [steps[i]], data=data or None, labels=labels, seed=settings.seed).model
        except Exception as e:  # recorded under the step's key, then the trial fails
            cache.put_failure(keys[i], _one_line(e), traceback.format_exc())
            raise
        path = cache.put_model(keys[i], model.to_proto().SerializeToString())
        if i + 1 < len(steps):  # every step starts from a stored model, hit or not: same results
            model = slimgraph.load(path)
    return path, start, len(steps) - start


class CachedFailure(RuntimeError):
    """A prefix of this pipeline failed before; its recorded error."""

    def __init__(self, error: str, trace: str):
        super().__init__(f"{error} (recorded in the cache)")
        self.trace = trace


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


# --- one candidate -----------------------------------------------------------------------------------
def run_job(settings: Settings, candidate: Candidate) -> Outcome:
    """Build and evaluate one candidate. Never raises for a bad candidate: a pass that fails,
    an eval function that raises or returns NaN give `status="failed"` with the traceback."""
    out = Outcome(status="ok")
    t0 = time.perf_counter()
    try:
        path, out.cache_hits, out.steps_built = build(settings, candidate)
        out.build_seconds = time.perf_counter() - t0
        out.path, out.size_bytes = str(path), path.stat().st_size
        if settings.return_bytes:
            out.model_bytes = path.read_bytes()
        t1 = time.perf_counter()
        _evaluate(settings, candidate, out)
        out.eval_seconds = time.perf_counter() - t1
    except CachedFailure as e:
        out.status, out.error, out.traceback = "failed", str(e), e.trace
    except Exception as e:  # the search goes on: the trial is recorded as failed
        out.status, out.error, out.traceback = "failed", _one_line(e), traceback.format_exc()
    if out.status == "failed" and not out.build_seconds:
        out.build_seconds = time.perf_counter() - t0
    return out


def _evaluate(settings: Settings, candidate: Candidate, out: Outcome) -> None:
    data = _inputs(settings.model_path, settings.data_path)[0]
    if data and settings.proxy_samples > 0 and settings.proxy_min is not None and not candidate.is_baseline:
        ref = _reference(settings.model_path, settings.data_path)
        metric = resolve_metric(settings.metric, ref)
        n = min(settings.proxy_samples, len(ref))
        out.proxy = fidelity(ref[:n], _outputs(out.path, data, n), metric)
        if out.proxy < settings.proxy_min:
            out.status = "pruned"
            return
    fn = load_eval(settings.eval)
    if fn is not None:
        out.accuracy, out.metrics = eval_value(fn(out.path))
        return
    if not data:
        raise ValueError("no --data and no --eval: nothing to measure accuracy with")
    ref = _reference(settings.model_path, settings.data_path)
    metric = resolve_metric(settings.metric, ref)
    out.accuracy = fidelity(ref, _outputs(out.path, data), metric)
    if not math.isfinite(out.accuracy):
        raise ValueError(f"fidelity ({metric}) is {out.accuracy}: the candidate's outputs are not finite")
    out.metrics = {f"fidelity_{metric}": out.accuracy}
