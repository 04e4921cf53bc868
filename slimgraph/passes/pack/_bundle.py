"""One decode for every sparse, few-valued weight of a model: `pack.sparse(bundle=true)`.

In a small model each packed tensor's own decode subgraph and shape constants cost more
than its non-zeros. A bundle lays the weights end to end in one flat buffer of N slots
and stores, for each kept element, one code of (gap bits + value bits):

    code = gap code * 2^v + index of the value in its tensor's codebook

with the gap coding of `_gaps` over the whole buffer (a filler has gap code 0 and
index 0). Each tensor's codebook is its distinct non-zero values (at most 2^v, v bits
for the tensor with the most), padded to 2^v entries, then its background value at
index 2^v. Decode, all standard ops on initializers (ORT folds them):

    codes -> Div(2^v) = gap code, Mod(2^v) = index -> [gap decode as in _gaps]
    -> ScatterElements(ConstantOfShape([N + 1], 2^v), position, index)   [int32 indices]
    per tensor: Slice(start, end) -> Gather(its codebook) -> Reshape(its shape)

so a tensor adds three nodes and three small constants, and its non-zeros cost
(gap bits + v) bits each: the paper's relative indices + codebook, stored flat.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from slimgraph.passes.pack import _gaps
from slimgraph.passes.pack._decode import DecodeBuilder, pack_codes

#: what the shared decode and each member add to the file (nodes and small constants)
SHARED_BYTES, MEMBER_BYTES = 450, 120


@dataclasses.dataclass
class Member:
    name: str
    array: np.ndarray
    keep: np.ndarray  # [n] bool, by bits against the background
    book: np.ndarray  # [2^v + 1]: distinct kept values, padding, background last
    index: np.ndarray  # [k] index of each kept value in `book`


def member(name: str, array: np.ndarray, keep: np.ndarray, background: np.ndarray) -> Member | None:
    """The codebook view of a tensor, or None when its kept values number more than 256."""
    uint = np.dtype(f"u{array.itemsize}")
    kept = np.ascontiguousarray(array).ravel()[keep]
    values, index = np.unique(kept.view(uint), return_inverse=True)
    if len(values) > 256:
        return None
    book = values.view(array.dtype)
    return Member(name, array, keep, book, index.reshape(-1))


def value_bits(members: list[Member]) -> int:
    return max(1, max(int(np.ceil(np.log2(max(len(m.book), 1)))) for m in members))


def plan(members: list[Member]) -> tuple[int, int, int]:
    """(gap bits, value bits, estimated bytes) of the bundle of `members`."""
    v = value_bits(members)
    keep = np.concatenate([m.keep for m in members])
    bits, cost = _gaps.best_bits(keep, v)
    return bits, v, -(-cost // 8) + SHARED_BYTES + sum(MEMBER_BYTES + m.array.itemsize * ((1 << v) + 1) for m in members)


def encode(members: list[Member], gap_bits: int, v: int) -> tuple[np.ndarray, int]:
    """(packed uint8 stream, number of codes)."""
    keep = np.concatenate([m.keep for m in members])
    gaps, source = _gaps.encode(keep, gap_bits)
    index = np.concatenate([m.index for m in members])[source] if len(source) else np.zeros(0, np.int64)
    codes = gaps * (1 << v) + np.where(gaps == 0, 0, index)
    return pack_codes(codes, gap_bits + v), len(codes)


def rebuild(members: list[Member], packed: np.ndarray, count: int, gap_bits: int, v: int) -> list[np.ndarray]:
    """What the decode subgraph computes, in numpy (for the exactness check)."""
    from slimgraph.passes.pack._decode import unpack_codes

    codes = unpack_codes(packed, count, gap_bits + v)
    gaps, index = codes >> v, codes & ((1 << v) - 1)
    filler = gaps == 0
    position = np.cumsum(np.where(filler, (1 << gap_bits) - 1, gaps))
    total = sum(m.array.size for m in members)
    slots = np.full(total + 1, 1 << v, np.int64)
    slots[position[~filler]] = index[~filler]
    out, start = [], 1
    for m in members:
        book = _book(m, v)
        out.append(book[slots[start:start + m.array.size]].reshape(m.array.shape))
        start += m.array.size
    return out


def _book(m: Member, v: int) -> np.ndarray:
    """The codebook as stored: kept values, padded to 2^v with the last one, background last."""
    pad = (1 << v) - len(m.book)
    background = m.array.ravel()[~m.keep][:1]
    if len(background) == 0:
        background = m.book[:1] if len(m.book) else np.zeros(1, m.array.dtype)
    filler = m.book[-1:] if len(m.book) else background
    return np.concatenate([m.book, np.repeat(filler, pad), background]).astype(m.array.dtype)


def decode(builder: DecodeBuilder, members: list[Member], packed: np.ndarray, count: int, gap_bits: int,
           v: int) -> list[ir.Value]:
    """Append the bundle's decode; returns the rebuilt tensors (marked), in order."""
    b = builder
    total = sum(m.array.size for m in members)
    codes = b.codes(packed, "slimgraph_bundle_codes", count, gap_bits + v, "bundle", any_width=True)
    scale = b.constant(np.array(1 << v, np.int32), f"slimgraph_bundle_k{v}")
    gaps = b.node("Div", [codes, scale], "bundle")
    index = b.node("Mod", [codes, scale], "bundle")
    zero = b.constant(np.array(0, np.int32), "slimgraph_unpack_zero_i32")
    filler = b.node("Equal", [gaps, zero], "bundle")
    step = b.node("Where", [filler, b.constant(np.array((1 << gap_bits) - 1, np.int32), f"slimgraph_gap_step{gap_bits}"),
                            gaps], "bundle")
    position = b.node("CumSum", [step, b.constant(np.array(0, np.int64), "slimgraph_unpack_axis")], "bundle")
    target = b.node("Where", [filler, zero, position], "bundle")
    fill = ir.tensor(np.array([1 << v], np.int32))
    base = b.node("ConstantOfShape", [b.init(np.array([total + 1], np.int64), "slimgraph_bundle_slots")], "bundle",
                  value=fill)
    slots = b.node("ScatterElements", [base, target, index], "bundle", axis=0)
    out, start = [], 1
    bound = b.init(np.array([start], np.int64), "slimgraph_bundle_start")
    for m in members:
        end = b.init(np.array([start + m.array.size], np.int64), f"{m.name}_end")
        piece = b.node("Slice", [slots, bound, end], m.name)
        flat = b.node("Gather", [b.init(_book(m, v), f"{m.name}_codebook"), piece], m.name)
        out.append(b.node("Reshape", [flat, b.init(np.array(m.array.shape, np.int64), f"{m.name}_shape")], m.name,
                          out_name=m.name))
        bound, start = end, start + m.array.size
    return out
