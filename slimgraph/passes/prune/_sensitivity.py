"""Data-driven sensitivity of channel groups: what cutting a group costs the model's output.

A filter norm says how big a channel's weights are, not how much the model's output
depends on it: on MobileNetV2 the latency mode, trading the L1 share of importance, cut
the late weight-heavy layers and kept 0.46-0.67 mean logit cosine where MAC-driven pruning
at the same share kept 0.86-0.99 (benchmarks/results/prune.md). So, as in AMC / NetAdapt /
NNCF's sensitivity analysis, each group is cut *alone* to a few kept counts (its
lowest-scoring channels first, as the pass cuts them) and the model is run on calibration
inputs; the cost of keeping k channels is the relative squared error of the outputs,
sum ||y_k - y||^2 / sum ||y||^2 averaged over the samples. Squared errors of independent
cuts add up (to first order), so the latency greedy sums them over groups.

How a cut is simulated: removing channels is the same as zeroing the weights that read
them (the `consumer` slices: next convs' input columns, a Gemm's input rows). Those weight
tensors become graph inputs of one ORT session, fed masked per run, so a trial costs
`samples` runs of the model and no new session. A group no weight layer reads (it reaches
the outputs through pass-through ops) is zeroed at its producers (and depthwise filters)
instead. Ops that reduce over the channel axis (a LayerNorm over channels) see zeros
where the pruned model sees fewer channels: there the estimate is approximate.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from slimgraph.errors import DataError
from slimgraph.ir.model import Model
from slimgraph.passes.prune.channels import Group

logger = logging.getLogger("slimgraph.passes.prune")

#: kept fractions each group is measured at (besides its floor); linear in between
FRACTIONS = (0.75, 0.5, 0.25)
#: results per (model bytes, groups, scores, counts, inputs): a benchmark prunes one model
#: at several targets; the sensitivity does not depend on the target
_CACHE: dict[str, dict[int, np.ndarray]] = {}
_CACHE_SIZE = 8


def _mask_slices(group: Group) -> list[tuple[str, int, int, int, int]]:
    """(tensor name, axis, offset, factor, unit) of the tensors to zero to remove the
    group's channels: its readers' weights, else its producers' (see module docstring)."""
    units = group.units or [1] * len(group.slices)
    picked = [(s, off, u) for (s, off), u in zip(group.slices, units) if s.role == "consumer"]
    if not picked:
        picked = [(s, off, u) for (s, off), u in zip(group.slices, units) if s.role in ("producer", "depthwise")]
    seen, out = set(), []
    for s, off, unit in picked:
        key = (s.value.name, s.axis, off)
        if s.value is not None and s.value.name and key not in seen:
            seen.add(key)
            out.append((s.value.name, s.axis, off, s.factor, unit))
    return out


class MaskedRunner:
    """Runs `model` with chosen channels of `groups` removed (zeroed where they are read),
    all in one ORT session. `feeds`: the calibration inputs, one feed dict per run."""

    def __init__(self, model: Model, groups: Sequence[Group], feeds: Sequence[Mapping[str, np.ndarray]],
                 threads: int = 2):
        from slimgraph.backends import ort

        self.masks = {g.id: _mask_slices(g) for g in groups}
        names = {m[0] for ms in self.masks.values() for m in ms}
        proto = ort.self_contained_proto(model)
        self.weights = _lift(proto, names)
        # a group whose tensors could not be lifted (not a constant) cannot be simulated
        self.masks = {gid: ms for gid, ms in self.masks.items() if ms and all(m[0] in self.weights for m in ms)}
        self.session = ort.session(proto, threads=threads)
        self.feeds = [dict(f) for f in feeds]
        self.reference = [self._run(f, self.weights) for f in self.feeds]

    def _run(self, feed, weights) -> list[np.ndarray]:
        return [np.asarray(o, dtype=np.float64) for o in self.session.run(None, {**feed, **weights})]

    def masked_weights(self, removed: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
        """The lifted weights with channels `removed[g]` (indices) of each group zeroed."""
        out = dict(self.weights)
        for gid, channels in removed.items():
            channels = np.asarray(channels, dtype=np.int64)
            if gid not in self.masks or not len(channels):
                continue
            for name, axis, offset, factor, unit in self.masks[gid]:
                # group channel j owns entries [(offset + j*unit) * factor, (offset + (j+1)*unit) * factor)
                span = unit * factor
                index = ((offset + channels * unit) * factor)[:, None] + np.arange(span)[None, :]
                array = out[name] if out[name] is not self.weights[name] else self.weights[name].copy()
                moved = np.moveaxis(array, axis, 0)
                moved[index.ravel()] = 0
                out[name] = array
        return out

    def outputs(self, removed: Mapping[int, np.ndarray]) -> list[list[np.ndarray]]:
        weights = self.masked_weights(removed)
        return [self._run(f, weights) for f in self.feeds]

    def error(self, removed: Mapping[int, np.ndarray]) -> float:
        """Relative squared output error vs the whole model, averaged over the inputs."""
        errs = []
        for got, want in zip(self.outputs(removed), self.reference):
            num = sum(float(np.sum((g - w) ** 2)) for g, w in zip(got, want))
            den = sum(float(np.sum(w ** 2)) for w in want)
            errs.append(num / den if den > 0 else num)
        return float(np.mean(errs))

    def cosine(self, removed: Mapping[int, np.ndarray]) -> float:
        """Mean cosine similarity of the (flattened, concatenated) outputs to the whole model's."""
        cos = []
        for got, want in zip(self.outputs(removed), self.reference):
            g, w = np.concatenate([a.ravel() for a in got]), np.concatenate([a.ravel() for a in want])
            cos.append(float(g @ w / max(np.linalg.norm(g) * np.linalg.norm(w), 1e-30)))
        return float(np.mean(cos))


def _lift(proto: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    """Turn the initializers / Constant outputs named in `names` into graph inputs of
    `proto` (in place); returns their arrays."""
    graph = proto.graph
    weights: dict[str, np.ndarray] = {}
    keep = []
    for init in graph.initializer:
        if init.name in names:
            weights[init.name] = numpy_helper.to_array(init).copy()
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in names and node.output[0] not in weights:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                weights[node.output[0]] = numpy_helper.to_array(attr.t).copy()
                continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    existing = {i.name for i in graph.input}
    for name, array in weights.items():
        if name not in existing:
            elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            graph.input.append(onnx.helper.make_tensor_value_info(name, elem, list(array.shape)))
    return weights


def calibration_feeds(model: Model, data: Mapping[str, np.ndarray] | None, samples: int,
                      rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """`samples` single-sample feeds: rows of `data` when given, else standard-normal
    inputs (integer inputs need data: DataError). Dynamic dims are 1."""
    inputs = [v for v in model.graph.inputs if v.const_value is None]  # not initializer-backed
    if data:
        n = min(samples, min(len(a) for a in data.values()))
        return [{k: np.asarray(a[i:i + 1]) for k, a in data.items()} for i in range(n)]
    feeds = [{} for _ in range(samples)]
    for v in inputs:
        dtype = v.dtype.numpy() if v.dtype is not None else np.float32
        if not np.issubdtype(dtype, np.floating):
            raise DataError(f"input {v.name!r} is {dtype}: random inputs cannot stand in for it; "
                            "pass sample data (--data D.npz) or use objective=importance")
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in (v.shape or [])]
        for f in feeds:
            f[v.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def floor_count(size: int, config) -> int:
    """The fewest channels a group may keep: `min_keep` of it, `min_channels`, one
    `multiple` (rounded up to the multiple), never above the group."""
    multiple = int(getattr(config, "multiple", 1))
    floor = max(int(np.ceil(float(getattr(config, "min_keep", 0.0)) * size)), int(getattr(config, "min_channels", 1)), 1)
    if multiple > 1:
        floor = max(multiple, -(-floor // multiple) * multiple)
    return min(floor, size)


def measured_counts(size: int, floor: int, multiple: int) -> list[int]:
    """The kept counts a group is measured at: FRACTIONS of it, rounded down to the
    multiple and not below the floor, and the floor itself (descending, distinct)."""
    out = set()
    for f in FRACTIONS:
        k = int(np.floor(size * f + 1e-9))
        if multiple > 1:
            k = k // multiple * multiple
        out.add(max(k, floor))
    out.add(floor)
    return sorted((k for k in out if k < size), reverse=True)


def curve(size: int, points: Mapping[int, float]) -> np.ndarray:
    """loss[k] for k = 0..size: 0 at `size`, the measured `points` (count -> error),
    linear between them, flat below the lowest, never rising with k."""
    xs = np.array(sorted(set(points) | {size}), dtype=np.float64)
    ys = np.array([0.0 if x == size else points[int(x)] for x in xs])
    loss = np.interp(np.arange(size + 1), xs, ys)
    return np.maximum.accumulate(loss[::-1])[::-1]


def sensitivity(model: Model, groups: Sequence[Group], scores: Mapping[int, np.ndarray],
                floors: Mapping[int, int], multiple: int, feeds: Sequence[Mapping[str, np.ndarray]],
                threads: int = 2) -> dict[int, np.ndarray]:
    """{group id: loss[k], k = 0..size}: the relative squared output error when the group
    alone keeps its `k` best channels (by `scores`), measured at `measured_counts` and
    interpolated (`curve`). Groups that cannot be simulated are left out."""
    key = _key(model, groups, scores, floors, multiple, feeds)
    if key in _CACHE:
        return _CACHE[key]
    runner = MaskedRunner(model, groups, feeds, threads=threads)
    out = {}
    for g in groups:
        if g.id not in runner.masks:
            continue
        order = np.argsort(np.asarray(scores[g.id]), kind="stable")  # weakest first
        points = {k: runner.error({g.id: order[:g.size - k]})
                  for k in measured_counts(g.size, floors[g.id], multiple)}
        out[g.id] = curve(g.size, points)
    skipped = len(groups) - len(out)
    logger.info("sensitivity: %d groups measured on %d inputs (%d left to importance)", len(out), len(feeds), skipped)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = out
    return out


def _key(model, groups, scores, floors, multiple, feeds) -> str:
    h = hashlib.sha1(model.to_bytes())
    for g in groups:
        h.update(f"{g.id}:{g.size}:{floors[g.id]};".encode())
        h.update(np.asarray(scores[g.id], dtype=np.float64).tobytes())
    h.update(str(multiple).encode())
    for f in feeds:
        for k in sorted(f):
            h.update(k.encode() + np.ascontiguousarray(f[k]).tobytes())
    return h.hexdigest()
