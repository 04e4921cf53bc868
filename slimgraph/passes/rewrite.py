"""Pattern rewriting for slimgraph's passes: a thin layer over onnxscript's rewriter.

A rule is **pattern -> check -> rewrite**, as in onnxscript:

- `pattern(op, x, w, ...)` builds an onnxscript pattern; its parameters are pattern
  variables bound by the match.
- `check(m, **bindings)` returns None to accept the match, or a string saying why the
  rule does not fire ("weight is shared with another node"). Plain strings are counted
  in the pass's `skipped` statistics; `NoMatch(...)` means "not this pattern after all"
  (a constant with another value) and is only logged. `m` is onnxscript's `MatchContext`
  (`m.root`, `m.nodes`, `m.model`).
- `rewrite(op, **bindings)` builds the replacement with `op` (onnxscript's builder);
  `op.initializer(array, name)` takes numpy arrays and always picks a fresh name.

Matching is onnxscript's. What this module adds:

1. The removability test (every intermediate value is used only inside the match) runs
   after the rule's check, so "an intermediate value is used outside the pattern" is a
   reported reason, not a silent no-match.
2. Commutative operands are put in a canonical order before matching (constants second,
   otherwise the operand farther from the graph inputs second) and put back afterwards
   on every node no rule consumed. A pattern is written once, in that order, instead of
   once per operand order (a GELU pattern has 2^8 of them). `Rule.commute=True` also
   tries onnxscript's commuted variants, for small patterns whose non-constant parameter
   (a bias that is a graph input, say) should be reported rather than missed.
3. New nodes are tagged with the rule's name (`Model.annotation(node, "rule")`, plus
   onnxscript's own tag); new initializers never overwrite existing ones.
4. Rules run to a fixed point (bounded), so one fusion can enable another.
5. Initializers and Constant nodes that a rewrite left unused are dropped (e.g. a Conv
   weight replaced by its BatchNorm-folded copy, the 0.5 of a fused GELU); those that
   were unused before the pass are left alone.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnxscript.rewriter import MatchContext, pattern

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassResult

logger = logging.getLogger("slimgraph.passes.rewrite")

#: Binary ops whose operands are put in canonical order before matching.
COMMUTATIVE_OPS = frozenset({("", "Add"), ("", "Mul")})
#: Rounds of rewriting before giving up on a fixed point.
MAX_ROUNDS = 8
#: Reason recorded when a matched intermediate value is used outside the match.
USED_OUTSIDE = "an intermediate value is used outside the pattern"


class NoMatch(str):
    """A check result meaning "not this pattern after all": logged, not counted."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rewrite: `pattern` (onnxscript), `check` (None or a reason), `rewrite`."""

    name: str
    pattern: Callable[..., Any]
    rewrite: Callable[..., Any]
    check: Callable[..., str | None] | None = None
    #: Also try the input orders of Add/Mul nodes that canonical order does not fix.
    commute: bool = False
    #: Whether a firing counts in the pass's headline number (helper rules say False).
    counts: bool = True


@dataclasses.dataclass
class RewriteStats:
    applied: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    counted: int = 0

    @property
    def total(self) -> int:
        return sum(self.applied.values())

    def as_dict(self, counter: str) -> dict[str, Any]:
        return {counter: self.counted, "rules": dict(self.applied), "skipped": dict(self.skipped)}


# --- helpers for checks ---------------------------------------------------------------------
def constant(value: ir.Value | None) -> np.ndarray | None:
    """The array of a value that is a true constant (an initializer that is not also a graph
    input, or a Constant's output), else None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def not_constant(value: ir.Value, what: str) -> str:
    """Why `value` cannot serve as a constant parameter. A value computed by a node is an
    activation (a residual Add, an attention MatMul): not this pattern, so NoMatch. A graph
    input (or an initializer that is one) is a parameter the rule cannot trust: a reason."""
    if value.producer() is not None:
        return NoMatch(f"{what} is computed by a node")
    return f"{what} is not a constant"


def used_outside(value: ir.Value, nodes: Sequence[ir.Node]) -> ir.Node | None:
    """A node outside `nodes` that reads `value`, if any."""
    inside = set(nodes)
    for use in value.uses():
        if use.node not in inside:
            return use.node
    return None


def rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return value.shape.rank()


def static_dims(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of a value when every dimension is a known integer."""
    if value is None or value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(value.shape)


def dtype_of(*values: ir.Value | None) -> ir.DataType | None:
    """The first known element type among values the op's type constraint makes equal."""
    for v in values:
        if v is not None and v.dtype is not None:
            return v.dtype
    return None


def expect_scalars(like: ir.Value, **expected: tuple[ir.Value | None, float]) -> str | None:
    """Check one-element constants of a pattern: `name=(value, expected_number)`.

    NoMatch when one is not a one-element constant close to its number (1e-5 relative);
    a reason when it is, but has rank > 0 and might broadcast `like` to a bigger shape
    (the rank of `like` is unknown or smaller).
    """
    for name, (value, want) in expected.items():
        array = constant(value)
        if array is None or array.size != 1:
            return NoMatch(f"{name} is not a one-element constant")
        if not math.isclose(float(array.reshape(())), want, rel_tol=1e-5, abs_tol=1e-12):
            return NoMatch(f"{name} is {float(array.reshape(()))}, not {want}")
        if array.ndim > 0 and (rank(like) is None or rank(like) < array.ndim):
            return (f"one-element constant of rank {array.ndim} might raise the output's rank "
                    "(run infer_shapes first)")
    return None


# --- canonical operand order ------------------------------------------------------------------
def _graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    yield graph
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value


def _canonicalize(graph: ir.Graph, swapped: set[ir.Node]) -> None:
    """Put the operands of commutative nodes in canonical order; toggle them in `swapped`.

    Key of an operand: constants last, then by depth (longest path from the graph inputs).
    Ties keep their order. Only input order changes, so the graph computes the same thing.
    """
    depth: dict[ir.Value, int] = {}

    def key(v: ir.Value) -> tuple[int, int]:
        return (1, 0) if v.const_value is not None else (0, depth.get(v, 0))

    for node in ir.traversal.RecursiveGraphIterator(graph):
        d = 1 + max((depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        for out in node.outputs:
            depth[out] = d
        if (node.domain, node.op_type) not in COMMUTATIVE_OPS or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if a is not None and b is not None and key(a) > key(b):
            _swap(node)
            swapped.symmetric_difference_update({node})


def _swap(node: ir.Node) -> None:
    a, b = node.inputs
    node.replace_input_with(0, b)
    node.replace_input_with(1, a)


# --- the run ----------------------------------------------------------------------------------
class _Builder:
    """onnxscript's builder, with `initializer` taking arrays and choosing fresh names."""

    def __init__(self, tape: Any, run: _Run):
        self._tape = tape
        self._run = run

    def initializer(self, array: np.ndarray | ir.TensorProtocol, name: str) -> ir.Value:
        tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(np.asarray(array, order="C"))  # keeps 0-d scalars 0-d
        return self._tape.initializer(tensor, name=self._run.fresh_name(name))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tape, name)


class _Run:
    """Per-run state: skip reasons, counts, names given out. Built fresh for each pass run."""

    def __init__(self, model: Model, owner: str):
        self.model = model
        self.owner = owner
        # A rule that matches its own output would rewrite forever inside one traversal.
        self.limit = 4 * sum(1 for _ in model.nodes(recursive=True)) + 100
        self.stats = RewriteStats()
        self.skips: dict[tuple[str, ir.Node], str] = {}
        self.names: set[str] | None = None  # every value name, gathered on first need
        self.node_names: set[str] | None = None
        self.root: ir.Node | None = None  # the match being rewritten (set by its condition)
        self.matched: list[ir.Node] = []

    def fresh_name(self, base: str) -> str:
        if self.names is None:
            graphs = list(_graphs(self.model.graph))
            self.names = {v.name for g in graphs for v in [*g.inputs, *g.initializers.values()]}
            self.names |= {v.name for g in graphs for n in g for v in n.outputs if v.name}
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def name_nodes(self, nodes: Sequence[ir.Node], rule: str) -> None:
        """Name new nodes and their outputs after the matched nodes they replace (a new node
        takes the name of a matched node of its op type: the Conv that absorbed a BatchNorm
        stays `conv1`; else the match root's name), not by onnx-ir's per-process counters
        (`node_Conv_20`): the same pipeline then gives the same bytes whether its prefix was
        just computed or loaded from the search cache."""
        if self.node_names is None:
            self.node_names = {n.name for g in _graphs(self.model.graph) for n in g if n.name}
        matched = [n for n in self.matched if n.name]  # removed by this rewrite: names free
        base = (self.root.name if self.root is not None and self.root.name else "") or rule
        for i, node in enumerate(nodes):
            if not node.name:
                same = next((n for n in matched if n.op_type == node.op_type), None)
                if same is not None:
                    matched.remove(same)
                    name = same.name
                elif i == len(nodes) - 1 and all(n.name != base for n in nodes):
                    name = base
                else:
                    name, k = f"{base}_{i}", 1
                    while name in self.node_names:
                        name, k = f"{base}_{i}_{k}", k + 1
                node.name = name
                self.node_names.add(name)
            for j, value in enumerate(node.outputs):
                if not value.name:
                    value.name = self.fresh_name(f"{node.name}_out{j}" if j else f"{node.name}_out")

    def compile(self, rule: Rule) -> list[pattern.RewriteRule]:
        def condition(context: MatchContext, **bindings: Any) -> pattern.MatchResult:
            if not isinstance(context.graph_or_function, ir.Graph):
                # onnxscript cannot add initializers inside model-local functions.
                return pattern.MatchResult().fail("inside a model-local function")
            reason = None if rule.check is None else rule.check(context, **bindings)
            if reason is None:
                reason = _removability(context)
            if reason is None:
                self.root, self.matched = context.root, list(context.nodes)
                return pattern.MatchResult()
            where = context.root.name or context.root.op_type
            if isinstance(reason, NoMatch):
                logger.debug("%s: no match at %s: %s", rule.name, where, reason)
            else:
                logger.debug("%s: skipped at %s: %s", rule.name, where, reason)
                self.skips[(rule.name, context.root)] = reason
            return pattern.MatchResult().fail(str(reason))

        def replacement(op: Any, **bindings: Any) -> Any:
            outputs = rule.rewrite(_Builder(op, self), **bindings)
            if outputs is None:
                return None
            for node in op.nodes:
                Model.annotate(node, "rule", rule.name)
            self.name_nodes(op.nodes, rule.name)
            self.stats.applied[rule.name] += 1
            if self.stats.total > self.limit:
                raise PassError(self.owner, f"rule {rule.name!r} fired {self.stats.total} times, more than "
                                f"the model can hold; it matches its own output (a bug in the rule)")
            self.stats.counted += int(rule.counts)
            return outputs

        compiled = pattern.RewriteRule(
            rule.pattern, replacement, condition, matcher=_Matcher, name=rule.name
        )
        return list(compiled.commute()) if rule.commute else [compiled]


class _Matcher(pattern.SimplePatternMatcher):
    """onnxscript's matcher, with two changes: a node whose op differs from the pattern's
    root is rejected before any matching work (most nodes, for most rules), and the
    removability test is left to `_removability`, which explains itself. Matched nodes
    are still removed on rewrite."""

    def __init__(self, graph_pattern) -> None:
        super().__init__(graph_pattern)
        root = graph_pattern.output_node.op_identifier() if graph_pattern.has_single_output_node else None
        self._root = root[:2] if root is not None else None

    def match(self, model, graph_or_function, node, *, verbose=0, remove_nodes=True, tracer=None):
        if self._root is not None and (node.domain, node.op_type) != self._root:
            return pattern.MatchResult().fail("root op differs")
        return super().match(model, graph_or_function, node, verbose=verbose, remove_nodes=False,
                             tracer=tracer)


def _removability(context: MatchContext) -> str | None:
    outputs = set(context.output_values)
    for node in context.nodes:
        for value in node.outputs:
            if value in outputs:
                continue
            if value.is_graph_output() or used_outside(value, context.nodes) is not None:
                logger.debug("%s is used outside the match rooted at %s", value.name, context.root.name)
                return USED_OUTSIDE
    return None


def _constants(model: Model) -> Iterator[tuple[ir.Graph, ir.Value]]:
    """Every initializer and every Constant node's output, with its graph."""
    for g in _graphs(model.graph):
        yield from ((g, v) for v in g.initializers.values())
        yield from ((g, n.outputs[0]) for n in g if (n.domain, n.op_type) == ("", "Constant"))


def _unused(value: ir.Value) -> bool:
    return not value.uses() and not value.is_graph_output() and not value.is_graph_input()


def apply_rules(model: Model, rules: Sequence[Rule], *, owner: str = "rewrite") -> RewriteStats:
    """Apply `rules` to the model (in place) until none fires. See the module docstring.
    `owner` names the pass in errors."""
    run = _Run(model, owner)
    ruleset = pattern.RewriteRuleSet([r for rule in rules for r in run.compile(rule)])
    already_unused = {v for _, v in _constants(model) if _unused(v)}
    onnxscript.optimizer.basic_constant_propagation(model.graph)
    swapped: set[ir.Node] = set()
    try:
        for _ in range(MAX_ROUNDS):
            _canonicalize(model.graph, swapped)
            if ruleset.apply_to_model(model.ir) == 0:
                break
        else:
            logger.warning("rewrite rules still firing after %d rounds; stopping", MAX_ROUNDS)
    finally:
        for node in swapped:
            if node.graph is not None:
                _swap(node)
    if run.stats.total:
        _drop_orphaned_constants(model, already_unused)
    for (_, root), reason in run.skips.items():
        if root.graph is not None:  # a later rewrite did not consume it
            run.stats.skipped[reason] += 1
    return run.stats


def _drop_orphaned_constants(model: Model, already_unused: set[ir.Value]) -> None:
    """Remove initializers and Constant nodes that the rewrites left unused."""
    for graph, value in list(_constants(model)):
        if value in already_unused or not _unused(value):
            continue
        if value.producer() is not None:
            graph.remove(value.producer(), safe=True)
        else:
            del graph.initializers[value.name]


class RulePass(Pass, abc.ABC):
    """A pass made of rewrite rules. Subclasses build their rules per run in `rules`."""

    #: The headline statistic: how many rewrites the pass made ("fused", "folded").
    counter: ClassVar[str] = "fused"

    @abc.abstractmethod
    def rules(self, model: Model) -> list[Rule]:
        """The rules for this model (they may depend on its opset and on the config)."""

    def run(self, model, ctx) -> PassResult:
        stats = apply_rules(model, self.rules(model), owner=self.name)
        result = stats.as_dict(self.counter)
        if stats.total:
            logger.info("%s: %s", self.name, result)
        return PassResult(model, modified=stats.total > 0, stats=result)
