"""pack.narrow: store integer tensors in the narrowest integer type that holds them (exact).

After int8 quantization the biases of QGemm / QLinearConv are int32 (bias / (input scale
x weight scale)), but their values usually fit in int16 and sometimes in int8. An int32
or int64 initializer whose values all fit a narrower signed or unsigned type becomes
that type plus one `Cast` back to the original, marked like every pack decode
(`slimgraph.pack = "narrow:<name>"`), so ONNX Runtime folds it at session creation and
`unpack` restores the original. Tensors read by other decode subgraphs (their small
shape and lane constants) are left alone: a Cast costs more than it saves on them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassResult, int_range, register_pass
from slimgraph.passes.cluster._select import prepend
from slimgraph.passes.pack._decode import AFTER_WEIGHT_PASSES, DecodeBuilder
from slimgraph.passes.pack.unpack import pack_nodes

KIND = "narrow"
WIDE = {np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.uint32)}
NARROW = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32))
#: bytes a Cast node and its mark cost in the file
CAST_BYTES = 40


def narrowest(array: np.ndarray) -> np.dtype | None:
    """The smallest integer dtype holding every value of `array` exactly, if smaller."""
    if array.size == 0:
        return None
    low, high = int(array.min()), int(array.max())
    for dtype in NARROW:
        info = np.iinfo(dtype)
        if dtype.itemsize < array.itemsize and info.min <= low and high <= info.max:
            return dtype
    return None


@register_pass
class PackNarrow(Pass):
    """Store int32/int64 tensors (quantized biases) as int8/int16 + a Cast ORT folds at load (exact)."""

    name = "pack.narrow"
    after = (*AFTER_WEIGHT_PASSES, "pack.sparse", "pack.clusters")

    class Config(PassConfig):
        #: tensors with fewer elements stay as they are
        min_size: int = int_range(1, 1 << 30, default=8, log=True)

    def run(self, model: Model, ctx) -> PassResult:
        builder = DecodeBuilder(model, KIND, "pn")
        decoders = {id(n) for n in pack_nodes(model)}
        table, saved = [], 0
        for name, value in list(model.graph.initializers.items()):
            tensor = value.const_value
            if (tensor is None or value.is_graph_input() or value.is_graph_output() or not value.uses()
                    or tensor.size < self.config.min_size or any(id(u.node) in decoders for u in value.uses())):
                continue
            array = tensor.numpy()
            if array.dtype not in WIDE:
                continue
            dtype = narrowest(array)
            if dtype is None or array.nbytes - array.size * dtype.itemsize <= CAST_BYTES:
                continue
            model.graph.initializers.pop(name)
            value.name = f"{name}__wide"
            narrow = builder.init(array.astype(dtype), f"{name}_{dtype.name}")
            out = builder.node("Cast", [narrow], name, out_name=name, to=int(tensor.dtype))
            out.shape, out.type = ir.Shape(array.shape), ir.TensorType(tensor.dtype)
            value.replace_all_uses_with(out)
            saved += array.nbytes - array.size * dtype.itemsize
            table.append({"tensor": name, "shape": "x".join(map(str, array.shape)),
                          "dtype": f"{array.dtype} -> {dtype}", "range": f"[{array.min()}, {array.max()}]"})
        if not table:
            return PassResult(model, False, {"narrowed": 0})
        prepend(model, builder.nodes)
        return PassResult(model, True, {"narrowed": len(table), "bytes_saved": saved, "table": table})
