"""The search space: stages of passes (the order grammar) and each pass's config domains.

A space file (YAML) lists stages in the order they run; each stage offers items (a pass or
a recipe name) and says how many of them a candidate takes:

    stages:
      - name: cleanup
        pick: all                      # every item, in the listed order
        passes: {optimize: {}, upgrade_opset: {target: 21}}
      - name: structure
        pick: one                      # at most one item (skipped unless `optional: false`)
        passes:
          prune.structured: {ratio: {float: [0.1, 0.5]}, criterion: [l1, l2]}
          cluster.kmeans: {k: [8, 16, 32]}
      - name: packing
        pick: any                      # any subset; `permute: true` also searches the order
        passes: {pack.sparse: {}, pack.clusters: {}}

A parameter is a fixed value (`k: 16`), a list of choices (`k: [8, 16]`), a range
(`{int: [2, 64], log: true}` / `{float: [0.1, 0.5]}`), or `search` (the pass's declared
domain as it is). Narrowed domains must lie inside the declared ones. A parameter may be
conditional: `{float: [0.1, 0.5], when: {mode: macs}}` is only searched when `mode` is
`macs`. Order constraints come from the passes' declared `after`/`before` (see `order.py`):
candidates that would break one are never built.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Protocol


from slimgraph.errors import PipelineError
from slimgraph.passes.base import Pass, get_pass, registry, search_domains
from slimgraph.passes.pipeline import read_yaml, recipe_names

SPACES_DIR = Path(__file__).with_name("spaces")
PICKS = ("all", "one", "any")
SKIP = "skip"


class SpaceError(PipelineError):
    """The search space is empty, contradictory or names something unknown."""


class Chooser(Protocol):
    """Where a strategy's decisions come from (optuna trial, random generator, replay...)."""

    def categorical(self, name: str, options: list) -> Any: ...
    def integer(self, name: str, low: int, high: int, log: bool) -> int: ...
    def real(self, name: str, low: float, high: float, log: bool) -> float: ...


# --- parameters --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Param:
    """One searched (or fixed) config field of one item."""

    name: str
    kind: str  # "fixed" | "choice" | "int" | "float"
    values: tuple = ()  # fixed: (value,); choice: options; int/float: (low, high)
    log: bool = False
    when: tuple[tuple[str, Any], ...] = ()

    def active(self, config: dict) -> bool:
        return all(config.get(k) == v for k, v in self.when)

    def sample(self, chooser: Chooser, label: str) -> Any:
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return chooser.categorical(label, list(self.values))
        low, high = self.values
        if self.kind == "int":
            return int(chooser.integer(label, int(low), int(high), self.log))
        # 4 significant digits keep pipelines readable; the rounded value is the one run and recorded
        return float(f"{chooser.real(label, float(low), float(high), self.log):.4g}")

    def grid(self, points: int) -> list:
        """A finite version of the domain (exhaustive search): `points` values of a range."""
        if self.kind in ("fixed", "choice"):
            return list(self.values)
        low, high = self.values
        if points <= 1 or low == high:
            return [low]
        if self.log and low > 0:
            raw = [math.exp(math.log(low) + (math.log(high) - math.log(low)) * i / (points - 1)) for i in range(points)]
        else:
            raw = [low + (high - low) * i / (points - 1) for i in range(points)]
        if self.kind == "int":
            return sorted({int(round(v)) for v in raw})
        return [round(v, 6) for v in raw]


def _param(pass_cls: type[Pass], name: str, spec: Any, where: str) -> Param:
    fields = pass_cls.Config.model_fields
    if name not in fields:
        raise SpaceError(f"{where}: pass {pass_cls.name!r} has no config field {name!r} "
                         f"(fields: {', '.join(fields) or 'none'})")
    declared = search_domains(pass_cls.Config).get(name)
    when: tuple = ()
    if isinstance(spec, dict) and "when" in spec:
        spec = dict(spec)
        cond = spec.pop("when")
        if not isinstance(cond, dict) or any(k not in fields for k in cond):
            raise SpaceError(f"{where}: `when` of {name!r} must map config fields of {pass_cls.name!r} to values")
        when = tuple(sorted(cond.items()))
        if len(spec) == 1 and "value" in spec:
            spec = spec["value"]
    if spec == "search":
        if declared is None:
            raise SpaceError(f"{where}: {pass_cls.name}.{name} declares no search domain; give values or a range")
        spec = {k: v for k, v in declared.items()} if "choice" not in declared else list(declared["choice"])
    if isinstance(spec, list):
        if not spec:
            raise SpaceError(f"{where}: {pass_cls.name}.{name}: an empty list of choices")
        for v in spec:
            _check_inside(pass_cls, name, declared, v, where)
        return Param(name, "choice", tuple(spec), when=when)
    if isinstance(spec, dict):
        kinds = [k for k in ("int", "float") if k in spec]
        extra = set(spec) - {"int", "float", "log"}
        if len(kinds) != 1 or extra:
            raise SpaceError(f"{where}: {pass_cls.name}.{name}: a range is {{int: [lo, hi]}} or "
                             f"{{float: [lo, hi]}} (+ log: true), got {spec!r}")
        kind = kinds[0]
        bounds = spec[kind]
        if not (isinstance(bounds, list) and len(bounds) == 2 and bounds[0] <= bounds[1]):
            raise SpaceError(f"{where}: {pass_cls.name}.{name}: range bounds must be [low, high] with low <= high, "
                             f"got {bounds!r}")
        for v in bounds:
            _check_inside(pass_cls, name, declared, v, where)
        log = bool(spec.get("log", False))
        if log and bounds[0] <= 0:
            raise SpaceError(f"{where}: {pass_cls.name}.{name}: a log range needs low > 0, got {bounds!r}")
        return Param(name, kind, (bounds[0], bounds[1]), log=log, when=when)
    _check_inside(pass_cls, name, declared, spec, where)
    return Param(name, "fixed", (spec,), when=when)


def _check_inside(pass_cls: type[Pass], name: str, declared: dict | None, value: Any, where: str) -> None:
    """A narrowed domain must stay inside the pass's declared one (else it is contradictory)."""
    if declared is None:
        return
    label = f"{pass_cls.name}.{name}"
    if "choice" in declared:
        if value not in declared["choice"]:
            raise SpaceError(f"{where}: {label} = {value!r} is outside its declared choices {declared['choice']}")
        return
    kind = "int" if "int" in declared else "float"
    low, high = declared[kind]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise SpaceError(f"{where}: {label} = {value!r} is outside its declared range [{low}, {high}]")


# --- items and stages ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Item:
    """A pass (with its params) or a recipe (fixed) that a stage may put in a pipeline."""

    stage: str
    name: str
    params: tuple[Param, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.stage}.{self.name}"

    @property
    def is_recipe(self) -> bool:
        return self.name not in registry()

    def sample_config(self, chooser: Chooser) -> dict:
        config: dict[str, Any] = {}
        for p in self.params:  # conditions refer to earlier fields of the same item
            if p.active(config):
                config[p.name] = p.sample(chooser, f"{self.label}.{p.name}")
        return config

    def requires(self) -> tuple[str, ...]:
        if self.is_recipe:
            from slimgraph.passes.pipeline import parse

            return tuple({r for p in parse(self.name).passes() for r in p.requires})
        return get_pass(self.name).requires


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    pick: str
    items: tuple[Item, ...]
    optional: bool = True
    permute: bool = False


def _item(stage: str, name: str, params: Any, where: str) -> Item:
    if name in registry():
        cls = get_pass(name)
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise SpaceError(f"{where}: the params of {name!r} must be a mapping of config fields")
        return Item(stage, name, tuple(_param(cls, k, v, f"{where}: {name}") for k, v in params.items()))
    if name in recipe_names():
        if params:
            raise SpaceError(f"{where}: {name!r} is a recipe and takes no params")
        return Item(stage, name)
    try:
        get_pass(name)  # raises "unknown pass ... did you mean ..."
    except PipelineError as e:
        raise SpaceError(f"{where}: {e} (recipes: {', '.join(recipe_names())})") from None
    raise AssertionError("unreachable")


def _stage(doc: Any, index: int, where: str) -> Stage:
    if not isinstance(doc, dict) or "passes" not in doc:
        raise SpaceError(f"{where}: stage {index + 1} must be a mapping with `passes:`")
    name = str(doc.get("name", f"stage{index + 1}"))
    pick = doc.get("pick", "one")
    if pick not in PICKS:
        raise SpaceError(f"{where}: stage {name!r}: pick must be one of {PICKS}, got {pick!r}")
    passes = doc["passes"]
    if isinstance(passes, list):  # [a, {b: {...}}] is accepted too
        merged: dict = {}
        for entry in passes:
            merged.update(entry if isinstance(entry, dict) else {entry: {}})
        passes = merged
    if not isinstance(passes, dict) or not passes:
        raise SpaceError(f"{where}: stage {name!r} offers no passes")
    items = tuple(_item(name, str(k), v, f"{where}: stage {name!r}") for k, v in passes.items())
    permute = bool(doc.get("permute", False))
    if permute and pick != "any":
        raise SpaceError(f"{where}: stage {name!r}: `permute` needs pick: any")
    if permute and len(items) > 5:
        raise SpaceError(f"{where}: stage {name!r}: permuting {len(items)} passes is too many orders; "
                         "split the stage (at most 5 permuted passes)")
    return Stage(name, pick, items, optional=bool(doc.get("optional", True)), permute=permute)


# --- the space -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Space:
    stages: tuple[Stage, ...]
    source: str = "<space>"

    def items(self) -> list[Item]:
        return [i for s in self.stages for i in s.items]

    def sample(self, chooser: Chooser) -> list[tuple[Item, dict]]:
        """One candidate: (item, config) pairs in the order they will run (see `order.py`)."""
        from slimgraph.search.order import arrange

        chosen: list[tuple[Item, dict]] = []
        for stage in self.stages:
            picked, order = self._pick(stage, chooser)
            picked = arrange(stage, picked, order)
            chosen.extend((item, item.sample_config(chooser)) for item in picked)
        from slimgraph.search.order import drop_conflicts

        return drop_conflicts(chosen)

    @staticmethod
    def _pick(stage: Stage, chooser: Chooser) -> tuple[list[Item], tuple | None]:
        if stage.pick == "all":
            return list(stage.items), None
        if stage.pick == "one":
            options = [i.name for i in stage.items] + ([SKIP] if stage.optional else [])
            name = chooser.categorical(stage.name, options)
            return [i for i in stage.items if i.name == name], None
        picked = [i for i in stage.items if chooser.categorical(f"{stage.name}.{i.name}", [False, True])]
        order = None
        if stage.permute and len(picked) > 1:
            import itertools

            perms = [",".join(p) for p in itertools.permutations(i.name for i in stage.items)]
            order = tuple(chooser.categorical(f"{stage.name}.order", perms).split(","))
        return picked, order

    def filtered(self, available: set[str]) -> tuple[Space, list[str]]:
        """The space without items whose requirements (`data`, `labels`, `torch`) are missing."""
        dropped = []
        stages = []
        for s in self.stages:
            keep = tuple(i for i in s.items if set(i.requires()) <= available)
            dropped += [f"{i.name} (needs {', '.join(sorted(set(i.requires()) - available))})"
                        for i in s.items if i not in keep]
            if keep:
                stages.append(dataclasses.replace(s, items=keep))
        return Space(tuple(stages), self.source), dropped


def parse_space(doc: Any, where: str = "<space>") -> Space:
    """A `Space` from a parsed YAML document (see module docstring); checks everything."""
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list):
        raise SpaceError(f"{where}: a search space is a mapping with a `stages:` list")
    if not doc["stages"]:
        raise SpaceError(f"{where}: the search space has no stages: nothing to search")
    stages = tuple(_stage(s, i, where) for i, s in enumerate(doc["stages"]))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise SpaceError(f"{where}: stage names must be unique, got {names}")
    space = Space(stages, where)
    from slimgraph.search.order import check_space

    check_space(space)
    return space


def load_space(source: str | Path | dict | None = None) -> Space:
    """The built-in default space, a space file, or a space given as a dict."""
    if isinstance(source, dict):
        return parse_space(source, "<space dict>")
    path = SPACES_DIR / "default.yaml" if source is None else Path(source)
    if source is not None and not path.is_file() and (SPACES_DIR / f"{source}.yaml").is_file():
        path = SPACES_DIR / f"{source}.yaml"
    return parse_space(read_yaml(path, "search space", SpaceError), str(path))
