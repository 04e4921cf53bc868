"""fold_batchnorm: fold inference-mode BatchNormalization into the op before it (exact).

Per channel c, BatchNormalization computes y = s_c * x + t_c with
s = gamma / sqrt(var + epsilon) and t = beta - mean * s. When x is linear in a constant
weight along that channel, x = W a + B, the two collapse into one op:

    y = (W * s) a + (B * s + t)

1. Conv -> BN: W [M, C/group, k...] is scaled along axis 0; bias B (zero if absent).
2. ConvTranspose -> BN: W [C, M/group, k...]; output channel m = j * M/group + i is column
   i of group j, so W is scaled per group along axis 1.
3. Gemm -> BN: Y = alpha A' B' + beta C; the columns of B' (rows of B when transB=1) are
   scaled, C becomes (beta C) * s + t and the beta attribute is dropped.
4. MatMul(a, W) -> BN, W a constant 2-D weight and a known to be 2-D (then BN's channel
   axis 1 is W's output axis): MatMul(a, W * s) + Add(t).

Skipped, with the reason in `stats["skipped"]`: BN in training mode or with spatial=0,
non-constant weight, bias or BN parameters, a weight shared with another node (folding
would need a second copy of it), parameters that do not match the channel count, a MatMul
input whose rank is not known to be 2, an intermediate output used elsewhere.

Exact: new weights are computed in float64 and rounded once to their dtype, so outputs
change by float rounding only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.passes.base import register_pass
from slimgraph.passes.rewrite import Rule, RulePass, constant, rank, used_outside

NOT_CONSTANT = "weight or bias is not a constant"
SHARED = "weight is shared with another node"


def _bn_affine(bn: ir.Node, channels: int) -> tuple[np.ndarray, np.ndarray] | str:
    """(s, t) with BN(x) = s * x + t per channel, or why BN cannot be folded."""
    if bn.attributes.get_int("training_mode", 0) == 1 or any(o.name for o in bn.outputs[1:]):
        return "BatchNormalization is in training mode"
    if bn.attributes.get_int("spatial", 1) == 0:
        return "BatchNormalization has spatial=0"
    params = [constant(v) for v in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return "BatchNormalization parameters are not constant"
    if any(p.shape != (channels,) for p in params):
        return "BatchNormalization parameters do not match the output channels"
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = bn.attributes.get_float("epsilon", 1e-5)
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def _weight(node: ir.Node, index: int) -> np.ndarray | str:
    """A node's constant float weight that no other node reads, or why not."""
    array = constant(node.inputs[index])
    if array is None:
        return NOT_CONSTANT
    if not np.issubdtype(array.dtype, np.floating):
        return "weight is not a float tensor"
    if used_outside(node.inputs[index], [node]) is not None:
        return SHARED
    return array


def _optional(node: ir.Node, index: int, default: np.ndarray) -> np.ndarray | str:
    """A node's optional constant input (default when absent), or why not usable."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return default
    array = constant(node.inputs[index])
    return NOT_CONSTANT if array is None else array


# --- Conv / ConvTranspose -----------------------------------------------------------------------
def _conv_channels(conv: ir.Node, w: np.ndarray) -> int:
    if conv.op_type == "Conv":
        return w.shape[0]
    return w.shape[1] * conv.attributes.get_int("group", 1)


def _scale_conv_weight(conv: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    spatial = (1,) * (w.ndim - 2)
    if conv.op_type == "Conv":
        return w * s.reshape(-1, 1, *spatial)
    group = conv.attributes.get_int("group", 1)
    grouped = w.reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
    return (grouped * s.reshape(group, 1, w.shape[1], *spatial)).reshape(w.shape)


def _conv_plan(inner: ir.Value, bn: ir.Value):
    conv, norm = inner.producer(), bn.producer()
    w = _weight(conv, 1)
    if isinstance(w, str):
        return w
    if w.ndim < 3 or (conv.op_type == "ConvTranspose" and w.shape[0] % conv.attributes.get_int("group", 1)):
        return "unsupported weight layout"
    channels = _conv_channels(conv, w)
    affine = _bn_affine(norm, channels)
    if isinstance(affine, str):
        return affine
    b = _optional(conv, 2, np.zeros(channels, w.dtype))
    if isinstance(b, str):
        return b
    s, t = affine
    new_w = _scale_conv_weight(conv, w.astype(np.float64), s)
    return conv, new_w.astype(w.dtype), (b * s + t).astype(w.dtype)


def _conv_bn_rule(op_type: str) -> Rule:
    def pattern(op, x):
        inner = getattr(op, op_type)(x, _allow_other_inputs=True, _outputs=["inner"])
        return op.BatchNormalization(inner, _allow_other_inputs=True, _outputs=["bn"])

    def check(m, x, inner, bn):
        plan = _conv_plan(inner, bn)
        return plan if isinstance(plan, str) else None

    def rewrite(op, x, inner, bn):
        conv, w, b = _conv_plan(inner, bn)
        return op.op(
            op_type, x,
            op.initializer(w, f"{conv.inputs[1].name}_bn"),
            op.initializer(b, f"{conv.inputs[1].name}_bn_bias"),
            **conv.attributes,
        )

    return Rule(f"fold_batchnorm_{op_type.lower()}", pattern, rewrite, check)


# --- Gemm ---------------------------------------------------------------------------------------
def _gemm_plan(inner: ir.Value, bn: ir.Value):
    gemm, norm = inner.producer(), bn.producer()
    w = _weight(gemm, 1)
    if isinstance(w, str):
        return w
    if w.ndim != 2:
        return "unsupported weight layout"
    trans_b = gemm.attributes.get_int("transB", 0)
    channels = w.shape[0] if trans_b else w.shape[1]
    affine = _bn_affine(norm, channels)
    if isinstance(affine, str):
        return affine
    c = _optional(gemm, 2, np.zeros((), w.dtype))
    if isinstance(c, str):
        return c
    s, t = affine
    new_w = w * (s[:, None] if trans_b else s[None, :])
    new_c = gemm.attributes.get_float("beta", 1.0) * c.astype(np.float64) * s + t
    attributes = {k: v for k, v in gemm.attributes.items() if k != "beta"}
    return gemm, new_w.astype(w.dtype), new_c.astype(w.dtype), attributes


def _gemm_bn_rule() -> Rule:
    def pattern(op, a):
        inner = op.Gemm(a, _allow_other_inputs=True, _outputs=["inner"])
        return op.BatchNormalization(inner, _allow_other_inputs=True, _outputs=["bn"])

    def check(m, a, inner, bn):
        plan = _gemm_plan(inner, bn)
        return plan if isinstance(plan, str) else None

    def rewrite(op, a, inner, bn):
        gemm, w, c, attributes = _gemm_plan(inner, bn)
        name = gemm.inputs[1].name
        return op.Gemm(a, op.initializer(w, f"{name}_bn"), op.initializer(c, f"{name}_bn_bias"), **attributes)

    return Rule("fold_batchnorm_gemm", pattern, rewrite, check)


# --- MatMul -------------------------------------------------------------------------------------
def _matmul_plan(a: ir.Value, inner: ir.Value, bn: ir.Value):
    matmul, norm = inner.producer(), bn.producer()
    if rank(a) != 2:
        return "MatMul input is not known to be 2-D"
    w = _weight(matmul, 1)
    if isinstance(w, str):
        return w
    if w.ndim != 2:
        return "unsupported weight layout"
    affine = _bn_affine(norm, w.shape[1])
    if isinstance(affine, str):
        return affine
    s, t = affine
    return matmul, (w * s[None, :]).astype(w.dtype), t.astype(w.dtype)


def _matmul_bn_rule() -> Rule:
    def pattern(op, a, w):
        inner = op.MatMul(a, w, _outputs=["inner"])
        return op.BatchNormalization(inner, _allow_other_inputs=True, _outputs=["bn"])

    def check(m, a, w, inner, bn):
        plan = _matmul_plan(a, inner, bn)
        return plan if isinstance(plan, str) else None

    def rewrite(op, a, w, inner, bn):
        _, new_w, bias = _matmul_plan(a, inner, bn)
        product = op.MatMul(a, op.initializer(new_w, f"{w.name}_bn"))
        return op.Add(product, op.initializer(bias, f"{w.name}_bn_bias"))

    return Rule("fold_batchnorm_matmul", pattern, rewrite, check)


@register_pass
class FoldBatchNorm(RulePass):
    """Fold BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it (exact)."""

    name = "fold_batchnorm"
    counter = "folded"
    before = ("quantize*",)

    def rules(self, model):
        return [_conv_bn_rule("Conv"), _conv_bn_rule("ConvTranspose"), _gemm_bn_rule(), _matmul_bn_rule()]
