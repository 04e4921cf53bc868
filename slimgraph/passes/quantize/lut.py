"""Exact 256-entry lookup tables for elementwise functions of one 8-bit tensor.

An 8-bit tensor takes only 256 values, so any elementwise f (HardSwish, GELU, Tanh, Exp,
x / 6, a Relu whose bounds the input's range does not imply, ...) followed by
requantization is a table:

    table[i] = quantize_out(f(dequantize_in(q_i)))      q_i = the 8-bit value with index i

`tables` computes every table of a model in one ONNX Runtime run of a small model holding
`DequantizeLinear -> f -> QuantizeLinear` per function, on all 256 inputs, with ORT's graph
optimizations off: f is evaluated by the same float kernel (same attributes, same constant
operands) that the float model runs, so the table op is exactly dequant -> f -> quant.

`emit` lowers one function to `Gather(table, Cast(q, int32))`: ORT's Gather takes data of
any type but int32/int64 indices. Index i is the 8-bit value's bit pattern read as
unsigned for uint8 and as signed for int8 (Gather counts negative indices from the end),
so the int8 table is ordered 0..127, -128..-1 and no offset is needed.

`compose_chains` merges `Gather(t2, Cast(Gather(t1, Cast(x))))` into `Gather(t2[t1], Cast(x))`
when the middle tensor has no other reader: exact, since the middle value is 8-bit too.
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

LUT_KEY = "quantize.lut"
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
    return onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)


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


def emit(emitter: Emitter, source: ir.Node, xq: ir.Value, table: np.ndarray, out: ir.Value,
         casts: dict[ir.Value, ir.Value]) -> ir.Value:
    """`Gather(table, Cast(xq, int32))` before `source`; returns the 8-bit output. `casts`
    caches the index tensor of each 8-bit value (several tables may read one tensor)."""
    index = casts.get(xq)
    if index is None:
        cast = emitter.node("Cast", [xq], [(f"{xq.name}_index", ir.DataType.INT32, xq.shape)],
                            attributes={"to": ir.DataType.INT32}, source=source, before=source)
        index = casts[xq] = cast.outputs[0]
    values = emitter.constant(table, f"{source.name or source.op_type}_table")
    gather = emitter.node("Gather", [values, index], [(f"{out.name}_quantized", table_dtype(table), out.shape)],
                          attributes={"axis": 0}, source=source, before=source)
    Model.annotate(gather, LUT_KEY, True)
    return gather.outputs[0]


def table_dtype(table: np.ndarray) -> ir.DataType:
    return ir.DataType.UINT8 if table.dtype == np.uint8 else ir.DataType.INT8


def compose_chains(emitter: Emitter) -> int:
    """Merge table lookups that read another lookup's only output (see module docstring).
    Returns the number of lookups removed."""
    graph = emitter.graph
    merged = 0
    for gather in [n for n in graph if Model.annotation(n, LUT_KEY)]:
        if gather.graph is None:
            continue
        cast = gather.inputs[1].producer()
        middle = cast.inputs[0] if cast is not None else None
        first = middle.producer() if middle is not None else None
        if first is None or not Model.annotation(first, LUT_KEY):
            continue
        if middle.is_graph_output() or len(middle.uses()) != 1 or len(cast.outputs[0].uses()) != 1:
            continue
        old = (first.inputs[0], gather.inputs[0])
        t1, t2 = constant(old[0]), constant(old[1])
        index = t1.view(np.uint8).astype(np.int64)  # t2 is indexed by t1's bit patterns
        combined = emitter.constant(t2[index], f"{gather.name}_composed")
        gather.replace_input_with(0, combined)
        gather.replace_input_with(1, first.inputs[1])
        graph.remove([cast, first], safe=True)
        emitter.remove_unused_initializers(old)
        merged += 1
    return merged
