"""matmul_add_to_gemm: MatMul(a, W) + bias -> Gemm(a, W, bias) (exact).

Gemm computes a W + C in one kernel (and ORT pre-packs a constant W). It only takes 2-D
operands, and C must broadcast to the [N, M] result without growing it, so the rule fires
when all of these hold:

1. W is a constant 2-D weight [K, M];
2. a is known to be 2-D (its shape is in the IR: run `infer_shapes` first if it is not);
3. the bias is a constant whose shape broadcasts to [N, M] without changing it: a scalar,
   [M], [1, M], [N, M] or [N, 1] (N must be known when the bias depends on it);
4. the element type is float, double or float16 (the Gemm kernels ORT has).

Otherwise the reason goes to `stats["skipped"]`. Exact: Gemm computes the same sum of
products and bias; outputs change by float rounding only.
"""

from __future__ import annotations

import onnx_ir as ir

from slimgraph.passes.base import register_pass
from slimgraph.passes.rewrite import Rule, RulePass, constant, not_constant, rank

GEMM_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16})


def _bias_fits(bias_shape: tuple[int, ...], a: ir.Value, m: int) -> str | None:
    """None when a bias of this shape broadcasts to [N, M] without changing it."""
    if len(bias_shape) > 2:
        return "bias would broadcast the product to a higher rank"
    if bias_shape and bias_shape[-1] not in (1, m):
        return "bias does not broadcast to the product's shape"
    if len(bias_shape) == 2 and bias_shape[0] != 1:
        n = a.shape[0]
        if not isinstance(n, int):
            return "bias depends on the batch dimension, which is not known"
        if bias_shape[0] != n:
            return "bias does not broadcast to the product's shape"
    return None


def _check(m, a, w, bias):
    weight, b = constant(w), constant(bias)
    if weight is None:
        return not_constant(w, "weight")
    if weight.ndim != 2:
        return "weight is not 2-D"
    if rank(a) is None:
        return "activation rank is unknown (run infer_shapes first)"
    if rank(a) != 2:
        return "activation is not 2-D"
    if b is None:
        return not_constant(bias, "bias")
    if w.dtype not in GEMM_DTYPES:
        return f"no Gemm kernel for {w.dtype}"
    return _bias_fits(b.shape, a, weight.shape[1])


def _rewrite(op, a, w, bias):
    return op.Gemm(a, w, bias)


def _pattern(op, a, w, bias):
    return op.Add(op.MatMul(a, w), bias)


@register_pass
class MatMulAddToGemm(RulePass):
    """Turn MatMul(2-D activation, constant 2-D weight) + constant bias into Gemm (exact)."""

    name = "matmul_add_to_gemm"

    def rules(self, model):
        return [Rule("matmul_add_to_gemm", _pattern, _rewrite, _check, commute=True)]
