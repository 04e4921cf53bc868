"""pack.clusters: store weights that take few distinct values as packed indices + codebook.

After `cluster.kmeans` a weight takes at most K values per tensor or per channel; after
int8 quantization of a clustered model, still at most K int8 values per channel. This
pass finds every such initializer by content (no annotation needed, so it also packs
what other tools produced) and replaces it by

    codebook [C, K] (the weight's dtype: float32/16, int8, uint8), indices packed to
    b = ceil(log2 K) bits (1 to 8) in a uint8 stream, and a small decode subgraph of
    standard ops: Cast(packed -> int32) -> Div + Mod (the b-bit fields; for b not dividing
    8 single bits weighed by Mul + ReduceSum) -> Reshape -> Slice -> (+ channel offsets)
    -> Gather(codebook) -> Reshape (-> Transpose)

whose inputs are all initializers, so ONNX Runtime folds it at session creation: the file
is small, the graph ORT runs is the plain dense one (tests compare ORT's optimized graphs).
The decoded tensor keeps the weight's name. The decode output of `pack.sparse` (the
non-zero values of a pruned weight) is an ordinary initializer, so pruned + clustered
weights become bitmask + packed indices of the non-zeros when `pack.sparse` runs first.

Exact: the decoded tensor is bit-identical to the original (checked before replacing).
`unpack` folds these subgraphs back into plain initializers.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassResult, int_range, register_pass
from slimgraph.passes.cluster._select import distinct_per_row, prepend
from slimgraph.passes.pack._decode import AFTER_WEIGHT_PASSES, DecodeBuilder, pack_codes

KIND = "clusters"
PACKABLE = {np.dtype(t) for t in (np.float32, np.float16, np.int8, np.uint8)}
#: op type -> (weight input index, channel axis of that weight); weights read by other ops
#: (or by nobody but a decode subgraph) are packed per tensor
CHANNEL_AXIS = {"Conv": (1, 0), "ConvTranspose": (1, 1), "QLinearConv": (3, 0), "MatMul": (1, -1),
                "MatMulInteger": (1, -1), "DynamicQuantizeMatMul": (1, -1), "Gather": (0, 1)}


def bits_for(k: int) -> int:
    """Index width: ceil(log2 K) bits, 1 to 8 (codes may straddle bytes)."""
    return max(1, math.ceil(math.log2(max(k, 2))))


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """The indices as a little-endian stream of `bits`-bit codes (see `pack_codes`)."""
    return pack_codes(indices, bits)


def codebook(array: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(codebook [C, K], indices [C, n/C]) of `array` with rows along `axis` (None: one row),
    or None when some row has more than 256 values."""
    rows = array.reshape(1, -1) if axis is None else np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    k = int(distinct_per_row(rows).max())
    if k > 256:
        return None
    # per-row np.unique, vectorised (a [5M, 1] value vector would be 5M calls): code each
    # element by its global distinct value, then rank the distinct (row, code) pairs in a row
    values, codes = np.unique(rows, return_inverse=True)
    n_rows, g = rows.shape[0], max(len(values), 1)
    keys = np.arange(n_rows, dtype=np.int64)[:, None] * g + codes.reshape(rows.shape)
    pairs, pair_of = np.unique(keys, return_inverse=True)
    pair_row = pairs // g
    rank = np.arange(len(pairs)) - np.searchsorted(pair_row, pair_row, side="left")
    books = np.empty((n_rows, k), dtype=array.dtype)
    books[:] = values[pairs[np.searchsorted(pair_row, np.arange(n_rows), side="right") - 1] % g][:, None]
    books[pair_row, rank] = values[pairs % g]  # each row's values ascending, padded with its largest
    indices = rank[pair_of].reshape(rows.shape).astype(np.int64)
    return books, indices


def packed_bytes(n: int, c: int, k: int, itemsize: int) -> int:
    return math.ceil(n * bits_for(k) / 8) + c * k * itemsize


def _axis_of(model: Model, value: ir.Value) -> int | None:
    """The channel axis when every reader agrees on one, else None (pack per tensor)."""
    axes = set()
    for use in value.uses():
        node = use.node
        spec = CHANNEL_AXIS.get(node.op_type)
        if node.op_type == "Gemm" and use.idx == 1:
            spec = (1, 0 if node.attributes.get_int("transB", 0) else 1)
        if spec is None or spec[0] != use.idx:
            return None
        axes.add(spec[1] % len(value.const_value.shape))
    return axes.pop() if len(axes) == 1 else None


class _Builder(DecodeBuilder):
    def __init__(self, model: Model):
        super().__init__(model, KIND, "pk")

    def decode(self, name: str, shape: tuple[int, ...], axis: int | None, books: np.ndarray,
               indices: np.ndarray, dtype: np.dtype) -> ir.Value:
        c, k = books.shape
        bits = bits_for(k)
        n = indices.size
        idx = self.codes(pack_indices(indices, bits), f"{name}_packed{bits}", n, bits, name)
        if c > 1:
            idx = self.node("Reshape", [idx, self.init(np.array([c, n // c], np.int64), f"{name}_rows")], name)
            idx = self.node("Add", [idx, self.init((np.arange(c, dtype=np.int32) * k)[:, None], f"{name}_offsets")], name)
        flat_book = self.init(books.reshape(-1).astype(dtype), f"{name}_codebook")
        values = self.node("Gather", [flat_book, idx], name)
        moved = shape if axis is None else tuple(np.moveaxis(np.empty(shape, np.uint8), axis, 0).shape)
        final = axis is None or axis == 0
        values = self.node("Reshape", [values, self.init(np.array(moved, np.int64), f"{name}_shape")], name,
                           out_name=name if final else None)
        if not final:
            perm = list(range(1, axis + 1)) + [0] + list(range(axis + 1, len(shape)))
            values = self.node("Transpose", [values], name, out_name=name, perm=perm)
        return values


@register_pass
class PackClusters(Pass):
    """Store few-valued weights as packed 1/2/4/8-bit indices + codebook, decoded by ORT at load (exact)."""

    name = "pack.clusters"
    # after every transforming pass (fold_constants would fold the decoders back), and after
    # pack.sparse, whose non-zero value vectors it packs in turn
    after = (*AFTER_WEIGHT_PASSES, "pack.sparse")

    class Config(PassConfig):
        #: tensors smaller than this stay as they are
        min_size: int = int_range(1, 1 << 30, default=256, log=True)
        #: pack only when the packed form is at most this fraction of the raw bytes
        max_ratio: float = 0.75

    def run(self, model: Model, ctx) -> PassResult:
        cfg = self.config
        builder = _Builder(model)
        table, before, after = [], 0, 0
        graph_inputs = {v.name for v in model.graph.inputs}
        for name, value in list(model.graph.initializers.items()):
            tensor = value.const_value
            if (tensor is None or name in graph_inputs or value.is_graph_output() or not value.uses()
                    or tensor.size < cfg.min_size):
                continue
            array = tensor.numpy()
            if array.dtype not in PACKABLE or array.ndim == 0 or name.startswith("slimgraph_"):
                continue
            axis = _axis_of(model, value)
            best = None
            for ax in ([axis] if axis is not None else []) + [None]:
                found = codebook(array, ax)
                if found is not None:
                    size = packed_bytes(array.size, *found[0].shape, array.itemsize)
                    if best is None or size < best[0]:
                        best = (size, ax, *found)
            if best is None or best[0] > cfg.max_ratio * array.nbytes:
                continue
            size, ax, books, indices = best
            self._replace(model, builder, value, array, ax, books, indices)
            before, after = before + array.nbytes, after + size
            table.append({"tensor": name, "shape": "x".join(map(str, array.shape)), "dtype": str(array.dtype),
                          "K": books.shape[1], "codebooks": books.shape[0], "bits": bits_for(books.shape[1]),
                          "bytes": f"{array.nbytes} -> {size}"})
        if not table:
            return PassResult(model, False, {"packed": 0})
        prepend(model, builder.nodes)
        return PassResult(model, True, {"packed": len(table), "bytes": f"{before} -> {after}", "table": table})

    @staticmethod
    def _replace(model: Model, builder: _Builder, value: ir.Value, array: np.ndarray, axis: int | None,
                 books: np.ndarray, indices: np.ndarray) -> None:
        name = value.name
        # exactness check before touching the graph: the decode must give back the very bits
        rebuilt = np.take_along_axis(books, indices, axis=1)
        moved = rebuilt.reshape(array.shape if axis is None else np.moveaxis(array, axis, 0).shape)
        rebuilt = moved if axis is None else np.moveaxis(moved, 0, axis)
        if np.ascontiguousarray(rebuilt).tobytes() != np.ascontiguousarray(array).tobytes():
            raise RuntimeError(f"codebook of {name!r} does not rebuild it bit for bit")
        model.graph.initializers.pop(name)
        value.name = f"{name}__dense"
        decoded = builder.decode(name, array.shape, axis, books, indices, array.dtype)
        decoded.shape, decoded.type = ir.Shape(array.shape), ir.TensorType(value.const_value.dtype)
        value.replace_all_uses_with(decoded)
