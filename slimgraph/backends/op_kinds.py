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
"""

from __future__ import annotations

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
        "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4",
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
