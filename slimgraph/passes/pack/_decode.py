"""What the pack passes share: a builder of decode subgraphs. Each packed tensor becomes
small initializers plus nodes of standard ops whose inputs are all initializers (ORT folds
them at session creation); node names are short (they add up in small files) and the last
node, which produces the tensor under its original name, carries the PACK_KEY mark that
`unpack` starts from."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.cluster._select import PACK_KEY
from slimgraph.passes.quantize._weights import _attr


#: `after` patterns of every pack pass (see `matches_order` in passes/pipeline.py): every
#: pass but the other pack passes and `short_names` (it renames what the pack passes add);
#: a later `fold_constants` would fold the decoders back.
AFTER_WEIGHT_PASSES = ("*", "!pack.*", "!short_names")


def _decode_attr(name: str, value) -> ir.Attr:
    if isinstance(value, ir.TensorProtocol):  # ConstantOfShape's fill value
        return ir.AttrTensor(name, value)
    return _attr(name, value)


class DecodeBuilder:
    def __init__(self, model: Model, kind: str, prefix: str):
        self.model, self.graph = model, model.graph
        self.kind, self.prefix = kind, prefix
        self.nodes: list[ir.Node] = []
        self._shared: dict[str, ir.Value] = {}
        self._taken: set[str] | None = None
        self._count = 0

    def init(self, array: np.ndarray, name: str) -> ir.Value:
        """A new initializer (its name made unique)."""
        base, i = name, 0
        while name in self.graph.initializers:
            i += 1
            name = f"{base}_{i}"
        t = ir.tensor(np.asarray(array, order="C"), name=name)
        v = ir.Value(name=name, const_value=t, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype))
        self.graph.register_initializer(v)
        return v

    def constant(self, array: np.ndarray, name: str) -> ir.Value:
        """A small constant shared by every decode subgraph of this run, and by those of
        earlier pack passes (an initializer already under `name` with the same content)."""
        if name not in self._shared:
            array = np.asarray(array)
            found = self.graph.initializers.get(name)
            existing = None if found is None or found.const_value is None else found.const_value.numpy()
            same = (existing is not None and existing.dtype == array.dtype and existing.shape == array.shape
                    and np.array_equal(existing, array))
            self._shared[name] = found if same else self.init(array, name)
        return self._shared[name]

    def node(self, op: str, inputs: list[ir.Value], target: str, out_name: str | None = None, **attrs) -> ir.Value:
        """A decode node; the one producing `out_name` (the rebuilt tensor) is marked."""
        if self._taken is None:
            self._taken = {n.name for n in self.graph} | {v.name for n in self.graph for v in n.outputs}
        while f"{self.prefix}{self._count}" in self._taken:
            self._count += 1
        short = f"{self.prefix}{self._count}"
        self._taken.add(short)
        node = ir.Node("", op, inputs, [_decode_attr(k, v) for k, v in attrs.items()], name=short)
        if out_name is not None:
            node.metadata_props[PACK_KEY] = f"{self.kind}:{target}"
        node.outputs[0].name = out_name or short
        self.nodes.append(node)
        return node.outputs[0]

    def codes(self, packed: np.ndarray, init_name: str, count: int, bits: int, target: str,
              any_width: bool = False) -> ir.Value:
        """int32 [count] codes of `bits` bits each, read from `packed`, a uint8 stream written
        by `pack_codes` (stored as the initializer `init_name`). Widths dividing 8 take one
        Div + Mod per byte lane; others (3, 5, 6, 7 bits: codes straddle bytes), or any width
        with `any_width` (one subgraph shape for every width, which `pack.outline` can
        share), unpack single bits and weigh them (Mul + ReduceSum). The Slice is always
        there, for the same reason."""
        packed = self.init(packed.reshape(-1, 1), init_name)
        byte = self.node("Cast", [packed], target, to=int(ir.DataType.INT32))
        flat = self.constant(np.array([-1], np.int64), "slimgraph_unpack_flat")
        lanes = 8 % bits == 0 and not any_width
        if lanes:
            scale = 1 << (bits * np.arange(8 // bits, dtype=np.int32))
            out = self.node("Div", [byte, self.constant(scale, f"slimgraph_unpack_lanes{bits}")], target)
            mod = self.constant(np.array(1 << bits, np.int32), f"slimgraph_unpack_mod{bits}")
            out = self.node("Mod", [out, mod], target)
            out = self.node("Reshape", [out, flat], target)
        else:
            bit = self.constant(1 << np.arange(8, dtype=np.int32), "slimgraph_unpack_bit_values")
            out = self.node("Div", [byte, bit], target)
            out = self.node("Mod", [out, self.constant(np.array(2, np.int32), "slimgraph_unpack_two")], target)
            out = self.node("Reshape", [out, flat], target)
        end = count if lanes else count * bits
        out = self.node("Slice", [out, self.constant(np.array([0], np.int64), "slimgraph_unpack_zero"),
                                  self.init(np.array([end], np.int64), f"{target}_end")], target)
        if not lanes:
            rows = self.constant(np.array([-1, bits], np.int64), f"slimgraph_unpack_rows{bits}")
            weights = self.constant(1 << np.arange(bits, dtype=np.int32), f"slimgraph_unpack_weights{bits}")
            out = self.node("Mul", [self.node("Reshape", [out, rows], target), weights], target)
            if self.model.opset >= 13:
                out = self.node("ReduceSum", [out, self.constant(np.array([1], np.int64), "slimgraph_unpack_one")],
                                target, keepdims=0)
            else:
                out = self.node("ReduceSum", [out], target, keepdims=0, axes=[1])
        return out


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 stream of `bits`-bit codes, little-endian: bit j of code i is bit (i*bits + j)
    of the stream, and bit t of the stream is bit t % 8 of byte t // 8."""
    codes = np.asarray(codes, dtype=np.int64).ravel()
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes outside [0, {1 << bits}) for {bits}-bit packing")
    stream = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8).ravel()
    return np.packbits(stream, bitorder="little")


def unpack_codes(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of `pack_codes` (what `DecodeBuilder.codes` computes)."""
    stream = np.unpackbits(packed, bitorder="little")[: count * bits].astype(np.int64)
    return (stream.reshape(count, bits) << np.arange(bits)).sum(axis=1)
