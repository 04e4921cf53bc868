"""Op identity for static quantization, in one place: what each ONNX op becomes when its
activations are 8-bit, and why a node cannot be quantized.

`classify(node)` returns a `Kind` (or a reason string) for one node of the main graph:

| kind      | ops                                        | integer form (QOperator)                  |
|-----------|--------------------------------------------|-------------------------------------------|
| MAC       | Conv, Gemm, MatMul                         | QLinearConv, QGemm, QLinearMatMul         |
| BINARY    | Add, Mul; Sub, Div by a constant           | QLinearAdd, QLinearMul (com.microsoft)    |
| CONCAT    | Concat                                     | QLinearConcat, or Concat on 8-bit data    |
| POOL      | AveragePool, GlobalAveragePool             | QLinearAveragePool / ...GlobalAveragePool |
| UNARY     | Sigmoid, LeakyRelu                         | QLinearSigmoid, QLinearLeakyRelu          |
| SOFTMAX   | Softmax                                    | QLinearSoftmax                            |
| SAME      | MaxPool, Reshape, Transpose, Flatten, ...  | the op on 8-bit data, same qparams        |
| CLAMP     | Relu, Clip                                 | folded into a range (FOLD), or a requantization |
| RESCALE   | Mul, Div by a positive constant scalar     | nothing: the same bytes at another scale  |
| COMPOSITE | HardSigmoid, HardSwish, SiLU (QuickGelu, Swish) | QLinearAdd / QLinearSigmoid + QLinearMul |
| LUT       | any other function of one input (GELU, Tanh, Exp, 6 - x, ...) | an exact 256-entry table |

Which inputs of a node carry activations (`data_inputs`) is part of the same table:
the other inputs (shapes, axes, pads, indices) keep their types.
"""

from __future__ import annotations

import enum
import math

import numpy as np
import onnx_ir as ir

from slimgraph.passes.rewrite import constant

MS_DOMAIN = "com.microsoft"


class Kind(str, enum.Enum):
    MAC = "mac"
    BINARY = "binary"
    CONCAT = "concat"
    POOL = "pool"
    UNARY = "unary"
    SOFTMAX = "softmax"
    SAME = "same"
    CLAMP = "clamp"
    LUT = "lut"
    #: a CLAMP whose bounds the input's qparams already imply: no node at all
    FOLD = "fold"
    #: multiplication or division by a positive constant scalar: the same bytes read with
    #: another scale, no node at all
    RESCALE = "rescale"
    #: HardSigmoid, HardSwish, SiLU (QuickGelu, Swish) as a fixed recipe of QLinear ops
    COMPOSITE = "composite"

    @property
    def heavy(self) -> bool:
        """Worth quantizing even when its input arrives in float (a QuantizeLinear is cheap
        next to the op itself)."""
        return self is Kind.MAC

    @property
    def requantizes(self) -> bool:
        """Its output's qparams are free to choose (the kernel requantizes)."""
        return self in (Kind.MAC, Kind.BINARY, Kind.CONCAT, Kind.POOL, Kind.UNARY, Kind.SOFTMAX, Kind.LUT,
                        Kind.CLAMP, Kind.COMPOSITE)


#: Ops that move or select 8-bit data without arithmetic, and which inputs are data.
#: ORT 1.32's CPU kernels run each of these on uint8 and int8 (checked in the tests).
SAME_OPS: dict[str, tuple[int, ...]] = {
    "MaxPool": (0,), "Reshape": (0,), "Transpose": (0,), "Flatten": (0,), "Squeeze": (0,),
    "Unsqueeze": (0,), "Slice": (0,), "Split": (0,), "Pad": (0,), "Resize": (0,),
    "Identity": (0,), "DepthToSpace": (0,), "SpaceToDepth": (0,), "Expand": (0,), "Tile": (0,),
    "Gather": (0,), "ReduceMax": (0,), "ReduceMin": (0,),
}

#: Elementwise functions of one tensor, tabulated exactly (the table is computed by ORT's
#: own float kernel, see `lut.py`). (domain, op_type).
LUT_UNARY = frozenset({
    *(("", op) for op in (
        "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Ceil", "Celu", "Cos", "Cosh",
        "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Log", "Mish", "Neg",
        "Reciprocal", "Round", "Selu", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan",
        "Tanh", "ThresholdedRelu", "Swish",
    )),
    (MS_DOMAIN, "Gelu"), (MS_DOMAIN, "FastGelu"), (MS_DOMAIN, "QuickGelu"),
})

#: Activations with a recipe of QLinear ops (`COMPOSITE`), and the attribute that must be
#: positive for it: HardSigmoid(x) = clip(alpha x + beta, 0, 1) is one QLinearAdd read at
#: another scale; HardSwish(x) = x HardSigmoid(x); x sigmoid(alpha x) is QLinearSigmoid
#: (on x read at scale alpha * s) and QLinearMul. ORT runs each of these about 5x faster
#: than a table lookup (a GatherElements copies one byte per index at ~3 ns).
COMPOSITES = {("", "HardSigmoid"): "alpha", ("", "HardSwish"): None, ("", "Swish"): "alpha",
              (MS_DOMAIN, "QuickGelu"): "alpha"}
COMPOSITE_DEFAULTS = {"HardSigmoid": 0.2, "Swish": 1.0, "QuickGelu": 1.702}

#: Binary ops that are a function of one tensor when the other operand is a constant scalar.
LUT_WITH_SCALAR = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"})

#: Unary ops with a com.microsoft QLinear kernel.
UNARY_QOPS = {"Sigmoid": "QLinearSigmoid", "LeakyRelu": "QLinearLeakyRelu"}


def data_inputs(node: ir.Node, kind: Kind) -> tuple[int, ...]:
    """Indices of the inputs that carry (float) activations for this kind of node."""
    if kind is Kind.MAC:
        b = node.inputs[1]
        return (0, 1) if node.op_type == "MatMul" and constant(b) is None else (0,)
    if kind is Kind.BINARY:
        return tuple(i for i, v in enumerate(node.inputs[:2]) if constant(v) is None)
    if kind is Kind.CONCAT:
        return tuple(i for i, v in enumerate(node.inputs) if v is not None and constant(v) is None)
    if kind is Kind.SAME:
        return SAME_OPS[node.op_type]
    if kind in (Kind.LUT, Kind.RESCALE) and node.op_type in LUT_WITH_SCALAR and not node.domain:
        return (0,) if constant(node.inputs[0]) is None else (1,)
    return (0,)


def rescale_factor(node: ir.Node) -> float:
    """What a RESCALE node multiplies its input by."""
    data = data_inputs(node, Kind.RESCALE)[0]
    c = _scalar(node.inputs[1 - data])
    return 1.0 / c if node.op_type == "Div" else c


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _scalar(value: ir.Value | None) -> float | None:
    array = constant(value)
    return float(array.reshape(())) if array is not None and array.size == 1 else None


def clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """(low, high) of a Relu or a Clip with constant bounds, else None."""
    if node.op_type == "Relu":
        return 0.0, math.inf
    if node.op_type != "Clip":
        return None
    if len(node.inputs) == 1 and ("min" in node.attributes or "max" in node.attributes):  # opset < 11
        return node.attributes.get_float("min", -math.inf), node.attributes.get_float("max", math.inf)
    bounds = []
    for index, default in ((1, -math.inf), (2, math.inf)):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            bounds.append(default)
            continue
        number = _scalar(value)
        if number is None:
            return None
        bounds.append(number)
    return bounds[0], bounds[1]


# --- per-kind checks: None when the node can be quantized, else why not --------------------------
def _check_mac(node: ir.Node) -> str | None:
    op = node.op_type
    if op == "Conv":
        w = constant(node.inputs[1])
        if w is None:
            return "its weight is not a constant"
        if w.ndim not in (3, 4):
            return f"{w.ndim - 2}-D convolution (QLinearConv lowering handles 1-D and 2-D)"
        if len(node.inputs) > 2 and node.inputs[2] is not None and constant(node.inputs[2]) is None:
            return "its bias is not a constant"
        return None
    if op == "Gemm":
        b = constant(node.inputs[1])
        if b is None:
            return "its B operand is not a constant"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = constant(node.inputs[2])
            if c is None:
                return "its C operand is not a constant"
            n = b.shape[0] if node.attributes.get_int("transB", 0) else b.shape[1]
            if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
                return f"its C operand has shape {list(c.shape)}, not a bias of {n} values"
        if node.attributes.get_int("transA", 0):
            return "transA=1"
        return None
    if op == "MatMul":
        b = constant(node.inputs[1])
        if b is not None and b.ndim != 2:
            return f"its constant B has rank {b.ndim}, not 2"
        return None
    return f"no MAC lowering for {op}"


def _check_binary(node: ir.Node) -> str | None:
    a, b = node.inputs[0], node.inputs[1]
    ca, cb = constant(a), constant(b)
    if ca is not None and cb is not None:
        return "both operands are constants (fold_constants computes it)"
    if node.op_type in ("Sub", "Div") and cb is None:
        return f"{node.op_type} of two activations has no integer kernel"
    if node.op_type == "Div" and cb is not None and np.any(cb == 0):
        return "division by a constant containing zeros"
    for v, c in ((a, ca), (b, cb)):
        if c is not None and c.dtype != np.float32:
            return f"constant operand {v.name!r} is {c.dtype}, not float32"
    return None


def _check_same(node: ir.Node) -> str | None:
    op = node.op_type
    if op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].uses():
        return "its Indices output is used"
    if op == "Resize" and node.attributes.get_string("mode", "nearest") == "cubic":
        return "cubic Resize has no 8-bit kernel"
    if op == "Pad" and node.attributes.get_string("mode", "constant") == "constant":
        if len(node.inputs) > 2 and node.inputs[2] is not None and _scalar(node.inputs[2]) is None:
            return "its pad value is not a constant"
    return None


def _check_pool(node: ir.Node) -> str | None:
    if node.op_type == "AveragePool" and any(d != 1 for d in node.attributes.get_ints("dilations", [])):
        return "dilated AveragePool has no integer kernel"
    return None


def _check_concat(node: ir.Node) -> str | None:
    for v in node.inputs:
        array = constant(v)
        if array is not None and array.dtype != np.float32:
            return f"constant input {v.name!r} is {array.dtype}, not float32"
    return None


def _composite(node: ir.Node) -> bool:
    key = (node.domain, node.op_type)
    if key not in COMPOSITES or len([v for v in node.inputs if v is not None]) != 1:
        return False
    attribute = COMPOSITES[key]
    return attribute is None or node.attributes.get_float(attribute, COMPOSITE_DEFAULTS[node.op_type]) > 0


def _with_scalar(node: ir.Node) -> Kind | str:
    """A binary op with one constant scalar operand (see `classify`)."""
    op = node.op_type
    data_first = _scalar(node.inputs[1]) is not None
    c = _scalar(node.inputs[1] if data_first else node.inputs[0])
    if c > 0 and (op == "Mul" or (op == "Div" and data_first)):
        return Kind.RESCALE
    if op in ("Add", "Mul") or (op in ("Sub", "Div") and data_first):
        return _check_binary(node) or Kind.BINARY
    return Kind.LUT


def _kind(node: ir.Node) -> Kind | str:
    op, domain = node.op_type, node.domain
    if _composite(node):
        return Kind.COMPOSITE
    if domain == MS_DOMAIN:
        if (domain, op) in LUT_UNARY and len([v for v in node.inputs if v is not None]) == 1:
            return Kind.LUT
        return f"no integer lowering for {domain}:{op}"
    if domain not in ("", "ai.onnx"):
        return f"unknown domain {domain!r}"
    if op in ("Conv", "Gemm", "MatMul"):
        return _check_mac(node) or Kind.MAC
    if op in LUT_WITH_SCALAR and len(node.inputs) == 2:
        scalar_a, scalar_b = _scalar(node.inputs[0]) is not None, _scalar(node.inputs[1]) is not None
        if scalar_a != scalar_b:
            return _with_scalar(node)
        if op in ("Add", "Mul", "Sub", "Div"):
            return _check_binary(node) or Kind.BINARY
        return f"{op} of two tensors has no integer kernel"
    if op in ("Relu", "Clip"):
        return Kind.CLAMP if clip_bounds(node) is not None else "its bounds are not constants"
    if op in UNARY_QOPS:
        return Kind.UNARY
    if op == "Softmax":
        return Kind.SOFTMAX
    if op in ("AveragePool", "GlobalAveragePool"):
        return _check_pool(node) or Kind.POOL
    if op == "Concat":
        return _check_concat(node) or Kind.CONCAT
    if op in SAME_OPS:
        return _check_same(node) or Kind.SAME
    if (domain, op) in LUT_UNARY and len([v for v in node.inputs if v is not None]) == 1:
        return Kind.LUT
    return f"no integer kernel for {op}"


def classify(node: ir.Node) -> Kind | str:
    """The kind of a main-graph node, or why it has none (it stays float)."""
    kind = _kind(node)
    if isinstance(kind, str):
        return kind
    for i in data_inputs(node, kind):
        value = node.inputs[i]
        if not _is_float(value):
            what = "unknown (run infer_shapes)" if value.dtype is None else value.dtype.name
            return f"input {value.name!r} is {what}, not float32"
    return kind


def uses_qgemm(node: ir.Node) -> bool:
    """Whether a MAC node lowers to com.microsoft QGemm (which may output float): Gemm, and
    MatMul with a constant B and a 2-D A."""
    if node.op_type == "Gemm":
        return True
    if node.op_type != "MatMul" or constant(node.inputs[1]) is None:
        return False
    shape = node.inputs[0].shape
    return shape is not None and shape.rank() == 2


def is_depthwise(node: ir.Node) -> bool:
    """A Conv with one input channel per group (MLAS runs it in its own kernel)."""
    if node.op_type != "Conv":
        return False
    w = constant(node.inputs[1])
    return w is not None and w.shape[1] == 1 and node.attributes.get_int("group", 1) == w.shape[0] > 1


def mac_weight(node: ir.Node) -> np.ndarray:
    """The constant weight of a MAC node as the integer op multiplies it (Gemm's alpha folded)."""
    w = constant(node.inputs[1]).astype(np.float32)
    if node.op_type == "Gemm":
        w = w * np.float32(node.attributes.get_float("alpha", 1.0))
    return w


def mac_bias(node: ir.Node) -> np.ndarray | None:
    """The bias a MAC node adds per output channel (Gemm's beta folded), or None."""
    if node.op_type == "MatMul" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    c = constant(node.inputs[2]).astype(np.float32)
    if node.op_type == "Gemm":
        c = c * np.float32(node.attributes.get_float("beta", 1.0))
        w = constant(node.inputs[1])
        n = w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[1]
        return np.broadcast_to(c.reshape(-1), (n,)).copy()
    return c.reshape(-1)


def binary_constant(node: ir.Node, index: int) -> np.ndarray:
    """A BINARY node's constant operand as the integer op sees it: Sub adds its negation,
    Div multiplies by its reciprocal."""
    c = constant(node.inputs[index]).astype(np.float32)
    if node.op_type == "Sub":
        return -c
    if node.op_type == "Div":
        return (np.float32(1.0) / c).astype(np.float32)
    return c
