"""Pipelines: what to run, written three ways and parsed into one structure.

1. A one-line string: `cleanup,fold_batchnorm,prune.structured(ratio=0.3)`.
   Items are separated by top-level commas; arguments are `key=value` with YAML values.
2. YAML (a recipe file or a built-in recipe name such as `cleanup`):

       passes:
         - fixed_point:                # repeat until no pass modifies the model
             max_iterations: 8
             passes: [lift_constants, fold_constants, cse, eliminate_dead]
         - fold_batchnorm
         - prune.structured: {ratio: 0.3}

3. Python: a list of `Pass` instances, names, `{name: config}` dicts or `FixedPoint`s.

Names resolve to registered passes first, then to built-in recipes (expanded inline).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.resources
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import yaml

from slimgraph.errors import PipelineError
from slimgraph.passes.base import Pass, get_pass, registry


@dataclasses.dataclass
class FixedPoint:
    """Run `steps` repeatedly until none of them modifies the model."""

    steps: list[Step]
    max_iterations: int = 8

    def spec(self) -> dict:
        return {"fixed_point": {"max_iterations": self.max_iterations, "passes": [_spec(s) for s in self.steps]}}


Step = Union[Pass, FixedPoint]


def _spec(step: Step) -> Any:
    if isinstance(step, FixedPoint):
        return step.spec()
    (name, cfg), = step.spec().items()
    return {name: cfg} if cfg else name


@dataclasses.dataclass
class Pipeline:
    steps: list[Step]

    def passes(self) -> Iterator[Pass]:
        """Every pass, in order, fixed-point groups flattened."""
        for step in self.steps:
            if isinstance(step, FixedPoint):
                yield from Pipeline(step.steps).passes()
            else:
                yield step

    def spec(self) -> list:
        return [_spec(s) for s in self.steps]

    def to_yaml(self) -> str:
        return yaml.safe_dump({"passes": self.spec()}, sort_keys=False)

    def __str__(self) -> str:
        return ",".join(repr(p) for p in self.passes())


# --- recipes --------------------------------------------------------------------------------
def recipe_names() -> list[str]:
    folder = importlib.resources.files("slimgraph.recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_text(name: str) -> str:
    return (importlib.resources.files("slimgraph.recipes") / f"{name}.yaml").read_text()


def _recipe_steps(name: str, seen: tuple[str, ...]) -> list[Step]:
    if name in seen:
        raise PipelineError(f"recipe {name!r} includes itself: {' -> '.join((*seen, name))}")
    doc = yaml.safe_load(recipe_text(name))
    return _parse_list(doc.get("passes", []), f"recipe {name!r}", (*seen, name))


# --- parsing --------------------------------------------------------------------------------
def parse(spec: Any) -> Pipeline:
    """Parse any accepted pipeline form (see module docstring) into a `Pipeline`."""
    if isinstance(spec, Pipeline):
        return spec
    if isinstance(spec, Pass):
        return Pipeline([spec])
    if isinstance(spec, (str, Path)):
        text = str(spec).strip()
        if text.endswith((".yaml", ".yml")) or (isinstance(spec, Path) and spec.exists()):
            return parse_yaml_file(Path(text))
        return Pipeline(parse_string(text))
    if isinstance(spec, Sequence):
        return Pipeline(_parse_list(list(spec), "pipeline", ()))
    raise PipelineError(f"cannot read a pipeline from a {type(spec).__name__}")


def read_yaml(path: Path, what: str, error: type[Exception] = PipelineError):
    """The document in a YAML file; `error` naming the file if it is missing or not YAML."""
    if not path.is_file():
        raise error(f"{path}: {what} file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None


def parse_yaml_file(path: Path) -> Pipeline:
    doc = read_yaml(path, "recipe")
    if not isinstance(doc, dict) or not isinstance(doc.get("passes"), list):
        raise PipelineError(f"{path}: a recipe is a mapping with a `passes:` list")
    return Pipeline(_parse_list(doc["passes"], str(path), ()))


_ITEM = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(?:\((.*)\))?\s*$", re.S)


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, start, quote = [], 0, 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"pipeline {text!r}: unbalanced ')' at character {i + 1}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0 or quote:
        raise PipelineError(f"pipeline {text!r}: unclosed bracket or quote")
    parts.append(text[start:])
    return parts


def parse_string(text: str, seen: tuple[str, ...] = ()) -> list[Step]:
    if not text.strip():
        raise PipelineError("empty pipeline: give pass or recipe names, e.g. 'cleanup,fuse'")
    steps: list[Step] = []
    for item in _split_top_level(text):
        m = _ITEM.match(item)
        if not m:
            raise PipelineError(
                f"pipeline item {item.strip()!r} is not `name` or `name(key=value, ...)`"
            )
        name, args = m.group(1), m.group(2)
        config = _parse_args(name, args) if args and args.strip() else {}
        steps.extend(_resolve(name, config, f"pipeline {text!r}", seen))
    return steps


def _parse_args(name: str, args: str) -> dict[str, Any]:
    config = {}
    for arg in _split_top_level(args):
        if "=" not in arg:
            raise PipelineError(f"{name}({args}): argument {arg.strip()!r} is not key=value")
        key, value = arg.split("=", 1)
        try:
            config[key.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            raise PipelineError(f"{name}({args}): cannot read the value of {key.strip()!r}") from None
    return config


def _parse_list(items: list, where: str, seen: tuple[str, ...]) -> list[Step]:
    steps: list[Step] = []
    for item in items:
        if isinstance(item, (Pass, FixedPoint)):
            steps.append(item)
        elif isinstance(item, str):
            steps.extend(parse_string(item, seen) if "(" in item or "," in item else _resolve(item, {}, where, seen))
        elif isinstance(item, dict) and len(item) == 1:
            (name, body), = item.items()
            if name == "fixed_point":
                body = {"passes": body} if isinstance(body, list) else (body or {})
                sub = _parse_list(body.get("passes", []), where, seen)
                steps.append(FixedPoint(sub, int(body.get("max_iterations", 8))))
            else:
                if body is not None and not isinstance(body, dict):
                    raise PipelineError(f"{where}: config of {name!r} must be a mapping, got {body!r}")
                steps.extend(_resolve(name, body or {}, where, seen))
        else:
            raise PipelineError(f"{where}: cannot read pipeline item {item!r}")
    return steps


def _resolve(name: str, config: dict, where: str, seen: tuple[str, ...]) -> list[Step]:
    if name in registry():
        return [get_pass(name)(config)]
    if name in recipe_names():
        if config:
            raise PipelineError(f"{where}: {name!r} is a recipe and takes no arguments")
        return _recipe_steps(name, seen)
    try:
        get_pass(name)  # raises with "did you mean" suggestions
    except PipelineError as e:
        raise PipelineError(f"{where}: {e} (recipes: {', '.join(recipe_names())})") from None
    raise AssertionError("unreachable")


# --- order constraints ----------------------------------------------------------------------
def matches_order(name: str, patterns: Sequence[str]) -> bool:
    """Whether pass `name` is named by an `after`/`before` declaration: it matches one of
    the fnmatch patterns and none of the `!`-prefixed exclusions (`("*", "!pack.*")`: every
    pass but the pack passes)."""
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    return (any(fnmatch.fnmatchcase(name, p) for p in include)
            and not any(fnmatch.fnmatchcase(name, p) for p in exclude))


def order_violations(passes: Sequence[Pass]) -> list[str]:
    """Every pair of passes that breaks a declared `after`/`before` constraint.

    A pass that also ran before `early` does not count when it runs again after it: recipes
    repeat cleanup and fusion (`cluster.kmeans` after `fuse`, then the `int8` recipe's own
    `fuse`), and a second BatchNorm folding finds nothing left to fold."""
    problems = []
    for i, early in enumerate(passes):
        ran_before = {p.name for p in passes[:i]}
        for late in passes[i + 1:]:
            if late.name in ran_before:
                continue
            if matches_order(late.name, early.after):
                problems.append(f"{early.name!r} must run after {late.name!r}")
            if matches_order(early.name, late.before):
                problems.append(f"{late.name!r} must run before {early.name!r}")
    return problems


def order_graph():
    """The registry's order constraints as a networkx DiGraph (edge a->b: a before b).
    The search enumerates legal orders from it."""
    import networkx as nx

    reg = registry()
    g = nx.DiGraph()
    g.add_nodes_from(reg)
    for name, cls in reg.items():
        for other in reg:
            if other == name:
                continue
            if matches_order(other, cls.after):
                g.add_edge(other, name)
            if matches_order(other, cls.before):
                g.add_edge(name, other)
    return g
