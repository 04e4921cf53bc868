"""lut: exact 256-entry lookup tables (Gather) for elementwise functions of one 8-bit tensor."""

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh

from slimgraph.backends import ort
from slimgraph.ir.model import Model
from slimgraph.passes.quantize import lut
from slimgraph.passes.quantize._common import Emitter
from slimgraph.passes.quantize.qparams import QParams
from tests.helpers import parse

ONNX_TYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}

# name: (graph body computing y from x, numpy reference, opset)
FUNCTIONS = {
    "hardswish": ("y = HardSwish (x)", lambda x: x * np.clip(x + 3, 0, 6) / 6, 21),
    "gelu": ("y = Gelu (x)", lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))), 21),
    "tanh": ("y = Tanh (x)", np.tanh, 21),
    "exp": ("y = Exp (x)", np.exp, 21),
    "div_by_scalar": ("y = Div (x, six)", lambda x: x / 6, 21),
    "scalar_minus_x": ("y = Sub (six, x)", lambda x: 6 - x, 21),
    "relu": ("y = Relu (x)", lambda x: np.maximum(x, 0), 21),
    "clip": ("y = Clip (x, minus_one, two)", lambda x: np.clip(x, -1, 2), 21),
    "elu": ("y = Elu <alpha: float = 0.5> (x)", lambda x: np.where(x > 0, x, 0.5 * (np.exp(x) - 1)), 21),
    "silu_contrib": ("y = com.microsoft.QuickGelu <alpha: float = 1.0> (x)", lambda x: x / (1 + np.exp(-x)), 21),
}


def function_model(body: str, opset: int) -> Model:
    return parse(f"""
    <ir_version: 10, opset_import: ["" : {opset}, "com.microsoft" : 1]>
    g (float[256] x) => (float[256] y) <float six = {{6.0}}, float minus_one = {{-1.0}}, float two = {{2.0}}> {{
        {body}
    }}
    """)


def table_model(table: np.ndarray, dtype: str) -> Model:
    """q -> the lookup `lut.emit` builds -> y."""
    model = parse(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g ({dtype}[2,128] q) => ({dtype}[2,128] y) {{ y = Identity (q) }}
    """)
    identity = next(iter(model.graph))
    out = lut.emit(Emitter(model), identity, model.graph.inputs[0], table, identity.outputs[0], {})
    identity.replace_input_with(0, out)
    return model


def reference_model(model: Model, in_qp: QParams, out_qp: QParams) -> onnx.ModelProto:
    """q -> DequantizeLinear -> f -> QuantizeLinear: what the table replaces."""
    proto = model.to_proto()
    graph = proto.graph
    f_node = graph.node[0]
    f_node.input[[i for i, name in enumerate(f_node.input) if name == "x"][0]] = "xf"
    graph.node.insert(0, oh.make_node("DequantizeLinear", ["q", "xs", "xz"], ["xf"]))
    f_node.output[0] = "yf"
    graph.node.append(oh.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["y"]))
    graph.initializer.extend([onnx.numpy_helper.from_array(a, n) for a, n in (
        (in_qp.scale, "xs"), (in_qp.zero_point, "xz"), (out_qp.scale, "ys"), (out_qp.zero_point, "yz"))])
    del graph.input[:]
    graph.input.append(oh.make_tensor_value_info("q", ONNX_TYPES[in_qp.dtype], [256]))
    del graph.output[:]
    graph.output.append(oh.make_tensor_value_info("y", ONNX_TYPES[out_qp.dtype], [256]))
    return proto


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_table_equals_dequantize_f_quantize_on_all_256_inputs(name, dtype):
    body, reference, opset = FUNCTIONS[name]
    model = function_model(body, opset)
    node = next(iter(model.graph))
    data = [i for i, v in enumerate(node.inputs) if v.name == "x"][0]
    in_qp = QParams.from_range(-5.0, 4.0, dtype=dtype)
    x = in_qp.dequantize(lut.codes(dtype))
    y = reference(x.astype(np.float64))
    out_qp = QParams.from_range(float(y.min()), float(y.max()), dtype=dtype)

    (table,) = lut.tables(model, [lut.LutSpec(node, data, in_qp, out_qp)])

    assert table.dtype == np.dtype(dtype) and table.shape == (256,)
    codes = lut.codes(dtype)
    by_table = ort.run(table_model(table, dtype), {"q": codes.reshape(2, 128)})["y"].reshape(-1)
    by_float = ort.run(ort.session(reference_model(model, in_qp, out_qp), optimization="disable"), {"q": codes})["y"]
    np.testing.assert_array_equal(by_table, by_float)  # exact, on every 8-bit input
    # and it is the function asked for: within one output step of the float64 reference
    steps = np.abs(out_qp.dequantize(table) - np.clip(y, out_qp.dequantize(np.array(out_qp.qmin_qmax[0])),
                                                      out_qp.dequantize(np.array(out_qp.qmin_qmax[1])))) / out_qp.scale
    assert steps.max() <= 1.0, steps.max()


def test_int8_table_is_indexed_by_bit_pattern():
    codes = lut.codes("int8")
    assert codes[0] == 0 and codes[127] == 127 and codes[128] == -128 and codes[255] == -1
    with pytest.raises(ValueError, match="8-bit"):
        lut.codes("int16")


def test_compose_is_the_second_table_after_the_first():
    rng = np.random.default_rng(0)
    for dtype in ("uint8", "int8"):
        first = rng.integers(0, 256, 256).astype(np.uint8).view(dtype)
        second = rng.integers(0, 256, 256).astype(np.uint8).view(dtype)
        composed = lut.compose(first, second)
        codes = lut.codes(dtype)
        index = {int(c): i for i, c in enumerate(codes)}  # 8-bit value -> table index
        expected = [second[index[int(first[i])]] for i in range(256)]
        np.testing.assert_array_equal(composed, expected)
