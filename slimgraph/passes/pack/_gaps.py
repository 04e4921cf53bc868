"""Relative (gap) position coding of a sparse tensor's non-zeros, as in Deep Compression.

The kept positions p_1 < p_2 < ... (1-based) are stored as gaps g_i = p_i - p_(i-1)
(p_0 = 0) in `bits`-bit codes. A gap larger than M = 2^bits - 1 is split: a filler code
0 ("advance M, write nothing") per M, then the remainder in [1, M]. Each code, filler or
not, has an entry in `values`; a filler's value is a copy of a real value (so a later
`pack.clusters` sees no new value) and is written to a dummy slot. Decode, all standard
ops on initializers (ORT folds them):

    codes -> Equal(0) -> Where(filler, M, code) -> CumSum  [1-based positions]
    -> Where(filler, 0, position) -> ScatterElements(ConstantOfShape([n + 1], background),
    values) -> Slice(1, n + 1) -> Reshape(W's shape)

At density d a kept element costs about (bits / (1 - (1 - d)^M)) bits of position instead
of 1 / d bits of bitmask: at 10% density and 5 bits, ~5.2 bits against 10.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.passes.pack._decode import DecodeBuilder

#: gap widths tried by `best_bits`
WIDTHS = tuple(range(2, 9))


def encode(keep: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes [E], source [E]): the gap codes, and for each entry the index (into the kept
    elements, in order) of the value it carries: its own for a real entry, the next real
    one's for a filler."""
    step = (1 << bits) - 1
    positions = np.flatnonzero(keep) + 1
    gaps = np.diff(positions, prepend=0)
    fillers = (gaps - 1) // step
    real_at = np.cumsum(fillers + 1) - 1  # entry index of each real entry
    total = int(real_at[-1]) + 1 if len(real_at) else 0
    codes = np.zeros(total, np.int64)
    codes[real_at] = gaps - fillers * step
    source = np.repeat(np.arange(len(gaps)), fillers + 1)
    return codes, source


def entries(keep: np.ndarray, bits: int) -> int:
    """How many codes `encode` writes (kept elements + fillers)."""
    gaps = np.diff(np.flatnonzero(keep) + 1, prepend=0)
    return int(len(gaps) + ((gaps - 1) // ((1 << bits) - 1)).sum())


def best_bits(keep: np.ndarray, value_bits: int) -> tuple[int, int]:
    """(bits, total bits) minimising entries x (gap bits + value bits)."""
    costs = {b: entries(keep, b) * (b + value_bits) for b in WIDTHS}
    bits = min(costs, key=costs.get)
    return bits, costs[bits]


def rebuild(codes: np.ndarray, values: np.ndarray, background: np.ndarray, bits: int,
            shape: tuple[int, ...]) -> np.ndarray:
    """What the decode subgraph computes, in numpy."""
    n = int(np.prod(shape))
    filler = codes == 0
    position = np.cumsum(np.where(filler, (1 << bits) - 1, codes))
    out = np.full(n + 1, background, dtype=values.dtype)
    out[np.where(filler, 0, position)[~filler]] = values[~filler]
    return out[1:].reshape(shape)


def decode(builder: DecodeBuilder, name: str, shape: tuple[int, ...], packed: np.ndarray, count: int,
           bits: int, values: np.ndarray, background: np.ndarray) -> ir.Value:
    """Append the decode subgraph of a gap-coded tensor; returns the rebuilt tensor."""
    n = int(np.prod(shape))
    b = builder
    codes = b.codes(packed, f"{name}_gaps{bits}", count, bits, name, any_width=True)
    zero = b.constant(np.array(0, np.int32), "slimgraph_unpack_zero_i32")
    filler = b.node("Equal", [codes, zero], name)
    step = b.node("Where", [filler, b.constant(np.array((1 << bits) - 1, np.int32), f"slimgraph_gap_step{bits}"),
                            codes], name)
    position = b.node("CumSum", [step, b.constant(np.array(0, np.int64), "slimgraph_unpack_axis")], name)
    target = b.node("Where", [filler, zero, position], name)
    fill = ir.tensor(np.asarray(background, values.dtype).reshape(1))
    slots = b.init(np.array([n + 1], np.int64), f"{name}_slots")  # also the Slice's stop
    base = b.node("ConstantOfShape", [slots], name, value=fill)
    dense = b.node("ScatterElements", [base, target, b.init(values, f"{name}_values")], name, axis=0)
    dense = b.node("Slice", [dense, b.constant(np.array([1], np.int64), "slimgraph_unpack_one_i64"),
                             slots], name)
    return b.node("Reshape", [dense, b.init(np.array(shape, np.int64), f"{name}_shape")], name, out_name=name)
