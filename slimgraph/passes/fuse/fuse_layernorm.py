"""fuse_layernorm: LayerNormalization written as a chain of ops -> LayerNormalization (exact).

The chain torch exports below opset 17, and its common variants:

    mean = ReduceMean(x, axes)                      keepdims=1
    d    = x - mean
    var  = ReduceMean(d * d  or  Pow(d, 2), axes)   the same axes
    std  = Sqrt(var + eps)                          eps a one-element constant
    n    = d / std  or  d * Reciprocal(std)  or  d * (Reciprocal(std) * gamma)
    y    = n * gamma + beta                         each optional

1. The six chains ending at n -> LayerNormalization(x, scale, axis=-k, epsilon=eps), where
   the axes are the k trailing axes and scale is ones (gamma in the third form).
2. LayerNormalization(x, s, b) * gamma -> LayerNormalization(x, s * gamma, b * gamma).
3. LayerNormalization(x, s, b) + beta  -> LayerNormalization(x, s, b + beta).
   2 and 3 complete 1, and also absorb an affine step after a LayerNormalization that was
   in the model already.

Conditions (otherwise the reason goes to `stats["skipped"]`): opset >= 17; float32 or
float16; the reduced axes are provably the trailing axes (negative axes, or a known
rank); the normalized dimensions x.shape[-k:] are known (run `infer_shapes` first);
gamma and beta are constants whose shapes broadcast along the normalized dimensions only
(so the output keeps x's shape); no intermediate value is used elsewhere.

Not matched: variance computed as E[x^2] - E[x]^2 (the one-pass form Flax/jax2tf models
such as magika use, with a clamp at 0). It is not the same function in float arithmetic:
it loses precision when |mean| >> std, so fusing it would not be exact.

Exact: LayerNormalization computes the same mean, variance and normalization (in float32
for float16 inputs); outputs change by float rounding only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.passes.base import register_pass
from slimgraph.passes.rewrite import (
    NoMatch, Rule, RulePass, constant, dtype_of, expect_scalars, not_constant, rank,
)

MIN_OPSET = 17
DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
#: ReduceMean without axes reduces every axis.
ALL_AXES = "all"


# --- checks -----------------------------------------------------------------------------------
def _axes(reduce: ir.Node) -> tuple[int, ...] | str:
    """ReduceMean's axes (ALL_AXES when it reduces everything), or why they are unusable."""
    if reduce.attributes.get_int("keepdims", 1) != 1:
        return "ReduceMean does not keep the reduced dimensions"
    if len(reduce.inputs) > 1 and reduce.inputs[1] is not None:  # opset 18: axes input
        axes = constant(reduce.inputs[1])
        if axes is None:
            return "reduction axes are not constant"
        axes = tuple(int(a) for a in axes.ravel())
    else:
        axes = tuple(reduce.attributes.get_ints("axes", ()))
    if not axes and reduce.attributes.get_int("noop_with_empty_axes", 0):
        return NoMatch("ReduceMean is a no-op")
    return axes or ALL_AXES


def _trailing(axes: tuple[int, ...] | str, x_rank: int | None) -> int | str:
    """How many trailing axes `axes` are, or why they are not provably the trailing axes."""
    if axes == ALL_AXES or any(a >= 0 for a in axes):
        if x_rank is None:
            return "input rank is unknown (run infer_shapes first)"
        axes = range(x_rank) if axes == ALL_AXES else axes
        axes = [a - x_rank if a >= 0 else a for a in axes]
    normalized = sorted(set(axes))
    if normalized != list(range(-len(normalized), 0)) or (x_rank is not None and len(normalized) > x_rank):
        return "normalization axes are not the trailing axes"
    return len(normalized)


def _normalized_shape(x: ir.Value, k: int) -> tuple[int, ...] | str:
    if x.shape is None or not all(isinstance(d, int) for d in list(x.shape)[-k:]):
        return "normalized dimensions are not known (run infer_shapes first)"
    return tuple(x.shape)[-k:]


def _fit(param: np.ndarray, shape: tuple[int, ...], x_rank: int, what: str) -> np.ndarray | str:
    """`param` as an array of the normalized `shape`, when broadcasting it against x only
    runs along the normalized axes; else why not."""
    k = len(shape)
    if param.ndim > x_rank or any(d != 1 for d in param.shape[: max(param.ndim - k, 0)]):
        return f"{what} broadcasts along the non-normalized axes"
    tail = (1,) * max(k - param.ndim, 0) + param.shape[-k:] if param.ndim else (1,) * k
    if any(t not in (1, s) for t, s in zip(tail, shape)):
        return f"{what} does not match the normalized dimensions"
    return np.broadcast_to(param.reshape(tail), shape)


# --- 1. the chain -----------------------------------------------------------------------------
def _chain(square: str, normalize: str):
    def pattern(op, x, two, eps, gamma):
        mean = op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])
        d = op.Sub(x, mean)
        variance = op.ReduceMean(op.Pow(d, two) if square == "pow" else op.Mul(d, d),
                                 _allow_other_inputs=True, _outputs=["variance"])
        std = op.Sqrt(op.Add(variance, eps))
        if normalize == "div":
            return op.Div(d, std)
        if normalize == "reciprocal":
            return op.Mul(d, op.Reciprocal(std))
        return op.Mul(d, op.Mul(op.Reciprocal(std), gamma))

    return pattern


def _chain_plan(x, two, eps, gamma, mean, variance, opset: int):
    """(axis, epsilon, scale) of the LayerNormalization, or why there is none."""
    if two is not None and (reason := expect_scalars(x, power=(two, 2.0))) is not None:
        return reason
    axes = _axes(mean.producer())
    if isinstance(axes, str):
        return axes
    if _axes(variance.producer()) != axes:
        return NoMatch("the two ReduceMeans reduce different axes")
    if opset < MIN_OPSET:
        return f"LayerNormalization needs opset >= {MIN_OPSET}"
    dtype = dtype_of(x, eps, gamma)
    if dtype not in DTYPES:
        return "element type unknown (run infer_shapes first)" if dtype is None else f"not fused for {dtype}"
    k = _trailing(axes, rank(x))
    if isinstance(k, str):
        return k
    epsilon = constant(eps)
    if epsilon is None or epsilon.size != 1:
        return "epsilon is not a one-element constant"
    shape = _normalized_shape(x, k)
    if isinstance(shape, str):
        return shape
    if epsilon.ndim > rank(x):
        return "epsilon broadcasts the output"
    scale = np.ones(shape, dtype.numpy())
    if gamma is not None:
        g = constant(gamma)
        scale = "scale is not a constant" if g is None else _fit(g, shape, rank(x), "scale")
        if isinstance(scale, str):
            return scale
    return -k, float(epsilon.reshape(())), scale


def _chain_rule(square: str, normalize: str, opset: int) -> Rule:
    def check(m, x, two, eps, gamma, mean, variance):
        plan = _chain_plan(x, two, eps, gamma, mean, variance, opset)
        return plan if isinstance(plan, str) else None

    def rewrite(op, x, two, eps, gamma, mean, variance):
        axis, epsilon, scale = _chain_plan(x, two, eps, gamma, mean, variance, opset)
        return op.LayerNormalization(x, op.initializer(scale, "layernorm_scale"), axis=axis, epsilon=epsilon)

    return Rule(f"layernorm_{square}_{normalize}", _chain(square, normalize), rewrite, check)


# --- 2./3. affine steps after a LayerNormalization --------------------------------------------
def _affine_plan(x, p, ln, kind: str):
    """(attributes, new scale, new bias or None) for LN followed by `* p` or `+ p`."""
    node = ln.producer()
    what = "multiplier" if kind == "scale" else "added value"
    param = constant(p)
    if param is None:
        return not_constant(p, what)
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    scale, bias = constant(node.inputs[1]), constant(node.inputs[2]) if has_bias else None
    if scale is None or (has_bias and bias is None):
        return "LayerNormalization scale or bias is not a constant"
    if rank(x) is None:
        return "input rank is unknown (run infer_shapes first)"
    axis = node.attributes.get_int("axis", -1)
    shape = _normalized_shape(x, rank(x) - axis if axis >= 0 else -axis)
    if isinstance(shape, str):
        return shape
    fitted = [_fit(a, shape, rank(x), name) for a, name in ((param, what), (scale, "scale"), (bias, "bias"))
              if a is not None]
    if reason := next((f for f in fitted if isinstance(f, str)), None):
        return reason
    param, scale, bias = fitted[0], fitted[1], fitted[2] if has_bias else None
    if kind == "scale":  # (n s + b) p = n (s p) + b p
        scale, bias = scale * param, None if bias is None else bias * param
    else:  # (n s + b) + p = n s + (b + p)
        bias = param if bias is None else bias + param
    dtype = param.dtype
    return node.attributes, scale.astype(dtype), None if bias is None else bias.astype(dtype)


def _affine_rule(kind: str) -> Rule:
    def pattern(op, x, p):
        ln = op.LayerNormalization(x, _allow_other_inputs=True, _outputs=["ln"])
        return op.Mul(ln, p) if kind == "scale" else op.Add(ln, p)

    def check(m, x, p, ln):
        plan = _affine_plan(x, p, ln, kind)
        return plan if isinstance(plan, str) else None

    def rewrite(op, x, p, ln):
        attributes, scale, bias = _affine_plan(x, p, ln, kind)
        inputs = [x, op.initializer(scale, "layernorm_scale")]
        if bias is not None:
            inputs.append(op.initializer(bias, "layernorm_bias"))
        return op.LayerNormalization(*inputs, **attributes)

    return Rule(f"layernorm_absorb_{kind}", pattern, rewrite, check, commute=True, counts=False)


@register_pass
class FuseLayerNorm(RulePass):
    """Recognise LayerNormalization chains (ReduceMean/Sub/Pow/Sqrt/Div...) as one op (exact)."""

    name = "fuse_layernorm"

    def rules(self, model):
        chains = [_chain_rule(sq, norm, model.opset) for sq in ("pow", "mul")
                  for norm in ("div", "reciprocal", "reciprocal_scaled")]
        return [*chains, _affine_rule("scale"), _affine_rule("bias")]
