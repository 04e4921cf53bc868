"""lowrank.svd: factorize layer weights into two thin ones by truncated SVD (lossy).

1. MatMul / Gemm with a constant float32 weight W [K, N] (bias folded, see
   `quantize._weights.find_linears`): `A @ W + b` becomes `(A @ W1) @ W2 + b`, W1 [K, r],
   W2 [r, N], each op kept (MatMul pair + Add, or Gemm pair with C on the second).
2. Conv (group 1, constant float32 weight), `conv: channel`: a Conv Cin -> r with the
   original kernel, strides, pads and dilations, then a 1x..x1 Conv r -> Cout with the bias.
3. Conv 2-D, `conv: spatial`: a kh x 1 Conv Cin -> r (vertical stride, pads, dilation), then
   a 1 x kw Conv r -> Cout (horizontal ones, the bias). `conv: none` leaves Convs alone.

The rank of each layer comes from the first of these set in the config: `rank` (used as
given; larger than min(K, N) is an error naming the layer), `rank_ratio` (of the full
rank), `max_error` (the smallest r whose layer-output error ||XW - XW_r|| / ||XW|| on up to
`samples` calibration inputs is at most the budget; a layer no rank below full meets stays
dense and is named in a warning), else `energy` (the smallest r keeping that fraction of
||W||_F^2). Chosen ranks are rounded up to a multiple of `multiple`. With `max_error` and
`whiten` (default), linear and channel layers factor the weight whitened by their input
statistics (`_factor`: the rank-r pair with the least output error on the data, not the
least weight error).

A factorization is kept only where it pays: `objective: size` when the pair stores at most
`margin` of the dense weight's parameters, `objective: latency` when the pair alone runs
faster on ORT CPU than the dense layer alone (`_latency`). Every layer gets a row in
`stats["table"]`: rank, parameters before -> after, weight error, output error (with
`max_error`), and what happened.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir
import pydantic

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, float_range, register_pass
from slimgraph.passes.lowrank import _latency
from slimgraph.passes.lowrank._factor import Factorization, round_rank
from slimgraph.passes.lowrank._gram import Geometry, input_grams
from slimgraph.passes.quantize._weights import GraphEditor, Linear, find_linears, matches
from slimgraph.passes.rewrite import constant, used_outside

logger = logging.getLogger(__name__)

NAME = "lowrank.svd"
UNMET = "max_error unmet"


@dataclasses.dataclass
class Candidate:
    """One layer that may be factorized."""

    name: str
    op: str
    kind: str
    #: the nodes the pair replaces (a MatMul and its folded Add, a Gemm, a Conv)
    nodes: list[ir.Node]
    weight: np.ndarray
    bias: np.ndarray | None
    geometry: Geometry | None = None

    @property
    def node(self) -> ir.Node:
        return self.nodes[0]

    @property
    def output(self) -> ir.Value:
        return self.nodes[-1].outputs[0]

    @property
    def shape(self) -> str:
        return "x".join(map(str, self.weight.shape))


@register_pass
class LowRankSVD(Pass):
    """Factorize Gemm/MatMul/Conv weights into two thin layers by truncated SVD, where it pays."""

    name = NAME
    exact = False
    after = ("fold_batchnorm", "fuse_*")
    #: clustering, quantization and packing read the final weights; pruning may go either way
    #: (an unstructured sparsity contract recorded earlier would be broken and reported)
    before = ("cluster*", "quantize*", "pack*")

    class Config(PassConfig):
        #: fraction of ||W||_F^2 the kept singular values retain
        energy: float = pydantic.Field(default=0.9, gt=0.0, le=1.0,
                                       json_schema_extra={"domain": {"float": [0.5, 1.0], "log": False}})
        #: layer-output relative error budget (needs data); overrides `energy`
        max_error: float | None = pydantic.Field(default=None, gt=0.0, lt=1.0)
        #: a fixed rank for every layer; overrides the above
        rank: int | None = pydantic.Field(default=None, ge=1)
        #: a fixed fraction of each layer's full rank; overrides `energy` and `max_error`
        rank_ratio: float | None = pydantic.Field(default=None, gt=0.0, le=1.0)
        #: chosen ranks are rounded up to a multiple of this (kernels like multiples of 8)
        multiple: int = pydantic.Field(default=8, ge=1, le=256)
        conv: str = choice("channel", "spatial", "none", default="channel")
        objective: str = choice("size", "latency", default="size")
        #: with objective size, the pair must store at most this fraction of the dense params
        margin: float = float_range(0.05, 1.0, default=0.8)
        #: calibration samples used by `max_error`
        samples: int = pydantic.Field(default=64, ge=1)
        #: with `max_error`, minimise the output error on the data (whitened SVD), not the weight error
        whiten: bool = choice(True, False, default=True)
        #: patterns of layers left alone (node, output, provenance or weight names)
        exclude: tuple[str, ...] = ()

        @pydantic.model_validator(mode="after")
        def _one_rank_rule(self):
            given = [k for k in ("rank", "rank_ratio", "max_error") if getattr(self, k) is not None]
            if len(given) > 1:
                raise ValueError(f"set at most one of rank, rank_ratio, max_error (got {given})")
            return self

    def run(self, model: Model, ctx) -> PassResult:
        cfg = self.config
        candidates, skipped = self._candidates(model)
        grams = self._grams(model, candidates, ctx) if cfg.max_error is not None else {}
        shapes = model.analysis("shapes") if cfg.objective == "latency" else {}
        editor = GraphEditor(model, NAME)
        rows, unmet = [], []
        before = after = 0
        for c in candidates:
            row, fact, r, why = self._plan(c, grams.get(_gram_key(c)), shapes, model.opset)
            before += fact.params_before
            if why is None:
                self._rewrite(editor, c, fact, r)
                after += fact.params_after(r)
                row["result"] = "factorized"
            else:
                after += fact.params_before
                skipped[why.split(":")[0]] += 1
                unmet += [c.name] if why.startswith(UNMET) else []
                row["result"] = why
            rows.append(row)
        editor.drop_unused_weights()
        if unmet:
            logger.warning("%s: max_error %s is met by no rank below full for %d layer(s), left dense: %s",
                           NAME, cfg.max_error, len(unmet), ", ".join(unmet))
        done = sum(r["result"] == "factorized" for r in rows)
        stats = {"factorized": done, "params_before": before, "params_after": after,
                 "skipped": dict(skipped), "table": rows}
        if unmet:
            stats["max_error_unmet"] = unmet
        return PassResult(model, done > 0, stats)

    def _plan(self, c: Candidate, gram: np.ndarray | None, shapes: dict, opset: int
              ) -> tuple[dict, Factorization, int, str | None]:
        """(table row, factorization, rank, why the layer stays dense or None) for one layer."""
        cfg = self.config
        whiten = gram is not None and cfg.whiten and c.kind != "spatial"
        fact = Factorization.of(c.kind, c.weight, gram if whiten else None)
        r, why, out_err = self._rank(c, fact, gram)
        if why is None:
            why = self._not_worth_it(c, fact, r, shapes, opset)
        row = {"layer": c.name, "op": f"{c.op} ({c.kind}{', whitened' if whiten else ''})", "shape": c.shape,
               "rank": f"{r}/{fact.full_rank}",
               "params": f"{fact.params_before} -> {fact.params_after(r) if why is None else fact.params_before}",
               "weight error": f"{fact.weight_error(r):.4g}" if r < fact.full_rank else "0"}
        if cfg.max_error is not None:
            row["output error"] = "" if out_err is None else f"{out_err:.4g}"
        return row, fact, r, why

    # -- finding the layers ---------------------------------------------------------------
    def _candidates(self, model: Model) -> tuple[list[Candidate], collections.Counter]:
        linears, skipped = find_linears(model, ("MatMul", "Gemm"), self.config.exclude)
        found = []
        for lin in linears:
            if used_outside(lin.weight_value, [lin.node]) is not None:
                skipped["weight is shared with another node"] += 1
                continue
            found.append(_from_linear(lin))
        if self.config.conv != "none":
            for node in model.graph:
                if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
                    continue
                c = self._conv(node)
                if isinstance(c, str):
                    skipped[c] += 1
                else:
                    found.append(c)
        return found, skipped

    def _conv(self, node: ir.Node) -> Candidate | str:
        if matches(node, self.config.exclude, node.inputs[1]):
            return "excluded by pattern"
        w = constant(node.inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim < 3:
            return "Conv weight is not a constant float32 tensor"
        if used_outside(node.inputs[1], [node]) is not None:
            return "weight is shared with another node"
        attrs = node.attributes
        if attrs.get_int("group", 1) != 1:
            return "grouped Conv"
        if attrs.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "Conv with auto_pad SAME_*"
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant(node.inputs[2])
            if bias is None:
                return "Conv bias is not a constant"
        nd = w.ndim - 2
        kind = self.config.conv
        if kind == "spatial" and nd != 2:
            return "spatial SVD needs a 2-D Conv"
        no_pads = [0] * 2 * nd
        pads = attrs.get_ints("pads", no_pads) if attrs.get_string("auto_pad", "NOTSET") == "NOTSET" else no_pads
        geometry = Geometry(tuple(w.shape[2:]), tuple(attrs.get_ints("strides", [1] * nd)), tuple(pads),
                            tuple(attrs.get_ints("dilations", [1] * nd)))
        return Candidate(node.name or node.outputs[0].name or "Conv", "Conv", kind, [node], w, bias, geometry)

    # -- choosing the rank ----------------------------------------------------------------
    def _grams(self, model: Model, candidates: list[Candidate], ctx) -> dict:
        if not ctx.data:
            raise PassError(NAME, "max_error needs calibration data to measure layer outputs: "
                                  "pass data (--data D.npz), or choose ranks by energy or rank")
        layers = [_gram_key(c) for c in candidates]
        return input_grams(model, layers, ctx.data, self.config.samples, progress=ctx.progress)

    def _rank(self, c: Candidate, fact: Factorization, gram: np.ndarray | None
              ) -> tuple[int, str | None, float | None]:
        """(rank, why not factorized or None, its output error when measured)."""
        cfg, full = self.config, fact.full_rank
        if cfg.rank is not None:
            if cfg.rank > full:
                raise PassError(NAME, f"layer {c.name!r} ({c.op}, weight {c.shape}): rank {cfg.rank} is larger "
                                      f"than the matrix allows (min dimension {full}); choose rank <= {full}, "
                                      "use rank_ratio, or exclude the layer")
            r = cfg.rank
        elif cfg.rank_ratio is not None:
            r = round_rank(math.ceil(cfg.rank_ratio * full), cfg.multiple, full)
        elif cfg.max_error is not None:
            return self._rank_for_error(c, fact, gram)
        else:
            r = round_rank(fact.energy_rank(cfg.energy), cfg.multiple, full)
        if r >= full:
            return r, f"full rank: {r}", None
        return r, None, None

    def _rank_for_error(self, c: Candidate, fact: Factorization, gram: np.ndarray):
        full, step, budget = fact.full_rank, self.config.multiple, self.config.max_error
        ranks = np.arange(step, full, step)
        unmet = full, f"{UNMET}: no rank below {full} meets max_error {budget}", None
        if not len(ranks):
            return unmet
        if c.kind == "spatial":  # no closed form: bisect (errors fall with the rank)
            lo, hi, best = 0, len(ranks) - 1, None
            while lo <= hi:
                mid = (lo + hi) // 2
                err = float(fact.output_errors(gram, ranks[mid:mid + 1])[0])
                if err <= budget:
                    best, hi = (int(ranks[mid]), err), mid - 1
                else:
                    lo = mid + 1
            return unmet if best is None else (best[0], None, best[1])
        errors = fact.output_errors(gram, ranks)
        ok = np.nonzero(errors <= budget)[0]
        if not len(ok):
            return unmet
        return int(ranks[ok[0]]), None, float(errors[ok[0]])

    # -- is it worth it -------------------------------------------------------------------
    def _not_worth_it(self, c: Candidate, fact: Factorization, r: int, shapes: dict, opset: int) -> str | None:
        cfg = self.config
        if cfg.objective == "size":
            limit = cfg.margin * fact.params_before
            if fact.params_after(r) > limit:
                return f"not smaller: {fact.params_after(r)} params > {cfg.margin} x {fact.params_before}"
            return None
        shape = shapes.get(c.node.inputs[0].name, (None, None))[1]
        if shape is None:
            return "input shape unknown (latency objective)"
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
        dense, pair = _timed_ops(c, fact, r)
        ratio = _latency.time_ratio(shape, dense, pair, opset)
        if ratio > _latency.MAX_RATIO:
            return f"not faster: pair takes {ratio:.2f}x the dense time"
        return None

    # -- rewriting ------------------------------------------------------------------------
    def _rewrite(self, editor: GraphEditor, c: Candidate, fact: Factorization, r: int) -> None:
        w1, w2 = fact.factors(r)
        base = c.node.inputs[1].name or c.name
        v1, v2 = editor.initializer(w1, f"{base}_lr1"), editor.initializer(w2, f"{base}_lr2")
        b = editor.initializer(c.bias.astype(np.float32), f"{base}_lr_bias") if c.bias is not None else None
        x = c.node.inputs[0]
        if c.op == "MatMul":
            first = editor.node("", "MatMul", [x, v1], source=c.node)
            second = editor.node("", "MatMul", [first.outputs[0], v2], source=c.node)
            nodes = [first, second]
            if b is not None:
                nodes.append(editor.node("", "Add", [second.outputs[0], b], source=c.node))
        elif c.op == "Gemm":
            first = editor.node("", "Gemm", [x, v1], source=c.node)
            nodes = [first, editor.node("", "Gemm", _present([first.outputs[0], v2, b]), source=c.node)]
        else:
            a1, a2 = _conv_attrs(c.kind, c.geometry)
            first = editor.node("", "Conv", [x, v1], source=c.node, **a1)
            nodes = [first, editor.node("", "Conv", _present([first.outputs[0], v2, b]), source=c.node, **a2)]
        for node in nodes:
            editor.model.annotate(node, "lowrank.rank", r)
        editor.replace(c.nodes, c.output, nodes, nodes[-1].outputs[0])


def _gram_key(c: Candidate) -> tuple[str, Geometry | None]:
    return c.node.inputs[0].name, c.geometry


def _present(values: list[ir.Value | None]) -> list[ir.Value]:
    return [v for v in values if v is not None]


def _from_linear(lin: Linear) -> Candidate:
    return Candidate(lin.name, lin.node.op_type, "linear", lin.nodes, lin.weight, lin.bias)


def _conv_attrs(kind: str, g: Geometry) -> tuple[dict, dict]:
    """Attributes of the first and second Conv of a pair."""
    if kind == "channel":
        return {"strides": g.strides, "pads": g.pads, "dilations": g.dilations}, {}
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = g.strides, g.dilations, g.pads
    return ({"strides": [sh, 1], "pads": [pt, 0, pb, 0], "dilations": [dh, 1]},
            {"strides": [1, sw], "pads": [0, pl, 0, pr], "dilations": [1, dw]})


def _timed_ops(c: Candidate, fact: Factorization, r: int):
    """(dense, pair) op lists for `_latency.time_ratio`."""
    w1, w2 = (a.shape for a in fact.factors(r)) if c.kind != "linear" else ((fact.weight.shape[0], r),
                                                                          (r, fact.weight.shape[1]))
    if c.kind == "linear":
        return [(c.op, [c.weight.shape], {})], [(c.op, [w1], {}), (c.op, [w2], {})]
    a1, a2 = _conv_attrs(c.kind, c.geometry)
    dense_attrs = {"strides": list(c.geometry.strides), "pads": list(c.geometry.pads),
                   "dilations": list(c.geometry.dilations)}
    return ([("Conv", [c.weight.shape], dense_attrs)],
            [("Conv", [w1], {k: list(v) for k, v in a1.items()}), ("Conv", [w2], {k: list(v) for k, v in a2.items()})])
