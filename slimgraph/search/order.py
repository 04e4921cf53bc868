"""Legal orders: the passes' declared `after`/`before` constraints as a networkx DAG.

Between two items of a space (a pass or a recipe, expanded to its passes) there is an edge
a -> b when running b first breaks a declared constraint and running a first does not
(`pipeline.order_violations`, the same check the pass manager makes before it runs
anything). A pass may also declare pairs known to always fail (a contract the later pass
cannot keep): `incompatible_after` (fnmatch patterns of passes it may not follow, e.g.
`quantize.weight_only` after `cluster.kmeans`: int4 blocks cannot hold the codebooks) and
`incompatible_before` (passes that may not follow it). Either may be a property of the
pass's config; `violations` reads the default configs,
`drop_conflicts` the sampled ones, so the search never proposes such a pipeline. A stage
that searches the order sorts its chosen items topologically in this
graph, the sampled permutation only breaking ties, so an illegal order is never built; an
item that cannot follow the ones chosen before it (in any order) is dropped.
"""

from __future__ import annotations

import functools
import json

import networkx as nx

from slimgraph.passes.base import Pass
from slimgraph.passes.pipeline import matches_order, order_violations, parse
from slimgraph.search.space import Item, Space, SpaceError, Stage


@functools.lru_cache(maxsize=None)
def _expanded(name: str) -> tuple[Pass, ...]:
    """The passes an item name runs (a recipe expands; configs do not affect order rules)."""
    return tuple(parse(name).passes())


def legal(names: list[str] | tuple[str, ...]) -> bool:
    return not violations(tuple(names))


@functools.lru_cache(maxsize=4096)
def violations(names: tuple[str, ...]) -> tuple[str, ...]:
    passes = [p for n in names for p in _expanded(n)]
    return tuple(order_violations(passes)) + tuple(incompatibilities(passes))


def incompatibilities(passes: list[Pass]) -> list[str]:
    """Pairs a pass declares as always failing: it after one its `incompatible_after`
    names, or one its `incompatible_before` names after it."""
    problems = []
    for i, late in enumerate(passes):
        after = tuple(getattr(late, "incompatible_after", ()))
        for early in passes[:i]:
            if after and matches_order(early.name, after):
                problems.append(f"{late.name!r} cannot run after {early.name!r} (it declares incompatible_after)")
            before = tuple(getattr(early, "incompatible_before", ()))
            if before and matches_order(late.name, before):
                problems.append(f"{late.name!r} cannot run after {early.name!r} ({early.name!r} declares "
                                "incompatible_before)")
    return problems


@functools.lru_cache(maxsize=4096)
def _configured(step: str) -> tuple[Pass, ...]:
    """The passes of one step (canonical JSON of `{name: config}`) with that config."""
    return tuple(parse([json.loads(step)]).passes())


def item_graph(items: list[Item] | tuple[Item, ...]) -> nx.DiGraph:
    """Edge a -> b: a must run before b. Pairs legal in neither order get `conflict` edges
    in the graph's `conflicts` attribute (they can never be in one pipeline)."""
    g = nx.DiGraph()
    g.add_nodes_from(i.name for i in items)
    g.graph["conflicts"] = set()
    for i, a in enumerate(items):
        for b in items[i + 1:]:
            ab, ba = legal((a.name, b.name)), legal((b.name, a.name))
            if ab and not ba:
                g.add_edge(a.name, b.name)
            elif ba and not ab:
                g.add_edge(b.name, a.name)
            elif not ab and not ba:
                g.graph["conflicts"].add(frozenset((a.name, b.name)))
    return g


def arrange(stage: Stage, picked: list[Item], order: tuple[str, ...] | None) -> list[Item]:
    """The chosen items of a stage in a legal order; `order` (a permutation of the stage's
    item names) breaks ties, else the listed order does."""
    if len(picked) < 2 or stage.pick != "any":
        return picked
    rank = {n: k for k, n in enumerate(order or [i.name for i in stage.items])}
    g = item_graph(picked)
    by_name = {i.name: i for i in picked}
    return [by_name[n] for n in nx.lexicographical_topological_sort(g, key=lambda n: rank[n])]


def drop_conflicts(chosen: list[tuple[Item, dict]]) -> list[tuple[Item, dict]]:
    """Keep each item only if it may follow the items kept before it (with their configs)."""
    kept: list[tuple[Item, dict]] = []
    for item, config in chosen:
        if legal(tuple(i.name for i, _ in kept) + (item.name,)) and not incompatibilities(
                [p for i, c in [*kept, (item, config)] for p in _configured(_step_json(i.name, c))]):
            kept.append((item, config))
    return kept


def _step_json(name: str, config: dict) -> str:
    return json.dumps({name: config} if config else name, sort_keys=True, default=str)


def check_space(space: Space) -> None:
    """Raise `SpaceError` when the space is contradictory: a `pick: all` stage (or the fixed
    items together) in an illegal order, a permuted stage whose constraints form a cycle,
    or optional items none of which can ever join the fixed ones."""
    fixed: list[str] = []
    for stage in space.stages:
        if stage.pick == "all":
            names = [i.name for i in stage.items]
            bad = violations(tuple(fixed + names))
            if bad:
                raise SpaceError(f"{space.source}: contradictory space: stage {stage.name!r} always runs "
                                 f"{names} after {fixed or 'nothing'}, but {bad[0]}")
            fixed += names
    for stage in space.stages:
        if stage.pick != "any":
            continue
        g = item_graph(stage.items)
        if not nx.is_directed_acyclic_graph(g):
            cycle = " -> ".join(a for a, _ in nx.find_cycle(g))
            raise SpaceError(f"{space.source}: contradictory space: the order constraints of stage "
                             f"{stage.name!r} form a cycle ({cycle})")
    optional, placeable = [], []
    for k, stage in enumerate(space.stages):
        if stage.pick == "all":
            continue
        before = [i.name for s in space.stages[:k] if s.pick == "all" for i in s.items]
        after = [i.name for s in space.stages[k + 1:] if s.pick == "all" for i in s.items]
        for item in stage.items:
            optional.append(item.name)
            if legal((*before, item.name, *after)):
                placeable.append(item.name)
    if optional and not placeable:
        raise SpaceError(f"{space.source}: contradictory space: none of {optional} may run where its stage puts "
                         f"it among the fixed passes {fixed}; only the unmodified model would be tried")
    if not optional and not fixed:
        raise SpaceError(f"{space.source}: empty space: no stage offers a pass")
