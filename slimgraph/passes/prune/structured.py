"""prune.structured: remove whole channels (filters), physically shrinking the graph.

1. Constants are folded and shapes inferred, so the channel analysis sees static weights.
2. `channels.analyze` couples channels that must be removed together into groups; groups
   it cannot prove safe are left whole and listed (warning and `stats["unsafe"]`).
3. Groups touching an `exclude`d layer (node name, op type or torch module path) are left
   whole; with `layers`, only groups whose producers match are pruned.
4. Each group's channels are scored (`criterion`, see `_importance`); the number kept per
   group comes from `mode`:
   - uniform: `ratio` of every group's channels removed;
   - global: `ratio` of all channels removed, lowest normalised scores first, with at
     least `min_keep` of each group kept;
   - macs: like global, with the threshold binary-searched until the estimated MACs are
     down by `target_macs` (and the weight-layer parameters by `target_params`, if set);
   - latency: `slimgraph.passes.prune.latency.choose_keep(model, analysis, scores, config)`
     (measured per-layer latency; `target_speedup`, else `target_latency`, else
     `target_macs` or `ratio`); the cost of a cut is the output error measured when the
     group alone is cut (`objective: sensitivity`, `_sensitivity`) or the log share of
     importance lost (`objective: importance`).
   Counts are rounded to a multiple of `multiple` (never below it, never above the group),
   and at least `min_channels`; the highest-scoring channels are kept.
5. `channels.apply` slices every tensor of each group and re-checks the model.

Not exact: removing channels changes outputs.
"""

from __future__ import annotations

import fnmatch
import logging
import math

import numpy as np
import onnx
import pydantic

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, int_range, register_pass
from slimgraph.passes.prune import _importance
from slimgraph.passes.prune.channels import ChannelAnalysis, Group, analyze, estimate_macs

logger = logging.getLogger("slimgraph.passes.prune")

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: unsafe groups named in the warning before "and N more"
SHOWN = 5


def _fraction(default: float, high: float = 0.9):
    """A fraction in [0, 1); searched in [0, high]."""
    return pydantic.Field(default=default, ge=0.0, lt=1.0,
                          json_schema_extra={"domain": {"float": [0.0, high], "log": False}})


@register_pass
class PruneStructured(Pass):
    """Remove whole channels (filters) that the channel analysis proves safe to cut."""

    name = "prune.structured"
    exact = False
    before = ("quantize*",)

    class Config(PassConfig):
        ratio: float = _fraction(0.5)
        criterion: str = choice("l1", "l2", "consumer_l1", "consumer_l2", "bn_scale", "apoz", "mean_activation", "random", default="l1")
        mode: str = choice("uniform", "global", "macs", "latency", default="uniform")
        min_keep: float = pydantic.Field(default=0.1, ge=0.0, le=1.0,
                                         json_schema_extra={"domain": {"float": [0.0, 0.5], "log": False}})
        target_macs: float = _fraction(0.5)
        #: mode macs: also remove at least this fraction of the weight layers' parameters
        #: (MAC-driven cuts favour high-resolution layers and can keep the weight-heavy ones)
        target_params: float | None = pydantic.Field(default=None, ge=0.0, lt=1.0)
        #: mode latency: fraction of the predicted latency to remove (None: see latency.py)
        target_latency: float | None = pydantic.Field(default=None, ge=0.0, lt=1.0)
        #: mode latency: fit the layers' in-model cost to end-to-end timings first (latency.py)
        calibrate: bool = True
        #: mode latency: predicted model time <= dense / target_speedup (instead of
        #: target_latency / target_macs / ratio; an explicit target_macs and target_params
        #: are then budgets met as well)
        target_speedup: float | None = None
        #: mode latency: what a cut costs: `sensitivity` (the output error when the group
        #: alone is cut, measured on sample data or random inputs, _sensitivity.py) or
        #: `importance` (the log share of the criterion's score kept)
        objective: str = choice("sensitivity", "importance", default="sensitivity")
        #: inputs the sensitivity is measured on
        sensitivity_samples: int = int_range(1, 256, default=4)
        multiple: int = int_range(1, 64, default=8)
        min_channels: int = int_range(1, 1 << 16, default=1)
        samples: int = int_range(1, 4096, default=64)
        exclude: tuple[str, ...] = ()
        layers: tuple[str, ...] | None = None

    def run(self, model: Model, ctx) -> PassResult:
        cfg = self.config
        if cfg.target_speedup is not None:
            if cfg.mode != "latency":
                raise PassError(self.name, f"target_speedup needs mode=latency (got mode={cfg.mode!r}): only the "
                                           "latency mode predicts time; use target_macs with the other modes")
            if not cfg.target_speedup > 1.0:
                raise PassError(self.name, f"target_speedup must be > 1 (the dense model is 1x), got "
                                           f"{cfg.target_speedup}")
        if cfg.criterion in _importance.ACTIVATION_CRITERIA and not ctx.data:
            raise PassError(self.name, f"criterion {cfg.criterion!r} needs sample data (--data D.npz); "
                                       "use l1, l2 or bn_scale without data")
        folded = _prepare(model)
        analysis = analyze(model)
        unsafe = analysis.unsafe_reasons()
        if unsafe:
            more = f" and {len(unsafe) - SHOWN} more" if len(unsafe) > SHOWN else ""
            logger.warning("prune.structured leaves %d channel group(s) whole: %s%s",
                           len(unsafe), "; ".join(unsafe[:SHOWN]), more)
        if not analysis.safe_groups():
            raise PassError(self.name, "no channel group can be proved safe: " + "; ".join(unsafe[:8]))
        groups = self._selected(model, analysis)
        before = _measure(model)
        weights_before = _layer_channels(model)
        macs = dict(model.analysis("macs"))
        scores = _importance.scores(model, analysis, groups, cfg.criterion, data=ctx.data,
                                    samples=cfg.samples, rng=ctx.rng())
        self._latency_info: dict = {}
        self._data, self._rng = ctx.data, ctx.rng()
        counts = self._counts(model, analysis, groups, scores, macs)
        keep = {g.id: np.sort(np.argsort(-scores[g.id], kind="stable")[:counts[g.id]])
                for g in groups if counts[g.id] < g.size}
        if keep:
            try:
                analysis.apply(model, keep)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
                raise PassError(self.name, f"pruning produced an invalid model (a bug; please report it "
                                           f"with the model): {e}") from e
            model.bump()
        after = _measure(model)
        stats = {
            "groups": len(analysis.groups), "groups_safe": len(analysis.safe_groups()),
            "groups_pruned": len(keep), "groups_unsafe": len(unsafe),
            "channels_before": sum(g.size for g in groups),
            "channels_after": sum(len(keep.get(g.id, range(g.size))) for g in groups),
            "macs_before": before["macs"], "macs_after": after["macs"],
            "params_before": before["params"], "params_after": after["params"],
            "importance_kept": importance_kept(groups, scores, counts),
            "unsafe": unsafe[:20],
            "table": _table(weights_before, _layer_channels(model), macs, dict(model.analysis("macs"))),
        }
        if self._latency_info:
            stats["latency"] = self._latency_info
        return PassResult(model, modified=bool(keep) or folded, stats=stats)

    # -- which groups -------------------------------------------------------------------------
    def _selected(self, model: Model, analysis: ChannelAnalysis) -> list[Group]:
        cfg = self.config
        nodes = {n.name: n for n in model.graph}

        def matches(name: str, patterns) -> bool:
            n = nodes.get(name)
            keys = [name] + ([n.op_type, Model.provenance(n) or ""] if n is not None else [])
            return any(fnmatch.fnmatchcase(k, p) for k in keys for p in patterns)

        if cfg.layers is not None:
            for p in cfg.layers:
                if not any(matches(name, [p]) for name in nodes):
                    raise PassError(self.name, f"layers pattern {p!r} matches no node (by name, op type "
                                               "or torch module path); `slimgraph inspect` lists them")
        out = []
        for g in analysis.safe_groups():
            touched = {s.node for s, _ in g.slices}
            if cfg.exclude and any(matches(t, cfg.exclude) for t in touched):
                continue
            if cfg.layers is not None and not any(matches(p, cfg.layers) for p in g.producers):
                continue
            if g.size > 1:
                out.append(g)
        return out

    # -- how many channels ----------------------------------------------------------------------
    def _round(self, kept: float, size: int, unit: int = 1) -> int:
        # a group of attention heads of `unit` channels each rounds heads to what makes
        # whole multiples of channels
        # kept counts round down: `ratio` is the least fraction removed, so the MAC cut is
        # never below what the ratio promises (64 channels at 0.3 keep 40, not 48)
        m = self.config.multiple // math.gcd(self.config.multiple, unit)
        k = max(int(math.floor(kept + 1e-9)), 1)
        if m > 1:
            k = max(m, (k // m) * m)
        k = max(k, self.config.min_channels)
        return int(min(k, size))

    def _uniform(self, analysis, groups, macs, params=None) -> dict[int, int]:
        """Each group keeps (1 - ratio) of its channels, rounded to the multiple: down first,
        then back up, group by group (largest rounding loss first), while the model's MACs
        stay within those of the exact, unrounded ratio. So the MAC cut is at least what the
        ratio promises (as a per-layer tool such as Torch-Pruning gives) with channel counts
        that run fast."""
        keep = 1 - self.config.ratio
        exact = {g.id: max(1, int(g.size * keep + 1e-9)) for g in groups}  # floor, as per-layer tools keep
        budget = estimate_macs(analysis, macs, exact)
        # weights scale with the kept in/out fractions like MACs do: the same estimate
        # keeps the parameter count within the exact ratio's too
        params = params or {}
        param_budget = estimate_macs(analysis, params, exact)
        counts = {g.id: self._round(g.size * keep, g.size, g.unit) for g in groups}
        for g in sorted(groups, key=lambda g: counts[g.id] - g.size * keep):
            up = self._round(counts[g.id] + self._step(g.unit), g.size, g.unit)
            if up > counts[g.id] and up <= max(exact[g.id], counts[g.id]) + self._step(g.unit):
                trial = {**counts, g.id: up}
                if (estimate_macs(analysis, macs, trial) <= budget
                        and estimate_macs(analysis, params, trial) <= param_budget):
                    counts = trial
        return counts

    def _sensitivity(self, model, analysis, groups, scores) -> dict[int, np.ndarray] | None:
        """Per-group output error curves for the latency greedy (`_sensitivity`); None, with a
        warning, when the model cannot be run on random inputs and no data was given."""
        from slimgraph.errors import DataError
        from slimgraph.passes.prune import _sensitivity

        cfg = self.config
        try:
            feeds = _sensitivity.calibration_feeds(model, self._data, cfg.sensitivity_samples, self._rng)
        except DataError as e:
            logger.warning("prune.structured: no sensitivity (%s); the latency mode trades importance instead", e)
            return None
        from slimgraph.backends import ort

        floors = {g.id: _sensitivity.floor_count(g.size, cfg) for g in groups}
        try:
            return _sensitivity.sensitivity(model, groups, scores, floors, cfg.multiple, feeds)
        except ort.ORT_ERRORS as e:
            logger.warning("prune.structured: no sensitivity (ORT could not run the model: %s); the latency "
                           "mode trades importance instead", str(e)[:200])
            return None

    def _step(self, unit: int) -> int:
        return max(1, self.config.multiple // math.gcd(self.config.multiple, unit))

    def _counts(self, model, analysis, groups, scores, macs) -> dict[int, int]:
        cfg = self.config
        if cfg.mode == "uniform":
            return self._uniform(analysis, groups, macs, _layer_params(model))
        if cfg.mode == "latency":
            try:
                from slimgraph.passes.prune import latency
            except ImportError:
                raise PassError(self.name, "mode 'latency' needs slimgraph.passes.prune.latency, which is "
                                           "not installed in this build; use mode 'macs' or 'global'") from None
            losses = self._sensitivity(model, analysis, groups, scores) if cfg.objective == "sensitivity" else None
            chosen = latency.choose_keep(model, analysis, {g.id: scores[g.id] for g in groups}, cfg,
                                         info=self._latency_info, losses=losses)
            return {g.id: int(min(max(1, chosen.get(g.id, g.size)), g.size)) for g in groups}
        normed = {g.id: scores[g.id] / max(float(np.max(scores[g.id])), 1e-12) for g in groups}

        def at(threshold: float) -> dict[int, int]:
            out = {}
            for g in groups:
                above = int(np.sum(normed[g.id] >= threshold))
                out[g.id] = self._round(max(above, cfg.min_keep * g.size), g.size, g.unit)
            return out

        if cfg.mode == "global":
            everything = np.sort(np.concatenate([normed[g.id] for g in groups]))
            threshold = everything[min(int(len(everything) * cfg.ratio), len(everything) - 1)]
            return at(float(threshold))
        # macs: the lowest threshold whose estimates meet the target(s)
        goals = [(macs, float(sum(macs.values())) * (1 - cfg.target_macs))]
        if cfg.target_params is not None:
            params = _layer_params(model)
            goals.append((params, float(sum(params.values())) * (1 - cfg.target_params)))

        def meets(counts: dict[int, int]) -> bool:
            return all(estimate_macs(analysis, cost, counts) <= goal for cost, goal in goals)

        lo, hi = 0.0, 1.0 + 1e-9
        for _ in range(40):
            mid = (lo + hi) / 2
            if meets(at(mid)):
                hi = mid
            else:
                lo = mid
        best = at(hi)
        if not meets(best):
            logger.warning("prune.structured: target_macs %.2f / target_params %s is out of reach of the "
                           "safe groups (min_keep %.2f); pruned as far as they allow",
                           cfg.target_macs, cfg.target_params, cfg.min_keep)
        return best


def group_weight(group: Group) -> int:
    """How many layer sides a group sets the width of: the weight layers that produce,
    read or depthwise-filter its channels (a residual stream touching ten convs counts ten)."""
    return max(1, len({(s.node, s.role) for s, _ in group.slices if s.role in ("producer", "consumer", "depthwise")}))


def importance_kept(groups: list[Group], scores: dict[int, np.ndarray], counts: dict[int, int]) -> float:
    """The accuracy proxy that the latency mode trades against time, reported by every mode
    so they can be compared: the geometric mean, over every weight layer's input and output
    width, of the share of the channels' score kept there (each group's share weighted by
    `group_weight`). A width cut to a sliver drags the mean down as a bottleneck drags
    accuracy, and a residual stream that ten convs read counts ten times."""
    logs, weights = [], []
    for g in groups:
        s = np.sort(np.asarray(scores[g.id], dtype=np.float64))[::-1]
        total = float(s.sum())
        share = float(s[:counts.get(g.id, g.size)].sum()) / total if total > 0 else counts.get(g.id, g.size) / g.size
        logs.append(np.log(max(share, 1e-12)))
        weights.append(group_weight(g))
    return float(np.exp(np.average(logs, weights=weights))) if logs else 1.0


def _prepare(model: Model) -> bool:
    """Fold constants (exporters compute some biases and shapes at run time), drop dead
    nodes (a dead reader of a channel tensor would make it unsafe) and infer shapes.
    Returns whether the graph changed."""
    from slimgraph.passes.cleanup.eliminate_dead import EliminateDead
    from slimgraph.passes.cleanup.fold_constants import FoldConstants
    from slimgraph.passes.cleanup.infer_shapes import InferShapes

    folded = FoldConstants()(model).modified
    dead = EliminateDead()(model).modified
    InferShapes()(model)
    named = 0
    taken = {n.name for n in model.nodes(recursive=True)}
    for i, node in enumerate(model.nodes(recursive=True)):
        if not node.name:  # layers are reported and matched by name
            name, k = f"{node.op_type}_{i}", 0
            while name in taken:
                k += 1
                name = f"{node.op_type}_{i}_{k}"
            node.name = name
            taken.add(name)
            named += 1
    return folded or dead or named > 0


def _layer_params(model: Model) -> dict[str, int]:
    """{weight layer: weight entries}, for `estimate_macs`-style scaling."""
    from slimgraph.passes.prune.channels import _constant

    out = {}
    for n in model.graph:
        if n.op_type in WEIGHT_OPS and not n.domain and len(n.inputs) > 1:
            w = _constant(n.inputs[1])
            if w is not None:
                out[n.name] = int(w.size)
    return out


def _measure(model: Model) -> dict[str, int]:
    return {"macs": int(sum(model.analysis("macs").values())), "params": model.analysis("params")["params"]}


def _layer_channels(model: Model) -> dict[str, tuple[str, int, int]]:
    """{layer: (op, input channels, output channels)} from the weight shapes."""
    from slimgraph.passes.prune.channels import _constant

    out = {}
    for n in model.graph:
        if n.op_type not in WEIGHT_OPS or n.domain:
            continue
        w = _constant(n.inputs[1])
        if w is None or w.ndim < 2:
            continue
        group = n.attributes.get_int("group", 1)
        if n.op_type == "Conv":
            cin, cout = w.shape[1] * group, w.shape[0]
        elif n.op_type == "ConvTranspose":
            cin, cout = w.shape[0], w.shape[1] * group
        elif n.op_type == "Gemm":
            t = n.attributes.get_int("transB", 0)
            cin, cout = w.shape[t], w.shape[1 - t]
        else:
            cin, cout = w.shape[-2], w.shape[-1]
        out[n.name] = (n.op_type, int(cin), int(cout))
    return out


def _table(before, after, macs_before, macs_after) -> list[dict[str, str]]:
    rows = []
    for name, (op, cin, cout) in before.items():
        _, cin2, cout2 = after.get(name, (op, cin, cout))
        rows.append({
            "layer": name, "op": op, "in ch": f"{cin} -> {cin2}", "out ch": f"{cout} -> {cout2}",
            "MACs": f"{macs_before.get(name, 0)} -> {macs_after.get(name, 0)}",
        })
    return rows
