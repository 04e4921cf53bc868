"""pack.sparse: store mostly-zero weights as a bitmask plus the non-zero values (exact).

A pruned weight W (n elements, k of them not zero) becomes two initializers: `mask`, n
bits packed little-endian into ceil(n / 8) uint8 bytes, and `values`, the k non-zero
elements in order with the zero prepended, plus a decode subgraph of standard ops (opset
>= 11) whose inputs are all initializers:

    Cast(mask [nb, 1] -> int32) -> Div([1, 2, 4, ..., 128]) -> Mod(2)  [nb, 8] bits
    -> Reshape([-1]) (-> Slice to n) -> CumSum(axis 0)  [1..k at the set bits]
    -> Mul(bits)  [0 where the bit is clear] -> Gather(values) -> Reshape(W's shape) = W

(arithmetic rather than BitShift/BitwiseAnd, which need opset 11/18 and a uint8 type ORT's
CumSum lacks; rather than a [256, 8] lookup table, which costs 8 KB per model)

ONNX Runtime's constant folding evaluates it at session creation, so the graph ORT runs
is the dense model's (tests compare ORT's optimized graphs): the file is small, latency
and outputs are unchanged. The last decode node carries `metadata_props["slimgraph.pack"]
= "sparse:<W>"` (the others have short names `ps<i>`); `unpack` folds the subgraph back
into a plain initializer.

Positions can instead be stored as gaps between successive non-zeros (`encoding=gaps`, the
Deep Compression paper's relative indices, see `_gaps`: b-bit codes with filler entries
for longer gaps, decoded by CumSum + ScatterElements), which costs less than the bitmask
above ~80-85% zeros; `auto` (the default) picks the smaller per tensor. With `bundle=true`
every tensor of at most 256 distinct non-zero values joins one shared decode whose codes
carry the gap and the index of the value in the tensor's codebook (see `_bundle`): one
decode subgraph per model instead of one per tensor, for small models whose graph
structure outweighs their weights.

What is packed: every initializer read by a node (not a graph input or output) of at
least `min_size` elements, of dtype float32 / float16 / float64 / int8 / uint8, whose
packed form (mask + values + the small shape constants) is smaller than its raw bytes and
whose fraction of "zeros" is at least `min_sparsity`. For float32 that is about >= 3.2%
zeros (n/8 + 4 (k + 1) < 4 n). A float zero is +0.0 by bits (-0.0 is kept as a value, so
decoding is bit-exact); for 8-bit integer weights the background value is the most
frequent one, which is the zero point of a pruned quantized weight (0 for slimgraph's
symmetric int8 weights, 128 for uint8 embedding blocks).

Order: this pass must come after every pass that transforms weights (a later
`fold_constants` would fold the decoders back into dense tensors): `after =
_decode.AFTER_WEIGHT_PASSES`;
`pack.clusters` then packs the value vectors further.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, float_range, int_range, register_pass
from slimgraph.passes.cluster._select import distinct_per_row, prepend
from slimgraph.passes.pack import _bundle, _gaps
from slimgraph.passes.pack._decode import AFTER_WEIGHT_PASSES, DecodeBuilder, pack_codes
from slimgraph.passes.pack.unpack import pack_nodes

KIND = "sparse"
PACKABLE = {np.dtype(t) for t in (np.float32, np.float16, np.float64, np.int8, np.uint8)}
#: the fixed bytes of a decode subgraph's small initializers (shape, slice bounds, axis)
OVERHEAD = 64
#: what the gap decode's extra nodes and constants add to that
GAPS_OVERHEAD = 160


def background(array: np.ndarray) -> np.ndarray:
    """The value left out of `values` (a 0-D array of the weight's dtype)."""
    if array.dtype.kind == "f":
        return np.zeros((), array.dtype)
    counts = np.bincount(array.view(np.uint8).ravel(), minlength=256)
    return np.array(int(np.argmax(counts)), np.uint8).view(array.dtype).reshape(())


def split(array: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bitmask uint8 [ceil(n/8)], values [k + 1] with the background first, keep [n] bool);
    elements are compared by bits, so -0.0 and NaN payloads survive."""
    bg = background(array)
    uint = np.dtype(f"u{array.itemsize}")
    flat = np.ascontiguousarray(array).ravel()
    keep = flat.view(uint) != bg.view(uint)
    values = np.concatenate([bg.reshape(1), flat[keep]])
    return np.packbits(keep, bitorder="little"), values, keep


def packed_nbytes(n: int, k: int, itemsize: int, ndim: int) -> int:
    """Bytes of the packed form of an n-element tensor with k kept elements."""
    return -(-n // 8) + (k + 1) * itemsize + 8 * ndim + OVERHEAD


def rebuild(mask: np.ndarray, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """What the decode subgraph computes, in numpy."""
    n = int(np.prod(shape))
    bits = np.unpackbits(mask, bitorder="little")[:n].astype(np.int64)
    return values[np.cumsum(bits) * bits].reshape(shape)


class _Builder(DecodeBuilder):
    def __init__(self, model: Model):
        super().__init__(model, KIND, "ps")

    def decode(self, name: str, shape: tuple[int, ...], mask: np.ndarray, values: np.ndarray) -> ir.Value:
        n = int(np.prod(shape))
        byte = self.node("Cast", [self.init(mask.reshape(-1, 1), f"{name}_mask")], name, to=int(ir.DataType.INT32))
        bits = self.node("Div", [byte, self.constant(1 << np.arange(8, dtype=np.int32), "slimgraph_unpack_bit_values")], name)
        bits = self.node("Mod", [bits, self.constant(np.array(2, np.int32), "slimgraph_unpack_two")], name)
        bits = self.node("Reshape", [bits, self.constant(np.array([-1], np.int64), "slimgraph_unpack_flat")], name)
        if mask.size * 8 != n:
            bits = self.node("Slice", [bits, self.init(np.array([0], np.int64), f"{name}_start"),
                                       self.init(np.array([n], np.int64), f"{name}_end")], name)
        rank = self.node("CumSum", [bits, self.constant(np.array(0, np.int64), "slimgraph_unpack_axis")], name)
        index = self.node("Mul", [rank, bits], name)
        flat = self.node("Gather", [self.init(values, f"{name}_values"), index], name)
        return self.node("Reshape", [flat, self.init(np.array(shape, np.int64), f"{name}_shape")], name,
                         out_name=name)


@register_pass
class PackSparse(Pass):
    """Store sparse weights as bitmask + non-zero values, decoded by ORT at load (exact)."""

    name = "pack.sparse"
    after = AFTER_WEIGHT_PASSES

    class Config(PassConfig):
        #: tensors with fewer elements stay as they are
        min_size: int = int_range(1, 1 << 30, default=1024, log=True)
        #: pack only tensors with at least this fraction of zeros (0: whenever it is smaller)
        min_sparsity: float = float_range(0.0, 1.0, default=0.0)
        #: positions as a bitmask (1 bit per element), as gaps between non-zeros (b bits per
        #: non-zero, plus fillers), or whichever is smaller per tensor
        encoding: str = choice("auto", "bitmask", "gaps", default="auto")
        #: gap width in bits (2..8); 0 picks the smallest per tensor
        gap_bits: int = int_range(0, 8, default=0)
        #: bits a non-zero value will cost, to weigh gaps against bitmask: 0 guesses what a
        #: later pack.clusters makes of it (ceil(log2(distinct values)) when <= 256 values,
        #: else the dtype's width)
        value_bits: int = int_range(0, 64, default=0)
        #: tensors of at most 256 distinct non-zero values share one decode: gap + codebook
        #: index codes over all of them end to end (see _bundle; best for small models, and
        #: replaces a later pack.clusters for them)
        bundle: bool = choice(False, True, default=False)

    def run(self, model: Model, ctx) -> PassResult:
        cfg = self.config
        if model.opset < 11:
            raise PassError(self.name, f"the decode subgraph needs opset >= 11 (CumSum), the model has "
                            f"{model.opset}; run upgrade_opset first")
        builder = _Builder(model)
        decoders = {id(n) for n in pack_nodes(model)}
        table, before, after = [], 0, 0
        bundled: list[tuple[_bundle.Member, ir.Value, float]] = []
        for name, value in list(model.graph.initializers.items()):
            tensor = value.const_value
            if (tensor is None or value.is_graph_input() or value.is_graph_output() or not value.uses()
                    or tensor.size < cfg.min_size):
                continue
            if any(id(u.node) in decoders for u in value.uses()):
                continue  # already part of a decode subgraph
            array = tensor.numpy()
            if array.dtype not in PACKABLE or array.ndim == 0:
                continue
            mask, values, keep = split(array)
            sparsity = 1.0 - keep.mean()
            if sparsity < cfg.min_sparsity:
                continue
            if cfg.bundle:
                found = _bundle.member(name, array, keep, background(array))
                if found is not None:
                    bundled.append((found, value, sparsity))
                    continue
            encoding, bits = self._encoding(keep, values)
            if encoding == "gaps":
                codes, source = _gaps.encode(keep, bits)
                values = values[1:][source]
                size = -(-len(codes) * bits // 8) + len(codes) * array.itemsize + 8 * array.ndim + OVERHEAD + GAPS_OVERHEAD
                rebuilt = _gaps.rebuild(codes, values, background(array), bits, array.shape)
            else:
                size = packed_nbytes(array.size, len(values) - 1, array.itemsize, array.ndim)
                rebuilt = rebuild(mask, values, array.shape)
            if size >= array.nbytes:
                continue
            if rebuilt.tobytes() != np.ascontiguousarray(array).tobytes():
                raise PassError(self.name, f"{encoding} coding of {name!r} does not rebuild it bit for bit")
            model.graph.initializers.pop(name)
            value.name = f"{name}__dense"
            if encoding == "gaps":
                decoded = _gaps.decode(builder, name, array.shape, pack_codes(codes, bits), len(codes), bits,
                                       values, background(array))
            else:
                decoded = builder.decode(name, array.shape, mask, values)
            decoded.shape, decoded.type = ir.Shape(array.shape), ir.TensorType(tensor.dtype)
            value.replace_all_uses_with(decoded)
            before, after = before + array.nbytes, after + size
            table.append({"tensor": name, "shape": "x".join(map(str, array.shape)), "dtype": str(array.dtype),
                          "zeros": f"{sparsity:.1%}", "encoding": encoding + (f" {bits}-bit" if bits else ""),
                          "bytes": f"{array.nbytes} -> {size}"})
        if bundled:
            saved = self._bundle(builder, bundled, table)
            before, after = before + saved[0], after + saved[1]
        if not table:
            return PassResult(model, False, {"packed": 0})
        prepend(model, builder.nodes)
        return PassResult(model, True, {"packed": len(table), "bytes": f"{before} -> {after}",
                                        "ratio": round(before / max(after, 1), 2), "table": table})

    def _bundle(self, builder: _Builder, bundled: list, table: list[dict]) -> tuple[int, int]:
        """Pack the bundle members (if that is smaller than their raw bytes): (bytes before, after)."""
        members = [m for m, _, _ in bundled]
        gap_bits, v, size = _bundle.plan(members)
        raw = sum(m.array.nbytes for m in members)
        if size >= raw:
            return 0, 0
        packed, count = _bundle.encode(members, gap_bits, v)
        for m, rebuilt in zip(members, _bundle.rebuild(members, packed, count, gap_bits, v)):
            if rebuilt.tobytes() != np.ascontiguousarray(m.array).tobytes():
                raise PassError(self.name, f"bundle coding of {m.name!r} does not rebuild it bit for bit")
        for m, value, _ in bundled:
            builder.graph.initializers.pop(m.name)
            value.name = f"{m.name}__dense"
        outputs = _bundle.decode(builder, members, packed, count, gap_bits, v)
        for (m, value, sparsity), out in zip(bundled, outputs):
            out.shape, out.type = ir.Shape(m.array.shape), ir.TensorType(value.const_value.dtype)
            value.replace_all_uses_with(out)
            table.append({"tensor": m.name, "shape": "x".join(map(str, m.array.shape)), "dtype": str(m.array.dtype),
                          "zeros": f"{sparsity:.1%}", "encoding": f"bundle {gap_bits}+{v}-bit",
                          "bytes": f"{m.array.nbytes} -> (bundle)"})
        return raw, size

    def _encoding(self, keep: np.ndarray, values: np.ndarray) -> tuple[str, int]:
        """("bitmask", 0) or ("gaps", bits), as configured or by estimated bits."""
        cfg = self.config
        if cfg.encoding == "bitmask" or not keep.any():
            return "bitmask", 0
        value_bits = cfg.value_bits
        if value_bits == 0:
            distinct = int(distinct_per_row(values[1:].view(f"u{values.itemsize}").reshape(1, -1))[0]) if len(values) > 1 else 1
            value_bits = max(1, int(np.ceil(np.log2(max(distinct, 2))))) if distinct <= 256 else 8 * values.itemsize
        if cfg.gap_bits:
            bits, cost = cfg.gap_bits, _gaps.entries(keep, cfg.gap_bits) * (cfg.gap_bits + value_bits)
        else:
            bits, cost = _gaps.best_bits(keep, value_bits)
        if cfg.encoding == "gaps":
            return "gaps", bits
        bitmask = keep.size + (int(keep.sum()) + 1) * value_bits
        return ("gaps", bits) if cost + 8 * GAPS_OVERHEAD < bitmask else ("bitmask", 0)
