"""Exact 256-entry lookup tables for elementwise functions of one 8-bit tensor.

An 8-bit tensor takes only 256 values, so any elementwise f (GELU, Tanh, Exp, Elu, 6 - x,
a Clip(1, 5) no 8-bit range implies, ...) followed by requantization is a table:

    table[i] = quantize_out(f(dequantize_in(q_i)))      q_i = the 8-bit value with index i

`tables` computes every table of a model in one ONNX Runtime run of a small model holding
`DequantizeLinear -> f -> QuantizeLinear` per function, on all 256 inputs, with ORT's graph
optimizations off: f is evaluated by the same float kernel (same attributes, same constant
operands) that the float model runs, so the table op is exactly dequant -> f -> quant.

`emit` lowers one function to a GatherElements lookup (see there); ORT takes int32/int64
indices only, hence a Cast. A lookup costs about 3 ns per element in ORT, several times a
QLinear op: functions with a QLinear form (HardSwish, SiLU, Relu, x / 6, ...) take that
instead (`_ops.py`). Index i is the 8-bit value's bit pattern read as unsigned for
uint8 and as signed for int8 (negative indices count from the end), so the int8 table is
ordered 0..127, -128..-1 and no offset is needed.

`compose` merges two tables applied one after the other into one: exact, since the value
between them is 8-bit too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.quantize._common import Emitter
from slimgraph.passes.quantize.qparams import QParams
from slimgraph.passes.rewrite import constant

logger = logging.getLogger("slimgraph.passes.quantize.lut")

_ONNX_DTYPE = {"uint8": onnx.TensorProto.UINT8, "int8": onnx.TensorProto.INT8}


@dataclasses.dataclass(frozen=True)
class LutSpec:
    """One function to tabulate: `node` with its activation at input `data`, read at
    `in_qp` and requantized to `out_qp`."""

    node: ir.Node
    data: int
    in_qp: QParams
    out_qp: QParams


def codes(dtype: str) -> np.ndarray:
    """The 256 values of an 8-bit type in table order (index i holds the value whose bit
    pattern is i)."""
    if dtype not in _ONNX_DTYPE:
        raise ValueError(f"lookup tables need an 8-bit type, not {dtype}")
    return np.arange(256, dtype=np.uint8).view(np.dtype(dtype))


def _tensor(array: np.ndarray, name: str) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.array(array, order="C"), name)


def tables(model: Model, specs: Sequence[LutSpec]) -> list[np.ndarray]:
    """The table of each spec (`out_qp`'s dtype, 256 entries), from one ORT run."""
    from slimgraph.backends import ort

    if not specs:
        return []
    inputs, nodes, initializers, outputs = [], [], [], []
    feeds = {}
    for k, spec in enumerate(specs):
        dtype = spec.in_qp.dtype
        q_name = f"q_{dtype}"
        if q_name not in feeds:
            feeds[q_name] = codes(dtype)
            inputs.append(onnx.helper.make_tensor_value_info(q_name, _ONNX_DTYPE[dtype], [256]))
        p = f"t{k}_"
        initializers += [_tensor(spec.in_qp.scale, p + "xs"), _tensor(spec.in_qp.zero_point, p + "xz"),
                         _tensor(spec.out_qp.scale, p + "ys"), _tensor(spec.out_qp.zero_point, p + "yz")]
        nodes.append(onnx.helper.make_node("DequantizeLinear", [q_name, p + "xs", p + "xz"], [p + "x"]))
        proto = ir.serde.serialize_node(spec.node)
        names = []
        for i, value in enumerate(spec.node.inputs):
            if value is None:
                names.append("")
            elif i == spec.data:
                names.append(p + "x")
            else:
                array = constant(value)
                if array is None:
                    raise ValueError(f"node {spec.node.name!r}: input {i} is neither its data nor a constant")
                initializers.append(_tensor(array, f"{p}c{i}"))
                names.append(f"{p}c{i}")
        del proto.input[:]
        proto.input.extend(names)
        del proto.output[:]
        proto.output.extend([p + "f"] + [f"{p}unused{j}" for j in range(1, len(spec.node.outputs))])
        proto.name = f"{p}{spec.node.op_type}"
        nodes.append(proto)
        nodes.append(onnx.helper.make_node("QuantizeLinear", [p + "f", p + "ys", p + "yz"], [p + "y"]))
        outputs.append(onnx.helper.make_tensor_value_info(p + "y", _ONNX_DTYPE[spec.out_qp.dtype], [256]))
    graph = onnx.helper.make_graph(nodes, "lookup_tables", inputs, outputs, initializers)
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.ir.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir.ir_version)
    results = ort.run(ort.session(proto, optimization="disable", threads=1), feeds)
    return [results[f"t{k}_y"] for k in range(len(specs))]


@dataclasses.dataclass
class _Index:
    """The flattened int32 index tensor of an 8-bit tensor, and that tensor's shape."""

    index: ir.Value
    shape: ir.Value


def emit(emitter: Emitter, source: ir.Node, xq: ir.Value, table: np.ndarray, out: ir.Value,
         cache: dict[ir.Value, _Index]) -> ir.Value:
    """The lookup of `table` at `xq`, before `source`; returns the 8-bit output.

    `Reshape(GatherElements(table, Reshape(Cast(xq, int32), [-1])), Shape(xq))`: ORT's
    GatherElements copies one byte per index about 10x faster than Gather (which copies
    a block per index), and needs indices of the table's rank. `cache` keeps the index
    tensor and shape of each 8-bit tensor (several tables may read one tensor)."""
    entry = cache.get(xq)
    if entry is None:
        cast = emitter.node("Cast", [xq], [(f"{xq.name}_index", ir.DataType.INT32, xq.shape)],
                            attributes={"to": ir.DataType.INT32}, source=source, before=source)
        flat = emitter.node("Reshape", [cast.outputs[0], emitter.constant(np.array([-1], np.int64), "flatten")],
                            [(f"{xq.name}_index_flat", ir.DataType.INT32, None)], source=source, before=source)
        shape = emitter.node("Shape", [xq], [(f"{xq.name}_shape", ir.DataType.INT64, None)],
                             source=source, before=source)
        entry = cache[xq] = _Index(flat.outputs[0], shape.outputs[0])
    values = emitter.constant(table, f"{source.name or source.op_type}_table")
    gather = emitter.node("GatherElements", [values, entry.index], [(f"{out.name}_flat", table_dtype(table), None)],
                          attributes={"axis": 0}, source=source, before=source)
    unflat = emitter.node("Reshape", [gather.outputs[0], entry.shape],
                          [(f"{out.name}_quantized", table_dtype(table), out.shape)], source=source, before=source)
    return unflat.outputs[0]


def compose(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The table of `second` applied after `first` (exact: `first`'s output is 8-bit)."""
    return second[first.view(np.uint8).astype(np.int64)]


def table_dtype(table: np.ndarray) -> ir.DataType:
    return ir.DataType.UINT8 if table.dtype == np.uint8 else ir.DataType.INT8
