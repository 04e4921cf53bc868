"""Latency-aware channel counts for `prune.structured` (`mode: latency`).

Fewer MACs is not always lower latency: ORT's CPU kernels run some channel counts much
better than others, and a channel of a 112x112 layer costs more time than one of a 7x7
layer with the same MACs. So the counts are chosen by measured time:

1. `LatencyTable`: the ORT CPU latency of one layer alone (a one-node Conv / ConvTranspose
   / Gemm / MatMul model built with `onnx.helper`, batch 1, `threads` threads, spinning off,
   fastest of `runs` runs after warm-up), keyed by the layer's shape signature
   (`LayerShape.key`: op, input shape, weight shape, group, strides, pads, dilations).
   Entries are measured on first use only and cached in
   `<cache root>/latency/<cpu model>-<ort version>-<threads>t.json` (atomic writes,
   merged with what other processes wrote meanwhile).
2. `calibrate` (on by default in the pass): a layer timed alone is not the layer inside
   the model. Alone it pays a fixed cost per run (session call, input copy, output
   allocation: the table time of `OVERHEAD_PROBE`) and finds its weights hot in cache;
   inside, ORT has fused the activation / residual add into it, and its weights stream in
   after everyone else's: on ResNet-18 the 512-channel 7x7 convs take about twice their
   table time in the model while the 56x56 ones take about their table time (see the
   predicted-vs-actual table of benchmarks/results/prune.md). An earlier version summed
   the raw table times, and the latency mode cut the wrong layers. So ORT's profiler runs
   the dense model (fastest of 3 profiles) and each weight layer (matched by its input and
   weight shapes) gets a factor: in-model kernel time / (table time - overhead). A pruned
   layer's cost is `factor * (table time at its new shape - overhead)`: the table still
   says how the time changes with the channel counts, the profile says what the layer
   costs where it sits. Without calibration the raw table time is used.
3. `choose_keep`: the model's predicted latency is the sum over its weight layers of their
   cost at the kept input/output channel counts (other ops are not modelled).
   Starting from every group whole, a greedy repeatedly cuts the group, by one
   `multiple`-step up to half its current count, with the most predicted time saved per
   unit of importance lost (the lowest-scoring
   channels go first). Importance is `structured.importance_kept`'s: the geometric mean,
   over every weight layer's input and output width, of the share of score kept there, so
   a step's loss is the drop of log(share) of its group times the number of layer sides
   the group sets (`structured.group_weight`). That makes each further cut of an already
   thin group dearer, and a residual stream read by many convs dear to cut: with a plain
   sum of scores (a channel of a 56x56 layer costs 64x the time of a 7x7 one for the same
   importance) or an unweighted mean over groups, the greedy squeezed ResNet-18's
   residual streams to 8 channels while keeping the convs inside the blocks whole.
   With `losses` (the pass's default, `objective: sensitivity`) a step's loss is instead
   the rise of the group's measured output error (`_sensitivity`): the log share of L1
   importance undervalues the late, weight-heavy layers of MobileNetV2, which it cut.
   Never below the
   group's floor (`min_keep`, `min_channels`, one `multiple`), until the prediction is
   down by `target` of its reducible part: goal = floor + (1 - target) * (dense - floor),
   where floor is the prediction with every group at its floor (a layer's fixed overhead
   cannot be pruned away; on a model of tiny layers an absolute goal would drive every
   group to its floor). The target: `config.target_latency` when the config has it; else
   `target_macs` when set explicitly; else the MAC cut that uniform pruning at `ratio`
   would give (so `ratio=0.3, mode=latency` aims at the speed-up that the MACs a uniform
   30% cut removes would promise). `config.target_speedup`, when set, replaces all of
   these: (goal + other) = (dense + other) / target_speedup, where `other` is the dense
   model's kernel time outside the weight layers in the calibration's profile (pooling,
   unfused elementwise ops), counted as not shrinking (out of reach below the floor, with
   a warning). Budgets met as well: an explicit `target_macs` (with `target_speedup`)
   and `target_params`; while several goals are unmet, a step's gain is the sum over them
   of the share of each remaining gap it closes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.ir.model import Model
from slimgraph.passes.prune._sensitivity import floor_count
from slimgraph.passes.prune.channels import ChannelAnalysis, Group, _constant, estimate_macs, space_size

logger = logging.getLogger("slimgraph.passes.prune")

#: counts tried below a group's current one per greedy step (at least; down to half of it)
LOOKAHEAD = 4
TABLE_VERSION = 2  # 2: the minimum over runs (1: the median, skewed by other processes' load)
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: attributes that change a layer's kernel, hence part of its signature
SHAPE_ATTRS = {
    "Conv": ("group", "strides", "pads", "dilations", "kernel_shape", "auto_pad"),
    "ConvTranspose": ("group", "strides", "pads", "dilations", "kernel_shape", "output_padding", "auto_pad"),
    "Gemm": ("transA", "transB"),
    "MatMul": (),
}


# --- layer signatures ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What one weight layer's latency depends on (batch 1)."""

    op: str
    x: tuple[int, ...]
    w: tuple[int, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    bias: bool = False

    def key(self) -> str:
        def dims(d: tuple[int, ...]) -> str:
            return "x".join(map(str, d))

        attrs = ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in self.attrs)
        return f"{self.op}|x={dims(self.x)}|w={dims(self.w)}|{attrs}|bias={int(self.bias)}"

    def resized(self, cin: int, cout: int) -> LayerShape:
        """The same layer with `cin` input and `cout` output channels (depthwise layers keep
        `group == cin == cout`; a Flatten -> Gemm's in-features scale with `cin`)."""
        attrs = dict(self.attrs)
        x, w = list(self.x), list(self.w)
        if self.op == "Conv":
            group = attrs.get("group", 1)
            depthwise = group > 1 and group == x[1] and w[1] == 1
            x[1] = cin
            if depthwise:
                attrs["group"], w[0] = cin, cin * (w[0] // group)
            else:
                w[0], w[1] = cout, cin // group
        elif self.op == "ConvTranspose":
            group = attrs.get("group", 1)
            x[1], w[0], w[1] = cin, cin, cout // group
        elif self.op == "Gemm":
            x[0 if attrs.get("transA", 0) else 1] = cin
            if attrs.get("transB", 0):
                w[0], w[1] = cout, cin
            else:
                w[0], w[1] = cin, cout
        else:  # MatMul
            x[-1], w[0], w[1] = cin, cin, cout
        return dataclasses.replace(self, x=tuple(x), w=tuple(w), attrs=tuple(sorted(attrs.items())))

    def channels(self) -> tuple[int, int]:
        """(input channels, output channels) of this signature."""
        attrs = dict(self.attrs)
        if self.op == "Conv":
            return self.x[1], self.w[0]
        if self.op == "ConvTranspose":
            return self.x[1], self.w[1] * attrs.get("group", 1)
        if self.op == "Gemm":
            return self.x[1 if not attrs.get("transA", 0) else 0], self.w[0 if attrs.get("transB", 0) else 1]
        return self.x[-1], self.w[1]

    def proto(self):
        """A one-node ONNX model of this layer, random weights."""
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        inits = [numpy_helper.from_array(rng.standard_normal(self.w).astype(np.float32), "W")]
        inputs = ["X", "W"]
        if self.bias:
            cout = self.channels()[1]
            inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B"))
            inputs.append("B")
        attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in self.attrs}
        node = helper.make_node(self.op, inputs, ["Y"], **attrs)
        graph = helper.make_graph(
            [node], "layer", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(self.x))],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    def feed(self) -> dict[str, np.ndarray]:
        return {"X": np.random.default_rng(1).standard_normal(self.x).astype(np.float32)}


def layer_shape(node) -> LayerShape | None:
    """The signature of a weight node at batch 1, or None when its shapes are unknown or
    its weight is not a constant."""
    if node.op_type not in WEIGHT_OPS or node.domain:
        return None
    w = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
    x = node.inputs[0]
    if w is None or x is None or x.shape is None:
        return None
    dims = [d if isinstance(d, int) else None for d in x.shape]
    batch_first = node.op_type in ("Conv", "ConvTranspose") or len(dims) >= 3 or (
        node.op_type == "Gemm" and not node.attributes.get_int("transA", 0))
    if dims and batch_first:
        dims[0] = 1  # latency at batch 1
    if node.op_type == "MatMul":
        if w.ndim != 2 or any(d is None for d in dims[:-1]) or len(dims) < 2:
            return None
        dims = [int(np.prod(dims[:-1])), dims[-1]]
    if any(d is None for d in dims):
        return None
    attrs = {}
    for name in SHAPE_ATTRS[node.op_type]:
        attr = node.attributes.get(name)
        if attr is not None:
            v = attr.value
            attrs[name] = tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else v
    bias = len(node.inputs) > 2 and node.inputs[2] is not None and node.op_type != "MatMul"
    if node.op_type == "Gemm" and bias:
        c = _constant(node.inputs[2])
        bias = c is not None and c.ndim == 1  # a broadcast [N] bias; others are left out
    return LayerShape(node.op_type, tuple(int(d) for d in dims), tuple(int(d) for d in w.shape),
                      tuple(sorted(attrs.items())), bool(bias))


# --- the table -----------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:80] or "cpu"


#: environment variable naming the table file to use instead of the default one
TABLE_ENV = "SLIMGRAPH_LATENCY_TABLE"


def default_path(threads: int = 2, cache_dir: str | os.PathLike | None = None) -> Path:
    """`$SLIMGRAPH_LATENCY_TABLE` when set (a benchmark measuring a fresh, self-consistent
    table), else `<cache root>/latency/<cpu model>-<ort version>-<threads>t.json`."""
    if os.environ.get(TABLE_ENV) and cache_dir is None:
        return Path(os.environ[TABLE_ENV])
    import platform

    import onnxruntime

    from slimgraph.backends.runtime_check import cpu_info
    from slimgraph.zoo import cache_root

    cpu = cpu_info().model or platform.machine()
    return cache_root(cache_dir) / "latency" / f"{_slug(cpu)}-{onnxruntime.__version__}-{threads}t.json"


class LatencyTable:
    """Measured ORT CPU latency (ms) of single layers, cached on disk.

    `latency(shape)` measures a signature on first use; `save()` writes new entries
    (merged with the file's current content). Use as a context manager to save on exit."""

    def __init__(self, path: str | os.PathLike | None = None, *, threads: int = 2, runs: int = 12,
                 warmup: int = 2, progress: bool = True):
        self.path = Path(path) if path is not None else default_path(threads)
        self.threads, self.runs, self.warmup = threads, runs, warmup
        self.entries: dict[str, float] = self._read()
        self.measured = 0
        self._progress = progress
        self._bar = None

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("latency table %s is unreadable (%s); measuring again", self.path, e)
            return {}
        if data.get("version") != TABLE_VERSION or data.get("threads") != self.threads:
            return {}
        return {k: float(v) for k, v in data.get("entries", {}).items()}

    def save(self) -> None:
        if not self.measured:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**self._read(), **self.entries}
        payload = {"version": TABLE_VERSION, "threads": self.threads, "runs": self.runs, "entries": merged}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def __enter__(self) -> LatencyTable:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the progress display and save new entries."""
        if self._bar is not None:
            self._bar[0].stop()
            self._bar = None
        self.save()

    def latency(self, shape: LayerShape) -> float:
        """ms of the layer alone (fastest of `runs`); measured once per signature."""
        key = shape.key()
        if key not in self.entries:
            self.entries[key] = self._measure(shape)
            self.measured += 1
            self._advance()
        return self.entries[key]

    def _measure(self, shape: LayerShape) -> float:
        from slimgraph.backends import ort

        sess = ort.session(shape.proto(), threads=self.threads, spinning=False)
        feed = shape.feed()
        for _ in range(self.warmup):
            sess.run(None, feed)
        times = np.empty(self.runs)
        for i in range(self.runs):
            start = time.perf_counter()
            sess.run(None, feed)
            times[i] = time.perf_counter() - start
        # the minimum: other processes only ever add time, and a table measured over hours
        # must compare shapes timed under different loads (the median drifted 2x)
        return float(np.min(times) * 1e3)

    def _advance(self) -> None:
        if not self._progress:
            return
        if self._bar is None:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            bar = Progress(SpinnerColumn(), TextColumn("measuring layer latencies: {task.completed} shapes"),
                           TimeElapsedColumn(), transient=True)
            bar.start()
            self._bar = (bar, bar.add_task("measure", total=None))
        self._bar[0].advance(self._bar[1])


# --- calibration ----------------------------------------------------------------------------------
#: the layer whose table time stands for the fixed cost of one isolated run (a 1x1 conv of
#: one channel: session call, input copy, output allocation; no real work)
OVERHEAD_PROBE = LayerShape("Conv", (1, 1, 1, 1), (1, 1, 1, 1), (("group", 1),), False)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """In-model cost of a layer: `factors[layer] * (table ms - overhead)`, its table time
    without the fixed cost of an isolated run, scaled to what the layer took inside the
    model; `default` for layers the profile did not match."""

    factors: Mapping[str, float] = dataclasses.field(default_factory=dict)
    overhead: float = 0.0
    default: float = 1.0
    #: the dense model's kernel time outside its weight layers (ORT's profile, the same
    #: rounds as the factors; 0: not measured): what the predicted time leaves out
    other_ms: float = 0.0

    def cost(self, name: str, ms: float) -> float:
        # never below a tenth of the table time: a layer of a few channels still costs something
        return self.factors.get(name, self.default) * max(ms - self.overhead, 0.1 * ms)


def calibrate(model: Model, analysis: ChannelAnalysis, group_ids, table: LatencyTable, *,
              rounds: int = 3, runs: int = 20) -> Calibration:
    """Per-layer factors from ORT's profile of the whole (dense) model: each weight layer's
    kernel time inside the model (the fastest of `rounds` profiles of `runs` runs; layers
    matched by input and weight shape, time shared among layers of the same shapes) over
    its table time less the isolated-run overhead (see the module docstring). The identity
    calibration when the profile cannot be taken."""
    from slimgraph.backends import ort

    layers = _layers(model, analysis, set(group_ids))
    by_key: dict[tuple, list[_Layer]] = {}
    for layer in layers:
        by_key.setdefault((layer.shape.x, layer.shape.w), []).append(layer)
    inside = {key: np.inf for key in by_key}
    rest = np.inf  # the kernels of everything but the weight layers (fastest round)
    try:
        for _ in range(rounds):
            report = ort.runtime_report(model, profile_runs=runs, threads=table.threads)
            sums: dict[tuple, float] = {}
            other = 0.0
            for n in report.nodes:
                key = (tuple(n.input_shapes[0]), tuple(n.input_shapes[1])) if (
                    len(n.input_shapes) > 1 and n.input_shapes[0] and n.input_shapes[1]) else None
                if key in by_key:
                    sums[key] = sums.get(key, 0.0) + (n.time_us or 0.0) / 1e3
                else:
                    other += (n.time_us or 0.0) / 1e3
            inside = {k: min(v, sums.get(k, np.inf)) for k, v in inside.items()}
            rest = min(rest, other)
    except Exception as e:  # noqa: BLE001 - calibration refines the table; the table alone still works
        logger.warning("latency calibration failed (%s: %s); using the table alone", type(e).__name__, e)
        return Calibration()
    overhead = table.latency(OVERHEAD_PROBE)
    factors = {}
    for key, ls in by_key.items():
        if np.isfinite(inside[key]):
            for layer in ls:
                alone = table.latency(layer.shape)
                factors[layer.name] = (inside[key] / len(ls)) / max(alone - overhead, 0.1 * alone)
    if not factors:
        logger.warning("latency calibration matched no layer of the profile; using the table alone")
        return Calibration()
    default = float(np.median(list(factors.values())))
    logger.info("latency calibration: %d of %d layers matched; in-model / alone from %.2f to %.2f (median %.2f), "
                "isolated-run overhead %.3f ms", len(factors), len(layers), min(factors.values()),
                max(factors.values()), default, overhead)
    return Calibration(factors, overhead, default, float(rest) if np.isfinite(rest) else 0.0)


# --- choosing counts --------------------------------------------------------------------------------
@dataclasses.dataclass
class _Layer:
    name: str
    shape: LayerShape
    root_in: str | None
    root_out: str | None
    depthwise: bool
    groups: frozenset[int]


def _layers(model: Model, analysis: ChannelAnalysis, group_ids: set[int]) -> list[_Layer]:
    out = []
    for node in model.graph:
        shape = layer_shape(node)
        if shape is None:
            continue
        root_in, root_out, depthwise = analysis.layer_spaces.get(node.name, (None, None, False))
        touched = set()
        for root in (root_in, root_out):
            for leaf, _ in analysis._leaves.get(root, []) if root is not None else []:
                gid = analysis._group_of_leaf.get(leaf)
                if gid in group_ids:
                    touched.add(gid)
        out.append(_Layer(node.name, shape, root_in, root_out, depthwise, frozenset(touched)))
    return out


def _kept(analysis: ChannelAnalysis, root: str | None, counts: Mapping[int, int], full: int) -> int:
    kt = space_size(analysis, root, counts)
    if not kt or not kt[1]:
        return full
    return max(1, int(round(full * kt[0] / kt[1])))


def _resized(analysis: ChannelAnalysis, layer: _Layer, counts: Mapping[int, int]) -> LayerShape:
    """The layer's signature when group g keeps `counts[g]` channels."""
    if not layer.groups:
        return layer.shape
    cin, cout = layer.shape.channels()
    if layer.depthwise:
        c = _kept(analysis, layer.root_out, counts, cout)
        return layer.shape.resized(c, c)
    return layer.shape.resized(_kept(analysis, layer.root_in, counts, cin),
                               _kept(analysis, layer.root_out, counts, cout))


def _layer_latency(table: LatencyTable, analysis: ChannelAnalysis, layer: _Layer, counts: Mapping[int, int],
                   calibration: Calibration | None = None) -> float:
    ms = table.latency(_resized(analysis, layer, counts))
    return ms if calibration is None else calibration.cost(layer.name, ms)


def _uniform_counts(analysis: ChannelAnalysis, group_ids, ratio: float, multiple: int, min_channels: int) -> dict[int, int]:
    """What `prune.structured(mode=uniform)` keeps at `ratio` (its rounding rule)."""
    out = {}
    for gid in group_ids:
        size = analysis.groups[gid].size
        k = max(int(round(size * (1 - ratio))), 1)
        if multiple > 1:
            k = max(multiple, int(round(k / multiple)) * multiple)
        out[gid] = int(min(max(k, min_channels), size))
    return out


def latency_target(model: Model, analysis: ChannelAnalysis, group_ids, config) -> float:
    """The fraction of predicted latency to remove (see the module docstring)."""
    explicit = getattr(config, "target_latency", None)
    if explicit is not None:
        return float(explicit)
    target_macs = getattr(config, "target_macs", None)
    fields_set = getattr(config, "model_fields_set", None)
    if target_macs is not None and (fields_set is None or "target_macs" in fields_set):
        return float(target_macs)
    macs = dict(model.analysis("macs"))
    total = float(sum(macs.values())) or 1.0
    counts = _uniform_counts(analysis, group_ids, float(getattr(config, "ratio", 0.5)),
                             int(getattr(config, "multiple", 1)), int(getattr(config, "min_channels", 1)))
    return max(0.0, 1.0 - estimate_macs(analysis, macs, counts) / total)


def group_weight(group: Group) -> int:
    """`structured.group_weight` (imported late: structured imports this module lazily)."""
    from slimgraph.passes.prune.structured import group_weight as weight

    return weight(group)


def _step_down(count: int, multiple: int) -> int:
    """The next smaller count: the multiple below `count`."""
    if multiple <= 1:
        return count - 1
    return (count - 1) // multiple * multiple


def choose_keep(model: Model, analysis: ChannelAnalysis, scores: Mapping[int, np.ndarray], config, *,
                table: LatencyTable | None = None, progress: bool = True,
                info: dict | None = None, losses: Mapping[int, np.ndarray] | None = None) -> dict[int, int]:
    """Kept channel count per group of `scores` (group id -> per-channel importance) so
    that the predicted latency meets the target at the least importance lost (see the
    module docstring). `model` and `analysis` are not modified. `table`: a `LatencyTable`
    (default: the cached one for this CPU, ORT version and 2 threads). `config.calibrate`
    (default off here, on in the pass) fits the in-model cost first (`calibrate`). `info`,
    when given, receives the calibration, the predicted latencies and the greedy's `steps`
    ((group, new count) in order: the path to any smaller target is a prefix of it).
    `losses`: {group id: loss[k], k = 0..size}, what keeping k channels of the group costs
    (`_sensitivity.sensitivity`), used instead of the log share of `scores` for the groups
    it covers (the others keep the log share, scaled to the losses' median; see `_losses`)."""
    table = table if table is not None else LatencyTable(progress=progress)
    try:
        return _greedy(model, analysis, scores, config, table, info if info is not None else {}, losses)
    finally:
        table.close()


def _greedy(model, analysis, scores, config, table, info: dict, losses=None) -> dict[int, int]:
    group_ids = {gid for gid in scores if analysis.groups[gid].safe}
    multiple = int(getattr(config, "multiple", 1))
    layers = _layers(model, analysis, group_ids)
    counts = {gid: analysis.groups[gid].size for gid in group_ids}
    floors = {gid: floor_count(analysis.groups[gid].size, config) for gid in group_ids}
    cal = None
    if getattr(config, "calibrate", False):
        cal = calibrate(model, analysis, group_ids, table)

    def cost(layer: _Layer, c: Mapping[int, int]) -> float:
        return _layer_latency(table, analysis, layer, c, cal)

    lost_at = _losses(analysis, group_ids, scores, losses, floors)
    by_group: dict[int, list[_Layer]] = {gid: [] for gid in group_ids}
    for layer in layers:
        for gid in layer.groups:
            by_group[gid].append(layer)
    current = {layer.name: cost(layer, counts) for layer in layers}
    dense = sum(current.values())
    if dense <= 0 or not group_ids:
        return counts
    # what no pruning can remove: every group at its floor (small layers are mostly overhead)
    floor = sum(cost(layer, floors) for layer in layers)
    speedup = getattr(config, "target_speedup", None)
    # the model's time outside the weight layers (calibrated runs only): not pruned away, so
    # a speed-up of the whole model needs a deeper cut of the layers than the same ratio
    other = cal.other_ms if cal is not None else 0.0
    if speedup is not None:
        goal = (dense + other) / float(speedup) - other
        if goal < floor:
            logger.warning("prune.structured (latency): target_speedup %.2f is out of reach: with every group "
                           "at its floor the predicted speed-up is %.2fx; pruning to the floor", speedup,
                           (dense + other) / (floor + other))
    else:
        target = latency_target(model, analysis, group_ids, config)
        goal = floor + (1.0 - target) * max(dense - floor, 0.0)
    # further budgets (MACs with target_speedup, parameters), each met as well: a step's
    # value sums the share of each unmet budget's remaining gap it closes
    budgets = _budgets(model, analysis, config, speedup is not None)
    spent = {name: {layer.name: f(layer, counts) for layer in layers} for name, (f, _) in budgets.items()}
    # the parts of each budget no group touches (layers outside `layers`)
    budgets_total = {name: _budget_rest(model, layers, name) for name in budgets}
    total = dense

    def gaps() -> dict[str, float]:
        out = {"latency": total - goal} if total > goal else {}
        for name, (_, cap) in budgets.items():
            used = budgets_total[name] + sum(spent[name].values())
            if used > cap:
                out[name] = used - cap
        return out

    steps: list[tuple[int, int]] = []  # (group, new count): the path, a prefix of any longer one
    while (open_gaps := gaps()):
        best, best_value, best_step = None, -np.inf, None
        for gid in sorted(group_ids):
            # steps ahead, down to half the current count: measured latency is not monotone
            # in the channel count (a 448-channel conv runs slower than the 512 one; 256 is
            # far faster), so one step at a time would never start cutting such a group
            nxt, steps_left = counts[gid], max(LOOKAHEAD, counts[gid] // (2 * max(multiple, 1)))
            for _ in range(steps_left):
                nxt = _step_down(nxt, multiple)
                if nxt < floors[gid]:
                    break
                trial = {**counts, gid: nxt}
                times = {layer.name: cost(layer, trial) for layer in by_group[gid]}
                gain = 0.0
                if "latency" in open_gaps:
                    gain += sum(current[n] - t for n, t in times.items()) / open_gaps["latency"]
                for name, (f, _) in budgets.items():
                    if name in open_gaps:
                        gain += sum(spent[name][layer.name] - f(layer, trial)
                                    for layer in by_group[gid]) / open_gaps[name]
                lost = float(lost_at[gid][nxt] - lost_at[gid][counts[gid]])  # >= 0: losses only grow
                value = gain / max(lost, 1e-12)
                if gain > 0 and value > best_value:
                    best, best_value, best_step = gid, value, (nxt, times)
        if best is None:  # nothing left that saves time
            break
        counts[best] = best_step[0]
        steps.append((best, best_step[0]))
        current.update(best_step[1])
        for name, (f, _) in budgets.items():
            spent[name].update({layer.name: f(layer, counts) for layer in by_group[best]})
        total = sum(current.values())
    info.update(predicted_ms=total, dense_ms=dense, floor_ms=floor, goal_ms=goal, steps=steps,
                other_ms=other, predicted_speedup=(dense + other) / (total + other) if total + other > 0 else float("inf"),
                objective="sensitivity" if losses else "importance",
                predicted_error=float(sum(lost_at[g][counts[g]] for g in group_ids)) if losses else None,
                calibration=None if cal is None else {"factors": dict(cal.factors), "overhead": cal.overhead,
                                                      "default": cal.default})
    logger.info("prune.structured (latency): predicted %.3f ms of %.3f ms dense (floor %.3f, goal %.3f); "
                "%d shapes measured", total, dense, floor, goal, table.measured)
    return counts


def _losses(analysis: ChannelAnalysis, group_ids, scores, losses, floors) -> dict[int, np.ndarray]:
    """loss[k] per group: the measured sensitivity where given; else the weighted log share
    of importance lost (`structured.importance_kept`'s), scaled, when some groups have a
    sensitivity, so that its median at the floor equals theirs (a common unit)."""
    out: dict[int, np.ndarray] = {}
    for gid in group_ids:
        s = np.sort(np.asarray(scores[gid], dtype=np.float64))[::-1]
        s = s if s.sum() > 0 else np.ones_like(s)
        share = np.concatenate([[0.0], np.cumsum(s)]) / s.sum()
        out[gid] = -np.log(np.maximum(share, 1e-12)) * group_weight(analysis.groups[gid])
    measured = {gid: np.asarray(losses[gid], dtype=np.float64) for gid in group_ids if losses and gid in losses}
    if measured:
        ratios = [measured[g][floors[g]] / out[g][floors[g]] for g in measured if out[g][floors[g]] > 0]
        scale = float(np.median(ratios)) if ratios else 1.0
        out = {gid: measured.get(gid, out[gid] * scale) for gid in group_ids}
    return out


def _budgets(model: Model, analysis: ChannelAnalysis, config, with_macs: bool) -> dict:
    """{name: (cost of a layer at given counts, cap on the model total)}: MACs (only with
    `target_speedup` and an explicit `target_macs`) and weight parameters (`target_params`)."""
    out = {}
    fields_set = getattr(config, "model_fields_set", None)
    target_macs = getattr(config, "target_macs", None)
    if with_macs and target_macs is not None and (fields_set is None or "target_macs" in fields_set):
        macs = dict(model.analysis("macs"))
        out["macs"] = (_scaled(analysis, macs), float(sum(macs.values())) * (1 - float(target_macs)))
    target_params = getattr(config, "target_params", None)
    if target_params is not None:
        params = _weight_params(model)
        out["params"] = (_scaled(analysis, params), float(sum(params.values())) * (1 - float(target_params)))
    return out


def _budget_rest(model: Model, layers: list[_Layer], name: str) -> float:
    """The part of budget `name` outside `layers` (fixed: no group changes it)."""
    inside = {layer.name for layer in layers}
    costs = dict(model.analysis("macs")) if name == "macs" else _weight_params(model)
    return float(sum(v for k, v in costs.items() if k not in inside))


def _weight_params(model: Model) -> dict[str, int]:
    from slimgraph.passes.prune.structured import _layer_params

    return _layer_params(model)


def _scaled(analysis: ChannelAnalysis, base: Mapping[str, float]):
    """A layer's `base` cost scaled by its kept input and output fractions (output only for
    depthwise layers), as `channels.estimate_macs` does for the whole model."""
    def f(layer: _Layer, counts: Mapping[int, int]) -> float:
        return estimate_macs(analysis, {layer.name: base.get(layer.name, 0)}, counts)
    return f


def predicted_latency(model: Model, analysis: ChannelAnalysis, counts: Mapping[int, int],
                      table: LatencyTable) -> float:
    """Predicted ms of the weight layers of `model` when group `g` keeps `counts[g]` channels."""
    layers = _layers(model, analysis, set(counts))
    return float(sum(_layer_latency(table, analysis, layer, counts) for layer in layers))

