"""What kind of kernel an op runs in ONNX Runtime: integer, quantize boundary, float, or
neither. The one table (`OP_KINDS`) later issues consult to list float islands and to
score integer-kernel coverage.

1. `INTEGER`: an integer kernel (QLinearConv, QGemm, MatMulInteger, MatMulNBits, ...).
2. `BOUNDARY`: converts between float and integer (QuantizeLinear, DequantizeLinear,
   DynamicQuantizeLinear).
3. `MOVEMENT`: moves or selects data without arithmetic (Reshape, Transpose, MaxPool,
   Concat, ...); it is integer or float by the dtype it moves, see `resolve`.
4. `SHAPE`: computes tensor metadata (Shape, Size, Range, ...): not part of the
   numeric data path.
5. `FLOAT`: everything else on float data: the default for ops not in the table.

Two more tables describe the integer kernels themselves, for the runtime check
(`runtime_check`): `INTEGER_KERNELS` maps a float op to the integer kernels ORT can run it
as once quantized, and `SIGNATURES` says where an integer kernel's activation, weight and
zero points are and whether its u8s8 kernel sums weight pairs in 16 bits (`vpmaddubsw`).
"""

from __future__ import annotations

import dataclasses
import enum

MS_DOMAIN = "com.microsoft"
NCHWC_DOMAIN = "com.microsoft.nchwc"


class OpKind(str, enum.Enum):
    INTEGER = "integer"
    BOUNDARY = "boundary"
    MOVEMENT = "movement"
    SHAPE = "shape"
    FLOAT = "float"


def _table(kind: OpKind, domain: str, *ops: str) -> dict[tuple[str, str], OpKind]:
    return {(domain, op): kind for op in ops}


#: (domain, op_type) -> kind. Ops not listed compute in their input dtype (see `resolve`).
OP_KINDS: dict[tuple[str, str], OpKind] = {
    **_table(OpKind.INTEGER, "", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"),
    **_table(
        OpKind.INTEGER, MS_DOMAIN,
        "QLinearConv", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4",
        "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
        "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
        "QLinearReduceMean", "QLinearWhere", "QLinearConvTranspose", "QAttention",
        "QEmbedLayerNormalization", "QOrderedMatMul", "QOrderedGelu", "QOrderedLayerNormalization",
        "DynamicQuantizeLSTM", "GatherBlockQuantized", "NhwcMaxPool",
    ),
    **_table(OpKind.BOUNDARY, "", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"),
    **_table(OpKind.BOUNDARY, MS_DOMAIN, "QuantizeLinear", "DequantizeLinear"),
    **_table(
        OpKind.MOVEMENT, "",
        "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice",
        "Gather", "GatherElements", "GatherND", "ScatterElements", "ScatterND", "Identity",
        "Expand", "Tile", "Pad", "MaxPool", "GlobalMaxPool", "Resize", "Upsample",
        "DepthToSpace", "SpaceToDepth", "Where", "Cast",
    ),
    **_table(OpKind.MOVEMENT, NCHWC_DOMAIN, "ReorderInput", "ReorderOutput"),
    **_table(
        OpKind.SHAPE, "",
        "Shape", "Size", "ConstantOfShape", "Range", "NonZero", "EyeLike", "Constant",
    ),
}

#: ORT's profile names element types like this ("float", "int8", ...).
_INTEGER_DTYPES = {"int8", "uint8", "int4", "uint4", "int16", "uint16", "int32", "uint32"}
_INDEX_DTYPES = {"int64", "uint64", "bool"}
_FLOAT_DTYPES = {"float", "float16", "bfloat16", "double", "float8e4m3fn", "float8e5m2"}


def op_kind(op_type: str, domain: str = "") -> OpKind:
    """The table's kind for an op, FLOAT when unlisted. `ai.onnx` is the default domain."""
    domain = "" if domain == "ai.onnx" else domain
    return OP_KINDS.get((domain, op_type), OpKind.FLOAT)


def resolve(op_type: str, domain: str = "", input_dtype: str | None = None) -> OpKind:
    """The kind a node really runs as, given the element type of its first input when known
    (ORT's profile reports it). Integer/boundary/shape ops are fixed by the table; the others
    move or compute in their input's type: 8/16/32-bit integers are integer work, int64 and
    bool are index arithmetic (shape), floats are float. Unknown dtype: the table's kind."""
    kind = op_kind(op_type, domain)
    if kind in (OpKind.INTEGER, OpKind.BOUNDARY, OpKind.SHAPE) or input_dtype is None:
        return kind
    if input_dtype in _INTEGER_DTYPES:
        return OpKind.INTEGER
    if input_dtype in _INDEX_DTYPES:
        return OpKind.SHAPE
    if input_dtype in _FLOAT_DTYPES:
        return OpKind.FLOAT
    return kind


#: ORT's own float fusions and layouts -> the standard op they compute.
_FLOAT_ORIGIN = {
    "FusedConv": "Conv", "NchwcConv": "Conv", "NhwcConv": "Conv", "FusedGemm": "Gemm",
    "FusedMatMul": "MatMul", "NchwcMaxPool": "MaxPool", "NchwcAveragePool": "AveragePool",
    "NchwcGlobalMaxPool": "GlobalMaxPool", "NchwcGlobalAveragePool": "GlobalAveragePool",
    "NchwcUpsample": "Resize", "NhwcMaxPool": "MaxPool",
}


def base_op(op_type: str) -> str:
    """The standard ONNX op an ORT-internal float op computes ("FusedConv" -> "Conv")."""
    return _FLOAT_ORIGIN.get(op_type, op_type)


#: float op -> the integer kernels ORT can run it as once quantized (QOperator ops, or what
#: ORT's CPU provider fuses a DequantizeLinear -> op -> QuantizeLinear group into). MOVEMENT
#: ops are not listed: they run on 8-bit tensors as themselves.
INTEGER_KERNELS: dict[str, tuple[str, ...]] = {
    "Conv": ("QLinearConv", "ConvInteger"),
    "ConvTranspose": ("QLinearConvTranspose",),
    "MatMul": ("QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"),
    "Gemm": ("QGemm",),
    "Add": ("QLinearAdd",),
    "Mul": ("QLinearMul",),
    "Concat": ("QLinearConcat",),
    "AveragePool": ("QLinearAveragePool",),
    "GlobalAveragePool": ("QLinearGlobalAveragePool",),
    "Sigmoid": ("QLinearSigmoid",),
    "LeakyRelu": ("QLinearLeakyRelu",),
    "Softmax": ("QLinearSoftmax",),
    "ReduceMean": ("QLinearReduceMean",),
    "Where": ("QLinearWhere",),
    "Attention": ("QAttention",),
    "LSTM": ("DynamicQuantizeLSTM",),
    # folded into the producer's output range (zero point at qmin / clipped scale)
    "Relu": ("output range of the producing kernel",),
    "Clip": ("output range of the producing kernel",),
}


def integer_kernels(op_type: str, domain: str = "") -> tuple[str, ...]:
    """The integer kernels ORT has for a float op (`base_op` applied); a MOVEMENT op runs
    on 8-bit data as itself; () when ORT has none."""
    op = base_op(op_type)
    if op in INTEGER_KERNELS:
        return INTEGER_KERNELS[op]
    if op != "Cast" and OpKind.MOVEMENT in (op_kind(op), op_kind(op_type, domain)):
        return (f"8-bit {op}",)
    return ()


@dataclasses.dataclass(frozen=True)
class Signature:
    """Where an integer kernel's operands are (input indices; None: absent)."""

    #: the activation input
    x: int
    #: its zero point (its dtype is the activation's); None when the kernel quantizes the
    #: activation itself (`x_dtype`) or has none
    x_zero_point: int | None
    #: a weight input (None: every operand is an activation, e.g. QLinearAdd)
    w: int | None = None
    #: the output's zero point; None when the output is int32 or float
    y_zero_point: int | None = None
    #: the activation dtype when the kernel quantizes a float input itself
    x_dtype: str | None = None
    #: "conv", "matmul", "gemm": how the weight is laid out along the reduction axis K.
    #: Set only for kernels whose u8s8 path on AVX2 without VNNI multiplies adjacent K pairs
    #: with `vpmaddubsw` (16-bit saturating sums; measured: QLinearConv, QLinearMatMul,
    #: QGemm, MatMulInteger, MatMulIntegerToFloat, DynamicQuantizeMatMul saturate; ORT's
    #: ConvInteger and depthwise QLinearConv widen to 16 bits first and do not).
    pair_sums: str | None = None


_QLINEAR_CONV = Signature(x=0, x_zero_point=2, w=3, y_zero_point=7, pair_sums="conv")
_UNARY = Signature(x=0, x_zero_point=2, y_zero_point=4)

#: (domain, op_type) -> operand positions of ORT's integer kernels.
SIGNATURES: dict[tuple[str, str], Signature] = {
    ("", "QLinearConv"): _QLINEAR_CONV,
    (MS_DOMAIN, "QLinearConv"): _QLINEAR_CONV,
    ("", "QLinearMatMul"): Signature(x=0, x_zero_point=2, w=3, y_zero_point=7, pair_sums="matmul"),
    (MS_DOMAIN, "QGemm"): Signature(x=0, x_zero_point=2, w=3, y_zero_point=8, pair_sums="gemm"),
    ("", "MatMulInteger"): Signature(x=0, x_zero_point=2, w=1, pair_sums="matmul"),
    (MS_DOMAIN, "MatMulIntegerToFloat"): Signature(x=0, x_zero_point=4, w=1, pair_sums="matmul"),
    (MS_DOMAIN, "DynamicQuantizeMatMul"): Signature(x=0, x_zero_point=None, w=1, x_dtype="uint8",
                                                    pair_sums="matmul"),
    ("", "ConvInteger"): Signature(x=0, x_zero_point=2, w=1),
    (MS_DOMAIN, "QLinearAdd"): Signature(x=0, x_zero_point=2, y_zero_point=7),
    (MS_DOMAIN, "QLinearMul"): Signature(x=0, x_zero_point=2, y_zero_point=7),
    (MS_DOMAIN, "QLinearConcat"): Signature(x=2, x_zero_point=4, y_zero_point=1),
    (MS_DOMAIN, "QLinearAveragePool"): _UNARY,
    (MS_DOMAIN, "QLinearGlobalAveragePool"): _UNARY,
    (MS_DOMAIN, "QLinearSigmoid"): _UNARY,
    (MS_DOMAIN, "QLinearLeakyRelu"): _UNARY,
    (MS_DOMAIN, "QLinearSoftmax"): _UNARY,
    (MS_DOMAIN, "QLinearReduceMean"): _UNARY,
}


def signature(op_type: str, domain: str = "") -> Signature | None:
    return SIGNATURES.get(("" if domain == "ai.onnx" else domain, op_type))
