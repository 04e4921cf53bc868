"""`slimgraph.search(...)`: the driver. Validates everything before writing anything, then:
the original (baseline) and any reference recipes are evaluated, the strategy proposes
batches, the executor builds and scores them, the latency lane times them one by one,
every trial goes to the optuna study (SQLite, `search.db` in the output folder, so an
interrupted search resumes with `resume=True`), and the outputs are written at the end
(`report.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.errors import DataError, PipelineError
from slimgraph.search import objectives as obj
from slimgraph.search.candidate import Candidate
from slimgraph.search.evaluate import Outcome, Settings, run_job
from slimgraph.search.executors import make_executor
from slimgraph.search.space import Space, SpaceError, load_space
from slimgraph.search.strategies import STRATEGIES, make_strategy, optuna_sampler

logger = logging.getLogger("slimgraph.search")
DB_NAME = "search.db"
STUDY = "slimgraph-search"


@dataclasses.dataclass
class SearchResult:
    """What a search found. Records are dicts (one per evaluated pipeline; `kind` is
    baseline, reference or trial), as written to trials.jsonl."""

    output: Path
    baseline: dict
    trials: list[dict]
    references: list[dict]
    front: list[dict]
    best: dict | None
    budget_met: bool
    objectives: tuple[str, ...]
    max_drop: float
    strategy: str
    seconds: float
    notes: list[str]

    @property
    def records(self) -> list[dict]:
        return [self.baseline, *self.references, *self.trials]

    def hypervolume(self) -> float:
        return obj.hypervolume(self.trials, self.objectives, self.max_drop)


def search(
    model: str | Path, data: str | Path | Mapping[str, np.ndarray] | None = None, *,
    output: str | Path, eval: str | Callable | None = None, max_drop: float = 0.01,
    objectives: Sequence[str] | str = ("latency", "size"), trials: int = 20, strategy: str = "tpe",
    jobs: int = 1, executor: str = "local", address: str | None = None, fallback_local: bool = False,
    space: str | Path | dict | Space | None = None, resume: bool = False, cache: bool = True,
    cache_dir: str | Path | None = None, metric: str = "auto", proxy_samples: int = 32,
    proxy_factor: float = 3.0, latency_runs: int = 20, threads: int = 1, seed: int = 0,
    references: Sequence[str] = (), grid: int = 3, progress: bool = False,
    on_trial: Callable[[dict], None] | None = None, seed_recipes: bool | Sequence[str] = True,
) -> SearchResult:
    """Search pass orders and configs of `space` for `model` against accuracy (the `eval`
    function, or fidelity to the original on `data`), latency and size, under an accuracy
    drop of at most `max_drop`. Writes best.onnx, best.yaml, trials.csv/jsonl, report.md and
    pareto.png to `output`. See `slimgraph search --help` for every option.

    `seed_recipes` (a warm start, as Olive/NNCF users expect): the first trials are built-in
    recipes applied alone (True: `references` if given, else `DEFAULT_SEEDS` that fit the data;
    or a list of recipe names; False: none). They count toward `trials` and are marked
    `seeded` in the history, so the front equals or dominates each of them under the budget."""
    t0 = time.perf_counter()
    plan = _validate(model, data, output, eval, max_drop, objectives, trials, strategy, jobs, space,
                     resume, metric, references, seed_recipes)
    runner, note = make_executor(executor, jobs=jobs, address=address, fallback_local=fallback_local)
    notes = [*plan["notes"], *([note] if note else [])]
    out: Path = plan["output"]
    created = not out.exists()
    started = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        model_path, data_path = _materialise(out, model, plan)
        settings = Settings(
            model_path=str(model_path), data_path=data_path, cache_dir=str(Path(cache_dir or out / "cache")),
            use_cache=cache, seed=seed, eval=eval, metric=metric, proxy_samples=proxy_samples if plan["data"] else 0,
            proxy_min=(1.0 - proxy_factor * max_drop) if proxy_samples > 0 else None,
            return_bytes=runner.name == "ray",
        )
        lane = _lane(model_path, plan, latency_runs, threads)
        driver = _Driver(settings, runner, lane, plan["objectives"], max_drop, progress, on_trial)
        baseline = driver.evaluate([(Candidate(()), "baseline")])[0]
        if baseline["status"] != "ok":
            raise PipelineError(f"the unmodified model could not be evaluated: {baseline['error']}")
        driver.baseline = baseline
        refs = driver.evaluate([(Candidate.from_spec([r]), "reference") for r in plan["references"]])
        study = _study(out, plan, strategy, seed, trials, resume, max_drop)
        strat = make_strategy(strategy, plan["space"], study=study, score=lambda r: obj.score(r, plan["objectives"]),
                              seed=seed, grid=grid)
        started = True
        found = driver.loop(strat, study, trials, seeds=plan["seeds"], references=refs)
    except BaseException:
        if created and not started:  # failed before any trial: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        runner.close()
    from slimgraph.search.report import summarise, write_outputs

    result = summarise(out, baseline, refs, found, plan["objectives"], max_drop, strategy,
                       time.perf_counter() - t0, notes)
    write_outputs(result, model_path, plan["data_path_for_cmd"])
    return result


# --- validation (before anything is written) ------------------------------------------------------
def _validate(model, data, output, eval, max_drop, objectives, trials, strategy, jobs, space, resume,
              metric, references, seed_recipes=False) -> dict:
    import slimgraph
    from slimgraph import data as sgdata
    from slimgraph.passes.base import _has_module
    from slimgraph.passes.pipeline import recipe_names

    notes: list[str] = []
    if isinstance(model, (str, Path)) and not Path(model).is_file():
        raise DataError(f"{model}: model file not found")
    m = slimgraph.load(model)
    arrays = labels = None
    if isinstance(data, (str, Path)):
        arrays, labels = sgdata.load_npz(data, m)
    elif data is not None:
        arrays = dict(data)
        labels = arrays.pop("labels", None)
        arrays = sgdata.check(arrays, m)
    if arrays is None and eval is None:
        raise DataError("search needs --data (inputs to measure fidelity on, and to calibrate) or --eval")
    obj.load_eval(eval)
    objectives = obj.check_objectives(objectives)
    if strategy not in STRATEGIES:
        raise PipelineError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if trials < 1 or jobs < 1:
        raise PipelineError(f"--trials and --jobs must be at least 1 (got {trials}, {jobs})")
    if not (0 <= max_drop < 1):
        raise PipelineError(f"--max-drop {max_drop}: give the allowed accuracy drop as a fraction in [0, 1), e.g. 0.01")
    if metric not in obj.FIDELITY_METRICS:
        raise PipelineError(f"--metric {metric!r}: choose one of {', '.join(obj.FIDELITY_METRICS)}")
    unknown = [r for r in references if r not in recipe_names()]
    if unknown:
        raise PipelineError(f"unknown reference recipe(s) {unknown} (recipes: {', '.join(recipe_names())})")
    seeds = _seeds(seed_recipes, references, arrays is not None)
    unknown = [r for r in seeds if r not in recipe_names()]
    if unknown:
        raise PipelineError(f"unknown recipe(s) to seed the search with {unknown} "
                            f"(recipes: {', '.join(recipe_names())})")
    if len(seeds) > trials:
        notes.append(f"only the first {trials} of the {len(seeds)} seeded recipes fit in --trials {trials}")
        seeds = seeds[:trials]
    sp = space if isinstance(space, Space) else load_space(space)
    available = {"torch"} if _has_module("torch") else set()
    if arrays:
        available.add("data")
    if labels is not None:
        available.add("labels")
    sp, dropped = sp.filtered(available)
    if dropped:
        notes.append("left out of the space for lack of what they need: " + "; ".join(dropped))
    if not sp.stages or all(s.pick == "all" for s in sp.stages) and not sp.items():
        raise SpaceError(f"{sp.source}: empty space after leaving out passes whose needs are missing ({dropped})")
    out = Path(output)
    db = out / DB_NAME
    if out.exists() and not out.is_dir():
        raise DataError(f"-o {out}: exists and is not a folder")
    if resume and not db.is_file():
        raise DataError(f"--resume: {out} holds no search to resume ({DB_NAME} not found)")
    if not resume and db.is_file():
        raise DataError(f"-o {out}: already holds a search; add --resume to continue it, or choose another folder")
    return {"model": m, "data": arrays, "labels": labels, "objectives": objectives, "space": sp,
            "output": out, "notes": notes, "references": list(references), "seeds": seeds,
            "data_path_for_cmd": str(data) if isinstance(data, (str, Path)) else None}


#: recipes a search starts from when no references are given (those needing data only with data)
DEFAULT_SEEDS = ("int8-dynamic", "int4-weights", "cluster-16", "int8", "prune-50", "sparse-80")
_NEEDS_DATA = ("int8",)


def _seeds(seed_recipes, references, has_data: bool) -> list[str]:
    if seed_recipes is True:
        names = list(references) or [r for r in DEFAULT_SEEDS if has_data or r not in _NEEDS_DATA]
    elif not seed_recipes:
        names = []
    else:
        names = [seed_recipes] if isinstance(seed_recipes, str) else list(seed_recipes)
    return list(dict.fromkeys(names))


def _materialise(out: Path, model, plan) -> tuple[Path, str | None]:
    """Paths workers can read: the model file and an .npz of the data (written to the
    output folder when they were given as objects)."""
    from slimgraph.ir.io import save

    if isinstance(model, (str, Path)):
        model_path = Path(model).resolve()
    else:
        model_path = save(plan["model"], out / "input.onnx")
    if plan["data"] is None:
        return model_path, None
    if plan["data_path_for_cmd"]:
        return model_path, str(Path(plan["data_path_for_cmd"]).resolve())
    path = out / "data.npz"
    arrays = dict(plan["data"])
    if plan["labels"] is not None:
        arrays["labels"] = plan["labels"]
    np.savez(path, **arrays)
    return model_path, str(path)


def _lane(model_path: Path, plan, runs: int, threads: int):
    from slimgraph import data as sgdata
    from slimgraph.search.lane import LatencyLane

    m = plan["model"]
    feeds = (sgdata.sample(plan["data"], sgdata.input_ranks(m), 0) if plan["data"]
             else sgdata.generate(m, 1, seed=0))
    return LatencyLane(str(model_path), feeds, runs=runs, threads=threads)


def _study(out: Path, plan, strategy: str, seed: int, trials: int, resume: bool, max_drop: float):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sampler = (optuna_sampler(strategy, seed=seed, trials=trials)
               if strategy in ("tpe", "nsga2") else optuna.samplers.RandomSampler(seed=seed))
    study = optuna.create_study(
        study_name=STUDY, storage=f"sqlite:///{out / DB_NAME}", load_if_exists=resume, sampler=sampler,
        directions=["maximize"] + ["minimize"] * len(plan["objectives"]))
    identity = {"model_sha256": hashlib.sha256(plan["model"].to_proto().SerializeToString()).hexdigest(),
                "strategy": strategy, "objectives": list(plan["objectives"]), "max_drop": max_drop}
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
    elif stored != identity:
        changed = [k for k in identity if stored.get(k) != identity[k]]
        was = [stored.get(k) for k in changed]
        raise DataError(f"--resume: the stored search differs in {changed} (stored {was}); "
                        "resume with the same model, strategy, objectives and --max-drop, or use a new folder")
    return study


# --- the loop ------------------------------------------------------------------------------------------
class _Driver:
    def __init__(self, settings: Settings, runner, lane, objectives, max_drop, progress, on_trial):
        self.settings, self.runner, self.lane = settings, runner, lane
        self.objectives, self.max_drop, self.on_trial = objectives, max_drop, on_trial
        self.baseline: dict | None = None
        self.progress = progress
        self.cache_hits = 0

    def evaluate(self, batch: list[tuple[Candidate, str]]) -> list[dict]:
        if not batch:
            return []
        if batch[0][1] == "baseline":
            outcomes = [run_job(self.settings, batch[0][0])]
        elif batch[0][1] == "reference":  # measured in full: no proxy shortcut for reference rows
            outcomes = self.runner.map(dataclasses.replace(self.settings, proxy_min=None), [c for c, _ in batch])
        else:
            outcomes = self.runner.map(self.settings, [c for c, _ in batch])
        return [self._record(c, kind, o) for (c, kind), o in zip(batch, outcomes)]

    def _record(self, cand: Candidate, kind: str, o: Outcome) -> dict:
        rec: dict[str, Any] = {
            "kind": kind, "pipeline": str(cand), "spec": cand.spec(), "key": cand.key(), "status": o.status,
            "accuracy": o.accuracy, "proxy": o.proxy, "metrics": o.metrics, "size_bytes": o.size_bytes,
            "cache_hits": o.cache_hits, "steps_built": o.steps_built,
            "build_seconds": round(o.build_seconds, 4), "eval_seconds": round(o.eval_seconds, 4),
            "error": o.error, "traceback": o.traceback, "path": o.path,
        }
        self.cache_hits += o.cache_hits
        if o.model_bytes is not None and o.path and not Path(o.path).is_file():
            rec["path"] = str(_store_bytes(Path(self.settings.cache_dir), cand, o.model_bytes))
        if o.status == "ok":
            base = self.baseline or rec
            rec["drop"] = base["accuracy"] - o.accuracy
            rec["feasible"] = bool(rec["drop"] <= self.max_drop + 1e-12)
            rec["size_ratio"] = o.size_bytes / base["size_bytes"]
            rec["latency_ms"], rec["latency_ratio"] = self.lane.measure(rec["path"])
        else:
            rec["feasible"] = False
            if o.proxy is not None:
                rec["drop"] = None
        return rec

    def loop(self, strategy, study, trials: int, seeds: Sequence[str] = (),
             references: Sequence[dict] = ()) -> list[dict]:
        from optuna.trial import TrialState

        memo: dict[str, dict] = {}
        found: list[dict] = []
        for t in study.get_trials(deepcopy=False):
            rec = t.user_attrs.get("record")
            if rec is not None and t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED):
                memo.setdefault(rec["key"], rec)
                found.append(rec)
        strategy.known = lambda key: key in memo
        display = _Display(self.progress, trials, len(found))
        with display:
            self._seed(study, seeds, references, found, memo, trials, display)
            while len(found) < trials:
                proposals = strategy.propose(min(self.runner.jobs, trials - len(found)))
                if not proposals:
                    break
                fresh = []
                for cand, trial in proposals:
                    rec = memo.get(cand.key())
                    if rec is None:
                        fresh.append((cand, trial))
                    elif trial is None:  # a replay after --resume: known, not a new trial
                        strategy.observe(cand, rec)
                    else:  # the space is exhausted (re-sampling found nothing new): same result, new trial
                        rec = {**rec, "duplicate_of": rec["number"], "seeded": None}
                        self._store(study, trial, rec, len(found))
                        found.append(rec)
                        display.update(found, self)
                        strategy.observe(cand, rec)
                        self._notify(rec)
                if not fresh:
                    continue
                for (cand, trial), rec in zip(fresh, self.evaluate([(c, "trial") for c, _ in fresh])):
                    self._store(study, trial, rec, len(found))
                    memo[rec["key"]] = rec
                    found.append(rec)
                    strategy.observe(cand, rec)
                    display.update(found, self)
                    self._notify(rec)
        return found

    def _seed(self, study, seeds, references, found, memo, trials, display) -> None:
        """The seeded recipes as the first trials (each once, also after --resume); a recipe
        already measured as a reference row is not built again: its record becomes the trial."""
        done = {r.get("seeded") for r in found}
        by_name = {r["pipeline"]: r for r in references}
        todo = [name for name in seeds if name not in done][: max(0, trials - len(found))]
        fresh = [Candidate.from_spec([n]) for n in todo if n not in by_name]
        measured = dict(zip([str(c) for c in fresh], self.evaluate([(c, "trial") for c in fresh])))
        for name in todo:
            rec = {**(by_name.get(name) or measured[name]), "kind": "trial", "seeded": name}
            self._store(study, None, rec, len(found))
            memo.setdefault(rec["key"], rec)
            found.append(rec)
            display.update(found, self)
            self._notify(rec)

    def _notify(self, rec: dict) -> None:
        if self.on_trial is not None:
            self.on_trial(rec)

    def _store(self, study, trial, rec: dict, number: int) -> None:
        import optuna
        from optuna.trial import TrialState

        rec["number"] = number
        # the accuracy budget, as optuna's constraint (feasible when <= 0)
        constraint = rec["drop"] - self.max_drop if rec.get("drop") is not None else 1.0
        state = {"ok": TrialState.COMPLETE, "pruned": TrialState.PRUNED}.get(rec["status"], TrialState.FAIL)
        values = obj.values(rec, self.objectives) if state == TrialState.COMPLETE else None
        if trial is None:
            study.add_trial(optuna.trial.create_trial(state=state, values=values, user_attrs={"record": _jsonable(rec)},
                                                      constraints={"max_drop": constraint}))
            return
        trial.set_user_attr("record", _jsonable(rec))
        trial.set_constraint("max_drop", constraint)
        study.tell(trial, values, state=state)


def _jsonable(rec: dict) -> dict:
    return json.loads(json.dumps(rec, default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))


def _store_bytes(cache_dir: Path, cand: Candidate, data: bytes) -> Path:
    from slimgraph.search.cache import _atomic_write

    path = cache_dir / "remote" / f"{cand.key()}.onnx"
    _atomic_write(path, data)
    return path


class _Display:
    """A rich progress line: trials done, best score so far, cache hits."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("search"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"))
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self.total, completed=self.done)
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, found: list[dict], driver: _Driver) -> None:
        if self._bar is None:
            return
        scores = [(obj.score(r, driver.objectives), r) for r in found]
        best = max(scores, key=lambda s: s[0], default=(-math.inf, None))
        text = "best: none within budget yet" if best[1] is None or best[0] == -math.inf else (
            f"best: {best[1]['pipeline'][:60]} acc {best[1]['accuracy']:.4f} score {best[0]:.2f}")
        failed = sum(r["status"] == "failed" for r in found)
        self._bar.update(self._task, completed=len(found),
                         description=f"{text} | failed {failed} | cache hits {driver.cache_hits}")
