"""cluster.kmeans: k-means weight clustering (weight sharing within a tensor or channel).

Every selected weight (Conv / ConvTranspose / Gemm / MatMul weights that are constants,
and Gather embedding tables) is replaced by its nearest centroid, with one codebook of K
values per tensor or per output channel. The model stays a plain dense float model (any
later pass and any runtime can read it); `pack.clusters` then stores each clustered
tensor as packed indices + codebook, which is where the file gets small, and the int8
recipes quantize the centroids (a monotone map, so a channel still takes at most K values).

Pruned zeros stay exactly zero (`preserve_zeros`): zeros are left out of the clustering
and the non-zeros get K - 1 centroids, so the zero value plus the codebook is still K
values. A "clusters" contract records each clustered tensor's shape, K and axis; the
PassManager fails any later pass that leaves a recorded tensor with more than K distinct
values per channel (e.g. cross-layer equalization, which rescales input channels).
"""

from __future__ import annotations

import math

import numpy as np

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes import contracts
from slimgraph.passes.base import Pass, PassConfig, PassContext, PassResult, choice, int_range, register_pass
from slimgraph.passes.cluster import _gptq, _kmeans1d
from slimgraph.passes.cluster._select import Target, distinct_per_row, packed_shapes, select, set_weight

CONTRACT = "clusters"


@register_pass
class ClusterKMeans(Pass):
    """k-means weight clustering: each weight tensor or channel takes at most K shared values."""

    name = "cluster.kmeans"
    exact = False
    # BatchNorm folding and equalization rescale channels (a per-tensor codebook would become
    # one per channel), so they come first; quantizers map the codebook, so they come after.
    after = ("fold_batchnorm", "quantize.equalize", "quantize.smoothquant", "prune.*")
    before = ("pack.*", "quantize.static", "quantize.dynamic", "quantize.weight_only", "quantize.fp8")

    class Config(PassConfig):
        #: values per codebook (2-256); 16 packs to 4 bits, 4 to 2 bits
        k: int = int_range(2, 256, default=16, log=True)
        #: one codebook per output channel ("channel") or per tensor
        granularity: str = choice("channel", "tensor", default="channel")
        #: centroid initialisation
        init: str = choice("kmeans++", "linear", "density", default="kmeans++")
        #: Lloyd iterations (early stop on convergence)
        iterations: int = int_range(1, 300, default=25)
        #: weights with fewer elements stay as they are
        min_size: int = 1024
        #: also cluster Gather tables (embeddings)
        embeddings: bool = True
        #: pruned zeros stay exactly zero (zeros are not clustered)
        preserve_zeros: bool = True
        #: fnmatch patterns of node names, op types, torch module paths or weight names to leave alone
        exclude: tuple[str, ...] = ()
        #: "activation": weight each element's error by the mean square of the input it
        #: multiplies (needs --data); "auto": that when data is given, else "none"
        weighting: str = choice("auto", "activation", "none", default="auto")
        #: with data, round MatMul/Gemm weights onto their codebooks by GPTQ (output error)
        gptq: bool = choice(True, False, default=True)
        #: samples of the data used for the activation statistics
        samples: int = int_range(1, 100_000, default=64, log=True)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        targets = select(model, min_size=cfg.min_size, embeddings=cfg.embeddings, exclude=cfg.exclude,
                         where=self.name)
        if not targets:
            return PassResult(model, False, {"layers": 0})
        rng = ctx.rng()
        stats = self._statistics(model, ctx, targets)
        table, records = [], []
        total_before = total_after = 0
        for t in _progress(targets, ctx.progress, f"{self.name}: k={cfg.k}"):
            if cfg.k > t.array.size:
                raise PassError(self.name, f"k={cfg.k} is larger than the {t.array.size} weights of layer "
                                f"{t.layer!r} (weight {t.value.name!r}); lower k or exclude the layer")
            granularity = cfg.granularity
            if granularity == "channel" and t.rows("channel").shape[1] < 2 * cfg.k:
                granularity = "tensor"  # channels shorter than ~2K values: per-channel codebooks cost more than they save
            rows = t.rows(granularity)
            weights = self._element_weights(t, stats.get(t.value.name))
            clustered, centroids = self._cluster(rows, rng, None if weights is None else t.rows_of(weights, granularity))
            new = t.from_rows(clustered, granularity)
            hessian = stats.get(t.value.name)
            method = "k-means"
            if hessian is not None and hessian.ndim == 2 and granularity == "channel" and cfg.gptq:
                # output-error rounding onto the same codebooks: w oriented [K, N] for x @ w
                transposed = t.input_axis == 1  # Gemm transB: [N, K]
                w = t.array.T if transposed else t.array
                books = centroids if centroids.shape[0] == w.shape[1] else None
                if books is not None:
                    q = _gptq.gptq_codebook(w, hessian, books, keep_zeros=cfg.preserve_zeros)
                    new, method = (q.T if transposed else q), "k-means + GPTQ"
            err = float(np.linalg.norm(new - t.array) / (np.linalg.norm(t.array) + 1e-30))
            set_weight(model, t, new)
            records.append({"id": t.value.name, "shape": list(new.shape), "k": cfg.k,
                            "axis": t.channel_axis, "per": granularity})
            bits = max(1, math.ceil(math.log2(cfg.k)))
            before = t.array.nbytes
            after = math.ceil(new.size * bits / 8) + rows.shape[0] * cfg.k * 4
            total_before, total_after = total_before + before, total_after + after
            table.append({"layer": t.layer, "op": t.op, "shape": "x".join(map(str, new.shape)),
                          "K": cfg.k, "codebooks": f"{rows.shape[0]} ({granularity})", "method": method,
                          "bytes": f"{before} -> {after} (packed)",
                          "rel. error": f"{err:.4f}"})
        for record in records:
            contracts.add(model, CONTRACT, record)
        stats = {"layers": len(targets), "k": cfg.k, "granularity": cfg.granularity,
                 "bytes_packed_estimate": f"{total_before} -> {total_after}", "table": table}
        return PassResult(model, True, stats)

    def _statistics(self, model: Model, ctx: PassContext, targets: list[Target]) -> dict[str, np.ndarray]:
        """Per weight: H = E[x x^T] of the input of a 2-D MatMul/Gemm weight [K, K] (for GPTQ
        and, by its diagonal, the weighting), or the mean square of each input channel of a
        Conv [Cin]. None of it without data."""
        cfg = self.config
        if cfg.weighting == "none" or (cfg.weighting == "auto" and not ctx.data):
            return {}
        if not ctx.data:
            raise PassError(self.name, "weighting: activation needs sample data (--data D.npz)")
        from slimgraph import data as sg_data
        from slimgraph.passes.quantize.observers import stream

        wanted = {t.value.name: (t.node.inputs[0].name, t.input_axis) for t in targets if t.input_axis is not None}
        inputs = {v.name for v in model.graph.inputs}
        acts = sorted({a for a, _ in wanted.values()})
        full = {a for name, (a, _) in wanted.items() if _is_matrix(targets, name)}
        n = min(cfg.samples, min(len(v) for v in ctx.data.values()))
        data = {k: np.asarray(v)[:n] for k, v in ctx.data.items() if k in sg_data.input_ranks(model)}
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for _, feeds, outputs in stream(model, data, [a for a in acts if a not in inputs], progress=ctx.progress,
                                        description=f"{self.name}: input statistics of {len(acts)} layers",
                                        where=self.name):
            for name in acts:
                x = outputs[name] if name in outputs else feeds.get(name)
                if x is None:
                    continue
                axis = 1 if x.ndim == 4 else x.ndim - 1  # NCHW conv input / [..., K] matmul input
                flat = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
                stat = flat.T @ flat if name in full else (flat ** 2).sum(0)
                sums[name] = sums.get(name, 0) + stat
                counts[name] = counts.get(name, 0) + len(flat)
        return {w: sums[a] / counts[a] for w, (a, _) in wanted.items() if a in sums}

    def _element_weights(self, t: Target, stat: np.ndarray | None) -> np.ndarray | None:
        """The input power of the channel each element multiplies, broadcast to the weight."""
        if stat is None:
            return None
        ms = np.diag(stat) if stat.ndim == 2 else stat
        axis = t.input_axis
        if axis is None or ms.size != t.array.shape[axis]:
            return None
        shape = [1] * t.array.ndim
        shape[axis] = ms.size
        return np.broadcast_to((ms / (ms.mean() + 1e-30) + 1e-6).reshape(shape), t.array.shape)

    def _cluster(self, rows: np.ndarray, rng: np.random.Generator,
                 weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(clustered rows, centroids [R, K or K-1]) for rows [R, n]."""
        cfg = self.config
        zeros = rows == 0
        keep_zero = cfg.preserve_zeros and zeros.any()
        data = np.where(zeros, np.nan, rows) if keep_zero else rows.astype(np.float64)
        k = cfg.k - 1 if keep_zero else cfg.k
        if k < 1:
            raise PassError(self.name, "k=2 with preserve_zeros leaves one centroid for the non-zeros; use k >= 3")
        centroids, labels = _kmeans1d.fit(data, k, init=cfg.init, rng=rng, iterations=cfg.iterations, weights=weights)
        out = np.take_along_axis(centroids, np.maximum(labels, 0), axis=1)
        if keep_zero:
            out = np.where(labels < 0, 0.0, out)
        return out.astype(rows.dtype), centroids


def _progress(targets: list[Target], enabled: bool, description: str):
    """Iterate over the layers with a rich progress bar weighted by their sizes."""
    if not enabled:
        yield from targets
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[layer]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=sum(t.array.size for t in targets), layer="")
        for t in targets:
            bar.update(task, layer=t.layer[-40:])
            yield t
            bar.update(task, advance=t.array.size)


def _is_matrix(targets: list[Target], name: str) -> bool:
    t = next(t for t in targets if t.value.name == name)
    return t.op in ("MatMul", "Gemm") and t.array.ndim == 2


@contracts.check_for(CONTRACT)
def _clusters_hold(model: Model, record: dict) -> str | None:
    """Some constant of the recorded shape still takes at most K values per channel.
    Integer lowerings may store the weight transposed (QGemm) or with zero-padded input
    channels (QLinearConv of a 3-channel stem): those count, read back to the recorded shape."""
    shape = tuple(record["shape"])
    k, axis = record["k"], record["axis"]
    fewest = None
    values = model.graph.initializers
    named = values.get(record["id"])
    # the recorded tensor first (usually still there under its name), then any of the shape
    for value in ([named] if named is not None else []) + [v for v in values.values() if v is not named]:
        if value.const_value is None or len(value.const_value.shape) != len(shape):
            continue
        for view, (array, ax) in enumerate(_views(value.const_value, shape, axis)):
            worst = _worst_channel(value.const_value, view, array, ax)
            if worst <= k:
                return None
            fewest = worst if fewest is None else min(fewest, worst)
    if fewest is None:
        if any(len(p) == len(shape) and p[0] == shape[0] and all(a >= b for a, b in zip(p, shape))
               for p in packed_shapes(model)):
            return None  # stored packed (maybe channel-padded): the pack passes are exact and run last
        return f"no weight of shape {list(shape)} is left (was {record['id']!r})"
    return f"weight {record['id']!r} ({list(shape)}) now takes {fewest} values per channel, more than k={k}"


#: id(tensor) -> (tensor, view, distinct values in its fullest channel): contracts are checked
#: after every pass, and most weights are the same tensor objects from one pass to the next
#: (the tensor is held, so its id cannot be reused while cached)
_WORST: dict[tuple[int, int], tuple[object, int]] = {}


def _worst_channel(tensor, view: int, array: np.ndarray, axis: int) -> int:
    """Distinct values in the channel that has most (per channel even for a per-tensor
    codebook: per-channel quantization maps each channel on its own scale)."""
    key = (id(tensor), view)
    hit = _WORST.get(key)
    if hit is not None and hit[0] is tensor:
        return hit[1]
    worst = int(distinct_per_row(np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)).max())
    if len(_WORST) > 1024:
        _WORST.clear()
    _WORST[key] = (tensor, worst)
    return worst


def _views(tensor, shape: tuple[int, ...], axis: int):
    """(array cut to `shape`, channel axis) for each way `tensor` can hold the recorded weight."""
    dims = tuple(tensor.shape)
    if dims == shape:
        yield tensor.numpy(), axis
    elif len(shape) == 2 and dims == shape[::-1]:
        yield tensor.numpy().T, axis
    elif dims[0] == shape[0] and all(d >= s for d, s in zip(dims, shape)):
        yield tensor.numpy()[tuple(slice(0, s) for s in shape)], axis
