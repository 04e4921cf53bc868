"""The "sparsity" and "n_m" contracts: pruned zeros and N:M patterns survive later passes.

Both are checked by content, because fusion and quantization rename and replace weights.
`weight_views(model)` reads every weight of a compute op, whatever form it has taken, as
a boolean "non-zero" array in a canonical layout (reduction axis last):

1. float weights of Conv / ConvTranspose / Gemm / MatMul (constant) and Gather tables:
   non-zero means != 0;
2. quantized weights, non-zero means != their zero point (broadcast per channel, per block
   for GatherBlockQuantized; absent zero points take the op's default):
   QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger, com.microsoft QGemm,
   MatMulIntegerToFloat, DynamicQuantizeMatMul, GatherBlockQuantized, and
   DequantizeLinear of a constant (QDQ), laid out as the op reading its output;
3. com.microsoft MatMulNBits with 4-bit codes: the nibbles are unpacked and compared to the
   (packed or default 8) zero points; 2/8-bit codes or float zero points are not read
   (their zeros are not counted: a contract recorded before such a pass then fails loudly
   rather than passing unchecked);
4. weights stored packed by `pack.*` are decoded first (`pack.unpack.decode`).

The sparsity contract records the total number of zero elements over these views right
after pruning and holds while the count does not drop (quantization may add zeros, never
remove them: a pruned zero quantizes to the zero point). The N:M contract records, per
canonical shape, how many weights conform; it holds while at least that many tensors of
that shape (or larger along every axis: zero-padded input channels) still conform.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes import contracts
from slimgraph.passes.cluster._select import PACK_KEY

SPARSITY, N_M = "sparsity", "n_m"

# op -> (weight input, zero-point input or None, reduction-axis rule)
# rules: "conv" axis 1, "convT" axis 0, "mm" axis ndim-2, "gemm" transB ? 1 : 0, None (tables)
_LAYOUT = {
    "Conv": (1, None, "conv"), "ConvTranspose": (1, None, "convT"), "Gemm": (1, None, "gemm"),
    "MatMul": (1, None, "mm"), "Gather": (0, None, None),
    "QLinearConv": (3, 5, "conv"), "ConvInteger": (1, 3, "conv"), "QLinearMatMul": (3, 5, "mm"),
    "MatMulInteger": (1, 3, "mm"), "QGemm": (3, 5, "gemm"), "MatMulIntegerToFloat": (1, 5, "mm"),
    "DynamicQuantizeMatMul": (1, 3, "mm"), "GatherBlockQuantized": (0, 3, None),
}


@dataclasses.dataclass
class View:
    node: str
    op: str
    #: True where the weight is not (quantized) zero; reduction axis last (None: as stored)
    nonzero: np.ndarray
    has_reduction: bool


def _axis(rule: str | None, node: ir.Node, ndim: int) -> int | None:
    if rule == "conv":
        return 1
    if rule == "convT":
        return 0
    if rule == "mm":
        return ndim - 2
    if rule == "gemm":
        return 1 if node.attributes.get_int("transB", 0) else 0
    return None


class _Reader:
    """Constant arrays of a model, decoding `pack.*` subgraphs once when needed."""

    def __init__(self, model: Model):
        self.model = model
        self._decoded: dict[str, np.ndarray] | None = None

    def array(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None:
            return None
        if value.const_value is not None and not value.is_graph_input():
            return value.const_value.numpy()
        producer = value.producer()
        if producer is not None and PACK_KEY in producer.metadata_props:
            if self._decoded is None:
                from slimgraph.passes.pack.unpack import decode

                self._decoded = decode(self.model)
            return self._decoded.get(value.name)
        return None


def _zero_point(zp: np.ndarray | None, weight: np.ndarray, out_axis: int, default: int = 0) -> np.ndarray:
    if zp is None:
        return np.asarray(default)
    zp = zp.astype(np.int64)
    if zp.size == 1:
        return zp.reshape(())
    shape = [1] * weight.ndim
    shape[out_axis] = zp.size
    return zp.reshape(shape)


def _canonical(nonzero: np.ndarray, axis: int | None) -> np.ndarray:
    return nonzero if axis is None else np.moveaxis(nonzero, axis, -1)


def _quantized(node: ir.Node, reader: _Reader, widx: int, zidx: int | None, rule) -> View | None:
    w = reader.array(node.inputs[widx]) if len(node.inputs) > widx else None
    if w is None:
        return None
    zp = reader.array(node.inputs[zidx]) if zidx is not None and len(node.inputs) > zidx else None
    w = w.astype(np.int64)
    if node.op_type == "GatherBlockQuantized":
        bs = node.attributes.get_int("block_size", 128)
        default = {ir.DataType.UINT8: 128, ir.DataType.UINT4: 8}.get(node.inputs[widx].dtype, 0)
        z = default if zp is None else np.repeat(zp.astype(np.int64), bs, axis=-1)[..., :w.shape[-1]]
        return View(node.name, node.op_type, w != z, False)
    axis = _axis(rule, node, w.ndim)
    out_axis = 0 if w.ndim > 2 or axis is None else w.ndim - 1 - axis
    nonzero = w != _zero_point(zp, w, out_axis)
    return View(node.name, node.op_type, _canonical(nonzero, axis), axis is not None)


def _dequantize(node: ir.Node, reader: _Reader) -> View | None:
    """DequantizeLinear of a constant weight (QDQ), laid out as the compute op reading it."""
    w = reader.array(node.inputs[0])
    if w is None:
        return None
    reader_op = next((u.node for u in node.outputs[0].uses()
                      if u.node.op_type in _LAYOUT and u.idx == _LAYOUT[u.node.op_type][0]), None)
    if reader_op is None:
        return None  # a bias, or an activation: not a weight
    axis = _axis(_LAYOUT[reader_op.op_type][2], reader_op, w.ndim)
    zp = reader.array(node.inputs[2]) if len(node.inputs) > 2 else None
    nonzero = w.astype(np.int64) != _zero_point(zp, w, node.attributes.get_int("axis", 1) % w.ndim)
    return View(node.name, "DequantizeLinear", _canonical(nonzero, axis), axis is not None)


def _nbits(node: ir.Node, reader: _Reader) -> View | None:
    """MatMulNBits, 4- or 8-bit codes: B [N, blocks, bs * bits / 8] uint8 (4 bits: low nibble
    first) -> [N, K]; a code equal to its block's zero point (default 2^(bits-1)) is a zero."""
    b = reader.array(node.inputs[1])
    bits = node.attributes.get_int("bits", 4)
    if b is None or bits not in (4, 8):
        return None
    n, k = node.attributes.get_int("N"), node.attributes.get_int("K")

    def unpack(packed: np.ndarray) -> np.ndarray:
        if bits == 4:
            packed = np.stack([packed & 15, packed >> 4], axis=-1)
        return packed.reshape(n, -1).astype(np.int64)

    codes = unpack(b)
    blocks = b.shape[1]
    bs = node.attributes.get_int("block_size")
    zp = reader.array(node.inputs[3]) if len(node.inputs) > 3 else None
    if zp is None:
        z = np.asarray(1 << (bits - 1))
    elif zp.dtype == np.uint8:
        z = np.repeat(unpack(zp)[:, :blocks], bs, axis=1)
    else:
        return None  # float zero points: codes are not comparable to a zero
    return View(node.name, "MatMulNBits", (codes != z)[:, :k], True)


def weight_views(model: Model) -> Iterator[View]:
    """Every compute op's weight as a non-zero mask (see module docstring); shared weights once."""
    from slimgraph.passes.pack.unpack import pack_nodes

    reader = _Reader(model)
    seen: set[int] = set()
    decoders = {id(n) for n in pack_nodes(model)}
    for node in model.graph:
        op = node.op_type
        if id(node) in decoders:
            continue  # a decode subgraph's own Gathers read codebooks, not weights
        widx = {"MatMulNBits": 1, "DequantizeLinear": 0}.get(op, _LAYOUT.get(op, (None,))[0])
        if widx is None or len(node.inputs) <= widx or node.inputs[widx] is None or id(node.inputs[widx]) in seen:
            continue
        if op == "MatMulNBits":
            view = _nbits(node, reader)
        elif op == "DequantizeLinear":
            view = _dequantize(node, reader)
        elif _LAYOUT[op][1] is not None:
            view = _quantized(node, reader, *_LAYOUT[op])
        else:
            w = reader.array(node.inputs[widx])
            if w is None or w.dtype.kind != "f":
                continue
            axis = _axis(_LAYOUT[op][2], node, w.ndim)
            view = View(node.name, op, _canonical(w != 0, axis), axis is not None)
        if view is not None:
            seen.add(id(node.inputs[widx]))
            yield view


def count_zeros(model: Model) -> int:
    """Zero (or zero-point) elements over every compute weight of the model."""
    return int(sum(v.nonzero.size - int(v.nonzero.sum()) for v in weight_views(model)))


def conforms(nonzero: np.ndarray, n: int, m: int) -> bool:
    """At most n non-zeros in every group of m consecutive elements along the last axis."""
    k = nonzero.shape[-1]
    if k % m:
        return False
    return bool((nonzero.reshape(*nonzero.shape[:-1], k // m, m).sum(axis=-1) <= n).all())


def nm_shapes(model: Model, n: int, m: int) -> collections.Counter:
    """Canonical shape -> number of weights that are N:M."""
    return collections.Counter(tuple(v.nonzero.shape) for v in weight_views(model)
                               if v.has_reduction and conforms(v.nonzero, n, m))


@contracts.check_for(SPARSITY)
def _sparsity_holds(model: Model, record: dict) -> str | None:
    zeros = count_zeros(model)
    if zeros >= record["zeros"]:
        return None
    return (f"the compute weights hold {zeros} zero elements, fewer than the {record['zeros']} "
            f"left by {record.get('by', 'pruning')} (a pass filled pruned weights)")


@contracts.check_for(N_M)
def _n_m_holds(model: Model, record: dict) -> str | None:
    n, m = record["n"], record["m"]
    views = [v.nonzero for v in weight_views(model) if v.has_reduction]
    for entry in record["tensors"]:
        shape, want = tuple(entry["shape"]), entry["count"]
        have = 0
        for nz in views:
            if nz.ndim != len(shape) or any(d < s for d, s in zip(nz.shape, shape)):
                continue
            if nz.shape[:-1] != shape[:-1] and nz.shape != shape:
                # zero padding lives on the reduction axis (input channels) only
                continue
            have += conforms(nz[..., :shape[-1]], n, m)
        if have < want:
            return (f"{have} weight(s) of shape {list(shape)} (reduction axis last) are {n}:{m}, "
                    f"{want} were after {record.get('by', 'prune.n_m')}")
    return None
