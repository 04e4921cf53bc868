"""Search strategies. Each proposes batches of candidates and observes their results:

- `exhaustive`: every candidate of the space in a fixed order, ranges on a small grid;
- `random`: uniform over the space's decisions (log-uniform on log ranges), no repeats;
- `greedy`: constructive: from the fixed stages alone, each round tries adding (or
  swapping in) every item and keeps the one that improves the score most; when no item
  helps, the next round retries them with fresh random configs;
- `tpe` / `nsga2`: optuna's samplers, multi-objective, with the accuracy budget as a
  constraint. Their trials live in the study (SQLite), so a resumed search continues
  from the stored history.

The other strategies are deterministic given the seed and what they observed, so on
`--resume` they replay: a proposal already stored is read back, not run again.
"""

from __future__ import annotations

import abc
import math
import random as _random
from typing import Any

from slimgraph.errors import PipelineError
from slimgraph.search.candidate import Candidate
from slimgraph.search.order import arrange, drop_conflicts
from slimgraph.search.space import Item, Param, Space

STRATEGIES = ("tpe", "nsga2", "random", "greedy", "exhaustive")


# --- choosers ------------------------------------------------------------------------------------
class RandomChooser:
    def __init__(self, rng: _random.Random):
        self.rng = rng

    def categorical(self, name: str, options: list) -> Any:
        return options[self.rng.randrange(len(options))]

    def integer(self, name: str, low: int, high: int, log: bool) -> int:
        if log and low > 0:
            return int(round(math.exp(self.rng.uniform(math.log(low), math.log(high)))))
        return self.rng.randint(low, high)

    def real(self, name: str, low: float, high: float, log: bool) -> float:
        if log and low > 0:
            return math.exp(self.rng.uniform(math.log(low), math.log(high)))
        return self.rng.uniform(low, high)


class OptunaChooser:
    def __init__(self, trial):
        self.trial = trial

    def categorical(self, name: str, options: list) -> Any:
        return self.trial.suggest_categorical(name, options)

    def integer(self, name: str, low: int, high: int, log: bool) -> int:
        return self.trial.suggest_int(name, low, high, log=log)

    def real(self, name: str, low: float, high: float, log: bool) -> float:
        return self.trial.suggest_float(name, low, high, log=log)


class ReplayChooser:
    """Takes the k-th option of each decision from `path` (0 past its end) and records how
    many options each decision had: an odometer over these enumerates a space."""

    def __init__(self, path: list[int], grid: int):
        self.path, self.grid, self.sizes = path, grid, []

    def _pick(self, options: list) -> Any:
        k = self.path[len(self.sizes)] if len(self.sizes) < len(self.path) else 0
        self.sizes.append(len(options))
        return options[k]

    def categorical(self, name, options):
        return self._pick(options)

    def integer(self, name, low, high, log):
        return self._pick(Param(name, "int", (low, high), log).grid(self.grid))

    def real(self, name, low, high, log):
        return self._pick(Param(name, "float", (low, high), log).grid(self.grid))


def to_candidate(chosen: list[tuple[Item, dict]]) -> Candidate:
    return Candidate.of([(item.name, config) for item, config in chosen])


# --- strategies ------------------------------------------------------------------------------------
class Strategy(abc.ABC):
    """propose(n) -> up to n (candidate, optuna trial or None); observe(candidate, record)."""

    uses_optuna = False

    @abc.abstractmethod
    def propose(self, n: int) -> list[tuple[Candidate, Any]]:
        """Up to n new candidates; an empty list when the strategy has nothing left."""

    def observe(self, candidate: Candidate, record: dict) -> None:
        pass


class OptunaStrategy(Strategy):
    """optuna's sampler proposes; a proposal of a pipeline already evaluated (`known`, set by
    the driver) or already in the batch is told back as failed and re-sampled, after
    `switch` repeats with optuna's random sampler; after `attempts` the space counts as
    exhausted and the repeat is returned (the driver then reuses its stored result)."""

    uses_optuna = True

    def __init__(self, space: Space, study, *, seed: int = 0, attempts: int = 50, switch: int = 5):
        self.space, self.study, self.seed = space, study, seed
        self.attempts, self.switch = attempts, switch
        self.resampled = 0

    def known(self, key: str) -> bool:  # replaced by the driver
        return False

    def propose(self, n):
        import optuna
        from optuna.trial import TrialState

        out, batch = [], set()
        for _ in range(n):
            for attempt in range(self.attempts):
                sampler = self.study.sampler
                if attempt >= self.switch:  # the model-based sampler keeps returning known points
                    self.study.sampler = optuna.samplers.RandomSampler(seed=self.seed + self.resampled)
                try:
                    trial = self.study.ask()
                    cand = to_candidate(self.space.sample(OptunaChooser(trial)))
                finally:
                    self.study.sampler = sampler
                key = cand.key()
                if (not self.known(key) and key not in batch) or attempt == self.attempts - 1:
                    break
                trial.set_user_attr("duplicate_of", key)
                self.study.tell(trial, state=TrialState.FAIL)
                self.resampled += 1
            batch.add(key)
            out.append((cand, trial))
        return out


class RandomStrategy(Strategy):
    def __init__(self, space: Space, seed: int = 0, attempts: int = 200):
        self.space, self.rng, self.attempts = space, _random.Random(seed), attempts
        self.seen: set[str] = set()

    def propose(self, n):
        out = []
        for _ in range(n):
            for _ in range(self.attempts):
                c = to_candidate(self.space.sample(RandomChooser(self.rng)))
                if c.key() not in self.seen:
                    self.seen.add(c.key())
                    out.append((c, None))
                    break
        return out


class ExhaustiveStrategy(Strategy):
    def __init__(self, space: Space, grid: int = 3):
        self.space, self.grid = space, grid
        self._gen = self._enumerate()
        self.seen: set[str] = set()

    def _enumerate(self):
        path: list[int] = []
        while True:
            chooser = ReplayChooser(path, self.grid)
            yield to_candidate(self.space.sample(chooser))
            idx = [path[i] if i < len(path) else 0 for i in range(len(chooser.sizes))]
            j = len(idx) - 1
            while j >= 0 and idx[j] + 1 >= chooser.sizes[j]:
                j -= 1
            if j < 0:
                return
            path = idx[:j] + [idx[j] + 1]

    def propose(self, n):
        out = []
        for c in self._gen:
            if c.key() not in self.seen:
                self.seen.add(c.key())
                out.append((c, None))
                if len(out) == n:
                    break
        return out


class MidChooser(RandomChooser):
    """The first option of a choice, the (geometric) middle of a range: a neutral first try."""

    def categorical(self, name, options):
        return options[0]

    def integer(self, name, low, high, log):
        return int(round(math.sqrt(low * high))) if log and low > 0 else (low + high) // 2

    def real(self, name, low, high, log):
        return math.sqrt(low * high) if log and low > 0 else (low + high) / 2


class GreedyStrategy(Strategy):
    """Add the item that improves the score most, one at a time (see module docstring)."""

    def __init__(self, space: Space, score, seed: int = 0):
        self.space, self.score, self.rng = space, score, _random.Random(seed)
        self.current: dict[str, tuple[Item, dict]] = {  # stage name -> chosen (fixed stages: all)
            f"{s.name}/{i.name}": (i, {}) for s in space.stages if s.pick == "all" for i in s.items
        }
        self.current_score: float | None = None
        self.round = 0
        self.queue: list[tuple[Candidate, dict]] = []
        self.pending: dict[str, dict] = {}
        self.results: list[tuple[float, dict]] = []
        self.seen: set[str] = set()
        self._start = True

    def _assemble(self, selection: dict[str, tuple[Item, dict]]) -> Candidate:
        chosen = []
        for stage in self.space.stages:
            picked = [v for k, v in selection.items() if k.split("/", 1)[0] == stage.name]
            items = arrange(stage, [i for i, _ in picked], None)
            configs = {i.name: c for i, c in picked}
            chosen += [(i, configs[i.name]) for i in items]
        return to_candidate(drop_conflicts(chosen))

    def _neighbours(self) -> list[tuple[Candidate, dict]]:
        out = []
        for stage in self.space.stages:
            if stage.pick == "all":
                continue
            for item in stage.items:
                key = f"{stage.name}/{item.name}"
                if key in self.current and self.round == 0:
                    continue
                chooser = MidChooser(self.rng) if self.round == 0 else RandomChooser(self.rng)
                sel = dict(self.current)
                if stage.pick == "one":
                    sel = {k: v for k, v in sel.items() if k.split("/", 1)[0] != stage.name}
                sel[key] = (item, item.sample_config(chooser))
                c = self._assemble(sel)
                if c.key() not in self.seen:
                    self.seen.add(c.key())
                    out.append((c, sel))
        return out

    def propose(self, n):
        if self._start:
            self._start = False
            c = self._assemble(self.current)
            self.seen.add(c.key())
            self.pending[c.key()] = dict(self.current)
            return [(c, None)]
        if not self.queue and not self.pending:
            self._advance()
            for _ in range(3):  # a round where every neighbour was already seen: try new configs
                if self.queue:
                    break
                self.round += 1
                self.queue = self._neighbours()
        batch, self.queue = self.queue[:n], self.queue[n:]
        for c, sel in batch:
            self.pending[c.key()] = sel
        return [(c, None) for c, _ in batch]

    def observe(self, candidate, record):
        sel = self.pending.pop(candidate.key(), None)
        if sel is None:
            return
        s = self.score(record)
        if self.current_score is None:
            self.current_score = s
            self.queue = self._neighbours()
            return
        self.results.append((s, sel))

    def _advance(self) -> None:
        if self.results:
            best_score, best_sel = max(self.results, key=lambda r: r[0])
            if best_score > self.current_score:
                self.current, self.current_score = best_sel, best_score
        self.results = []
        self.round += 1
        self.queue = self._neighbours()


def make_strategy(name: str, space: Space, *, study=None, score=None, seed: int = 0, grid: int = 3) -> Strategy:
    if name in ("tpe", "nsga2"):
        return OptunaStrategy(space, study, seed=seed)
    if name == "random":
        return RandomStrategy(space, seed)
    if name == "greedy":
        return GreedyStrategy(space, score, seed)
    if name == "exhaustive":
        return ExhaustiveStrategy(space, grid)
    raise PipelineError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")


def optuna_sampler(name: str, *, seed: int, trials: int):
    """TPE or NSGA-II sized for a short search; both read the accuracy budget from each
    trial's `max_drop` constraint (set by the driver)."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 4)),
                                          multivariate=True, group=True)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(16, trials // 4)))
