"""cluster.share: weight sharing across layers.

1. Identical tensors (same dtype, shape and bytes; exporters duplicate tied embeddings,
   repeated constants, copies of one block) become one initializer: exact.
2. Near-identical tensors: with `tolerance > 0`, a tensor whose relative L2 distance to an
   earlier tensor of the same shape is at most `tolerance` (‖a − b‖ / ‖b‖) reads that
   tensor instead. Pairs whose norms differ by more than the tolerance are skipped before
   the distance is computed (|‖a‖ − ‖b‖| <= ‖a − b‖), so many same-shaped layers stay fast.
3. Hashed sharing (`hashed: true`, HashedNets-style): each selected weight of n elements is
   rebuilt from `buckets = ceil(n * bucket_ratio)` shared values, element i reading bucket
   h(i) = ((i * a + c) mod p) mod buckets with a universal hash; each bucket holds the mean
   of the weights hashing to it. Only the buckets are stored: the indices are computed in
   the graph (Range, Mul, Add, Mod, Gather), from initializers only, so ONNX Runtime folds
   them at session creation. Lossy (without retraining it costs accuracy: stats report the
   relative error per layer) and a storage format, so it runs last with the pack passes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, float_range, register_pass
from slimgraph.passes.cluster._select import PACK_KEY, prepend, select
from slimgraph.passes.quantize._weights import _attr

HASH_PRIME = 2_147_483_647  # 2^31 - 1: i * a stays below 2^62 for n < 2^31


@register_pass
class ClusterShare(Pass):
    """Share identical / near-identical tensors across layers (one initializer), or hash weights into shared buckets."""

    name = "cluster.share"
    exact = False  # exact when tolerance == 0 and not hashed

    class Config(PassConfig):
        #: relative L2 distance under which two same-shaped tensors become one (0: identical only)
        tolerance: float = float_range(0.0, 0.5, default=0.0)
        #: tensors smaller than this are left alone (biases, scalars: sharing saves nothing)
        min_size: int = 16
        #: HashedNets-style hashed sharing of the layer weights
        hashed: bool = choice(False, True, default=False)
        #: buckets per weight element with `hashed`
        bucket_ratio: float = float_range(0.01, 1.0, default=0.25, log=True)
        #: patterns of layers left alone by `hashed`
        exclude: tuple[str, ...] = ()

    def run(self, model: Model, ctx) -> PassResult:
        cfg = self.config
        if cfg.hashed:
            return self._hash(model, ctx)
        shared, saved, worst = self._share(model)
        return PassResult(model, bool(shared), {"shared": len(shared), "bytes_saved": saved,
                                                "worst_rel_distance": f"{worst:.2e}",
                                                "table": shared})

    # -- identical / near-identical -------------------------------------------------------
    def _share(self, model: Model) -> tuple[list[dict], int, float]:
        tol = self.config.tolerance
        outputs = {v.name for v in model.graph.outputs}
        inputs = {v.name for v in model.graph.inputs}
        keep: dict[tuple, list[tuple[ir.Value, np.ndarray, float]]] = {}
        rows, saved, worst = [], 0, 0.0
        for name, value in list(model.graph.initializers.items()):
            tensor = value.const_value
            if tensor is None or name in inputs or name in outputs or tensor.size < self.config.min_size:
                continue
            array = tensor.numpy()
            key = (array.dtype.str, array.shape)
            norm = float(np.linalg.norm(array.astype(np.float64))) if array.dtype.kind == "f" else 0.0
            match, distance = None, 0.0
            for other, other_array, other_norm in keep.get(key, []):
                if array.tobytes() == other_array.tobytes():
                    match = other
                    break
                if tol > 0 and array.dtype.kind == "f" and other_norm > 0:
                    # |‖a‖ − ‖b‖| <= ‖a − b‖: skip pairs whose norms already differ too much
                    if abs(norm - other_norm) > tol * other_norm:
                        continue
                    d = float(np.linalg.norm((array - other_array).astype(np.float64)) / other_norm)
                    if d <= tol:
                        match, distance = other, d
                        break
            if match is None:
                keep.setdefault(key, []).append((value, array, norm))
                continue
            value.replace_all_uses_with(match)
            model.graph.initializers.pop(name)
            saved += array.nbytes
            worst = max(worst, distance)
            rows.append({"tensor": name, "now reads": match.name, "shape": "x".join(map(str, array.shape)),
                         "rel. distance": f"{distance:.2e}", "bytes saved": array.nbytes})
        return rows, saved, worst

    # -- hashed ---------------------------------------------------------------------------
    def _hash(self, model: Model, ctx) -> PassResult:
        cfg = self.config
        targets = select(model, min_size=max(cfg.min_size, 64), embeddings=False, exclude=cfg.exclude, where=self.name)
        if not targets:
            return PassResult(model, False, {"hashed": 0})
        rng = ctx.rng()
        nodes, rows = [], []
        for t in targets:
            n = t.array.size
            buckets = max(2, math.ceil(n * cfg.bucket_ratio))
            a, c = int(rng.integers(1, HASH_PRIME)), int(rng.integers(0, HASH_PRIME))
            h = bucket_index(n, a, c, buckets)
            flat = t.array.reshape(-1).astype(np.float64)
            counts = np.bincount(h, minlength=buckets)
            values = np.bincount(h, weights=flat, minlength=buckets) / np.maximum(counts, 1)
            rebuilt = values[h].astype(t.array.dtype)
            err = float(np.linalg.norm(rebuilt - flat) / (np.linalg.norm(flat) + 1e-30))
            nodes += _hash_decoder(model, t.value, t.array.shape, values.astype(t.array.dtype), a, c, buckets)
            rows.append({"layer": t.layer, "shape": "x".join(map(str, t.array.shape)), "buckets": buckets,
                         "bytes": f"{t.array.nbytes} -> {values.astype(t.array.dtype).nbytes}",
                         "rel. error": f"{err:.4f}"})
        prepend(model, nodes)
        return PassResult(model, True, {"hashed": len(rows), "table": rows})


def bucket_index(n: int, a: int, c: int, buckets: int) -> np.ndarray:
    """h(i) = ((i * a + c) mod p) mod buckets, as the decode subgraph computes it in int64."""
    i = np.arange(n, dtype=np.int64)
    return ((i * a + c) % HASH_PRIME) % buckets


def _hash_decoder(model: Model, value: ir.Value, shape: tuple[int, ...], values: np.ndarray,
                  a: int, c: int, buckets: int) -> list[ir.Node]:
    """Nodes rebuilding `value` from its buckets; the last one takes over its name."""
    name = value.name
    graph = model.graph

    def init(array: np.ndarray, suffix: str) -> ir.Value:
        t = ir.tensor(np.asarray(array), name=f"{name}_{suffix}")
        v = ir.Value(name=t.name, const_value=t, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype))
        graph.register_initializer(v)
        return v

    steps = [("Range", [init(np.array(0, np.int64), "h0"), init(np.array(int(np.prod(shape)), np.int64), "hn"),
                        init(np.array(1, np.int64), "h1")]),
             ("Mul", [None, init(np.array(a, np.int64), "ha")]),
             ("Add", [None, init(np.array(c, np.int64), "hc")]),
             ("Mod", [None, init(np.array(HASH_PRIME, np.int64), "hp")]),
             ("Mod", [None, init(np.array(buckets, np.int64), "hb")])]
    nodes, prev = [], None
    for i, (op, inputs) in enumerate(steps):
        node = ir.Node("", op, [prev if x is None else x for x in inputs], name=f"{name}_hash{i}")
        node.outputs[0].name = f"{name}_hash{i}"
        nodes.append(node)
        prev = node.outputs[0]
    gather = ir.Node("", "Gather", [init(values, "buckets"), prev], [_attr("axis", 0)], name=f"{name}_hash_gather")
    gather.outputs[0].name = f"{name}_hash_flat"
    reshape = ir.Node("", "Reshape", [gather.outputs[0], init(np.array(shape, np.int64), "hshape")], name=f"{name}_hash")
    reshape.metadata_props[PACK_KEY] = f"hashed:{name}"
    nodes += [gather, reshape]
    graph.initializers.pop(name)
    value.name = f"{name}__dense"
    out = reshape.outputs[0]
    out.name, out.shape, out.type = name, ir.Shape(shape), value.type
    value.replace_all_uses_with(out)
    return nodes
