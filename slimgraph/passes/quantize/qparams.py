"""Quantization parameters: how a float range maps to integers, shared by every quantize pass.

    q = clip(round(x / scale) + zero_point, qmin, qmax)        x ≈ (q - zero_point) * scale

`QParams` holds scale and zero point per tensor (`axis=None`) or per channel (`axis=k`),
for a target integer type. `from_range` derives them from an observed [min, max]:

1. the range is widened to include 0, so that 0.0 (padding, ReLU output) is exact;
2. symmetric: zero point at the type's middle (0 for int8, 128 for uint8),
   scale = max(|min|, |max|) / (levels / 2);
3. asymmetric: scale = (max - min) / levels, zero point = round(qmin - min / scale);
4. `bits` < the type's width narrows the integer range (e.g. 7-bit weights in int8,
   the usual cure for u8s8 saturation on x86 CPUs without VNNI).

Annotations written by calibration and read by lowering use `Model.annotate(node,
"qparams.<input|output>.<i>", qparams.to_json())`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

INTEGER_TYPES = {
    "int8": (np.int8, -128, 127, ir.DataType.INT8),
    "uint8": (np.uint8, 0, 255, ir.DataType.UINT8),
    "int4": (np.int8, -8, 7, ir.DataType.INT4),
    "uint4": (np.uint8, 0, 15, ir.DataType.UINT4),
    "int16": (np.int16, -32768, 32767, ir.DataType.INT16),
}


def qrange(dtype: str, bits: int | None = None, symmetric: bool = False) -> tuple[int, int]:
    """Integer range used for `dtype` with `bits` of it (narrowed around the middle).
    Symmetric signed ranges drop the lowest value (int8: -127..127) so 0 is centred."""
    _, lo, hi, _ = INTEGER_TYPES[dtype]
    width = int(np.log2(hi - lo + 1))
    if bits is not None and bits < width:
        mid = (lo + hi + 1) // 2
        half = 1 << (bits - 1)
        lo, hi = mid - half, mid + half - 1
    if symmetric and lo < 0:
        lo = -hi
    return lo, hi


@dataclasses.dataclass(frozen=True)
class QParams:
    scale: np.ndarray  # float32, shape () or (C,)
    zero_point: np.ndarray  # integer, same shape as scale
    dtype: str  # a key of INTEGER_TYPES
    axis: int | None = None  # channel axis for per-channel parameters
    bits: int | None = None

    @property
    def np_dtype(self):
        return INTEGER_TYPES[self.dtype][0]

    @property
    def ir_dtype(self) -> ir.DataType:
        return INTEGER_TYPES[self.dtype][3]

    @property
    def qmin_qmax(self) -> tuple[int, int]:
        return qrange(self.dtype, self.bits)

    @classmethod
    def from_range(cls, low, high, *, dtype: str = "uint8", symmetric: bool = False,
                   bits: int | None = None, axis: int | None = None) -> QParams:
        low = np.minimum(np.asarray(low, np.float64), 0.0)
        high = np.maximum(np.asarray(high, np.float64), 0.0)
        qmin, qmax = qrange(dtype, bits, symmetric)
        if symmetric:
            bound = np.maximum(np.abs(low), np.abs(high))
            scale = bound / ((qmax - qmin) / 2)
            zero = np.full(np.shape(scale), (qmin + qmax + 1) // 2 if qmin >= 0 else 0)
        else:
            scale = (high - low) / (qmax - qmin)
            safe = np.where(scale > 0, scale, 1.0)
            zero = np.clip(np.round(qmin - low / safe), qmin, qmax)
        scale = np.where(scale > 0, scale, 1.0)  # an all-zero tensor: any scale is exact
        return cls(scale.astype(np.float32), zero.astype(INTEGER_TYPES[dtype][0]), dtype, axis, bits)

    def _expand(self, a: np.ndarray, ndim: int) -> np.ndarray:
        if self.axis is None or a.ndim == 0:
            return a
        shape = [1] * ndim
        shape[self.axis] = -1
        return a.reshape(shape)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        s, z = self._expand(self.scale, x.ndim), self._expand(self.zero_point, x.ndim)
        qmin, qmax = self.qmin_qmax
        q = np.clip(np.round(x / s) + z.astype(np.int32), qmin, qmax)
        return q.astype(self.np_dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        s, z = self._expand(self.scale, q.ndim), self._expand(self.zero_point, q.ndim)
        return ((q.astype(np.int32) - z.astype(np.int32)) * s).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale.tolist(), "zero_point": self.zero_point.tolist(),
                "dtype": self.dtype, "axis": self.axis, "bits": self.bits}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QParams:
        np_dtype = INTEGER_TYPES[d["dtype"]][0]
        return cls(np.asarray(d["scale"], np.float32), np.asarray(d["zero_point"], np_dtype),
                   d["dtype"], d.get("axis"), d.get("bits"))
