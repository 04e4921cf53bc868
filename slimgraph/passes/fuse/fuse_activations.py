"""fuse_activations: activation functions written as elementwise chains -> one op (exact).

Recognised (Add/Mul operands in any order; constants may be scalars or, when the rank
is known, one-element tensors that cannot broadcast the result):

1. HardSigmoid: Clip(x + 3, 0, 6) / 6 and Clip(x + 3, 0, 6) * (1/6) (Clip with min/max as
   inputs or, before opset 11, as attributes; torch exports ReLU6 as this Clip).
2. HardSwish: x * Clip(x + 3, 0, 6) / 6, x * Clip(x + 3, 0, 6) * (1/6), and
   x * HardSigmoid(x) with alpha = 1/6, beta = 1/2 (what 1. leaves of x * (Clip(..)/6)).
3. SiLU: x * Sigmoid(x).
4. GELU, erf form: 0.5 x (1 + erf(x / sqrt 2)), with x / sqrt 2 or x * (1/sqrt 2) and the
   0.5 applied to x, to (1 + erf), or to the product.
5. GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with x^3 as Pow(x, 3),
   x * (x * x), or x * (x * (0.044715 x)), and the 0.5 placed as in 4.

What each becomes (`TARGETS`): the standard op where the model's opset defines it and
onnxruntime runs it; otherwise, with `contrib_ops=True` (the default, since ORT is the
backend), ORT's com.microsoft op; otherwise the chain is left alone and the reason
counted in `stats["skipped"]`:

| activation | standard op (opsets)          | com.microsoft op     |
|------------|-------------------------------|----------------------|
| HardSigmoid| HardSigmoid (6+)              | -                    |
| HardSwish  | HardSwish (14+)               | - (skipped below 14) |
| SiLU       | Swish (24; ORT 1.32 runs it   | QuickGelu(alpha=1)   |
|            | at opset 24 only)             |                      |
| GELU erf   | Gelu (20+)                    | Gelu                 |
| GELU tanh  | Gelu(approximate=tanh) (20+)  | FastGelu             |

Only float32 and float16 chains are fused (ORT's CPU kernels for HardSigmoid, HardSwish
and Gelu do not take double); the element type must be known, from the value or from a
constant of the chain.

Exact: each op computes the same function as its chain; outputs change by float rounding
only (the fused ops evaluate it in another order, e.g. x/6 + 0.5 instead of (x + 3)/6).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from slimgraph.passes.base import PassConfig, register_pass
from slimgraph.passes.rewrite import NoMatch, Rule, RulePass, constant, dtype_of, expect_scalars

MS_DOMAIN = "com.microsoft"
DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715


@dataclasses.dataclass(frozen=True)
class Target:
    """The op an activation becomes: a standard op within `opsets`, else a contrib op."""

    op: str
    attributes: dict[str, Any]
    opsets: tuple[int, int | None]
    contrib: tuple[str, dict[str, Any]] | None = None

    def resolve(self, opset: int, contrib_ops: bool) -> tuple[str, str, dict[str, Any]] | str:
        """(domain, op, attributes) for this opset, or why there is none."""
        low, high = self.opsets
        if opset >= low and (high is None or opset <= high):
            return "", self.op, self.attributes
        if contrib_ops and self.contrib is not None:
            return MS_DOMAIN, *self.contrib
        needs = f"opset >= {low}" if high is None else f"opset {low}..{high} (what onnxruntime runs)"
        return f"{self.op} needs {needs}" + ("" if self.contrib is None else " or contrib_ops=True")


#: Op identity for every recognised activation, in one place (see the module docstring).
TARGETS: dict[str, Target] = {
    "hardsigmoid": Target("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}, (6, None)),
    "hardswish": Target("HardSwish", {}, (14, None)),
    "silu": Target("Swish", {}, (24, 24), contrib=("QuickGelu", {"alpha": 1.0})),
    "gelu": Target("Gelu", {}, (20, None), contrib=("Gelu", {})),
    "gelu_tanh": Target("Gelu", {"approximate": "tanh"}, (20, None), contrib=("FastGelu", {})),
}


@dataclasses.dataclass(frozen=True)
class Form:
    """One way of writing an activation: its pattern, the constants it must have (bound
    to pattern variables of these names), and an optional extra check."""

    name: str
    activation: str
    pattern: Callable[..., Any]
    constants: dict[str, float]
    extra: Callable[[dict[str, Any]], str | None] | None = None


# --- HardSigmoid / HardSwish ------------------------------------------------------------------
def _clip_bounds(clip: ir.Node) -> tuple[float, float] | None:
    """Clip's (min, max) when constant: attributes before opset 11, inputs from 11 on."""
    if len(clip.inputs) == 1:
        return clip.attributes.get_float("min", -math.inf), clip.attributes.get_float("max", math.inf)
    bounds = []
    for index, default in ((1, -math.inf), (2, math.inf)):
        value = clip.inputs[index] if len(clip.inputs) > index else None
        array = None if value is None else constant(value)
        if value is not None and (array is None or array.size != 1):
            return None
        bounds.append(default if value is None else float(array.reshape(())))
    return bounds[0], bounds[1]


def _relu6_bounds(b: dict[str, Any]) -> str | None:
    bounds = _clip_bounds(b["clip"].producer())
    if bounds is None or not all(math.isclose(u, v, abs_tol=1e-6) for u, v in zip(bounds, (0.0, 6.0))):
        return NoMatch("Clip bounds are not (0, 6)")
    return None


def _hardsigmoid_is_sixth(b: dict[str, Any]) -> str | None:
    node = b["hsig"].producer()
    alpha, beta = node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)
    if not (math.isclose(alpha, 1 / 6, rel_tol=1e-5) and math.isclose(beta, 0.5, rel_tol=1e-5)):
        return NoMatch("HardSigmoid is not x/6 + 1/2")
    return None


def _relu6_x3(op, x, three):
    return op.Clip(op.Add(x, three), _allow_other_inputs=True, _outputs=["clip"])


def _hsig_div(op, x, three, six):
    return op.Div(_relu6_x3(op, x, three), six)


def _hsig_mul(op, x, three, sixth):
    return op.Mul(_relu6_x3(op, x, three), sixth)


def _hswish_div(op, x, three, six):
    return op.Div(op.Mul(x, _relu6_x3(op, x, three)), six)


def _hswish_mul(op, x, three, sixth):
    return op.Mul(op.Mul(x, _relu6_x3(op, x, three)), sixth)


def _hswish_hsig(op, x):
    return op.Mul(x, op.HardSigmoid(x, _outputs=["hsig"]))


def _silu(op, x):
    return op.Mul(x, op.Sigmoid(x))


# --- GELU -------------------------------------------------------------------------------------
# Patterns share one signature (unused variables bind to None). Operands are written in the
# canonical order of slimgraph.passes.rewrite: constants second, deeper operands second.
def _erf_div(op, x, scale, cubic, power):
    return op.Erf(op.Div(x, scale))


def _erf_mul(op, x, scale, cubic, power):
    return op.Erf(op.Mul(x, scale))


def _cube_pow(op, x, cubic, power):
    return op.Mul(op.Pow(x, power), cubic)


def _cube_mul(op, x, cubic, power):
    return op.Mul(op.Mul(x, op.Mul(x, x)), cubic)


def _cube_nested(op, x, cubic, power):
    return op.Mul(x, op.Mul(x, op.Mul(x, cubic)))


def _tanh_of(cube):
    def term(op, x, scale, cubic, power):
        return op.Tanh(op.Mul(op.Add(x, cube(op, x, cubic, power)), scale))

    return term


def _half_on_x(op, x, half, s):  # (x * 0.5) * s
    return op.Mul(op.Mul(x, half), s)


def _half_on_s(op, x, half, s):  # x * (s * 0.5)
    return op.Mul(x, op.Mul(s, half))


def _half_last(op, x, half, s):  # (x * s) * 0.5
    return op.Mul(op.Mul(x, s), half)


def _gelu_forms() -> list[Form]:
    terms = [
        ("erf_div", "gelu", _erf_div, {"scale": SQRT2}),
        ("erf_mul", "gelu", _erf_mul, {"scale": 1 / SQRT2}),
        ("tanh_pow", "gelu_tanh", _tanh_of(_cube_pow),
         {"scale": SQRT_2_OVER_PI, "cubic": CUBIC, "power": 3.0}),
        ("tanh_mul", "gelu_tanh", _tanh_of(_cube_mul), {"scale": SQRT_2_OVER_PI, "cubic": CUBIC}),
        ("tanh_nested", "gelu_tanh", _tanh_of(_cube_nested), {"scale": SQRT_2_OVER_PI, "cubic": CUBIC}),
    ]
    return [
        Form(f"{activation}_{term_name}{outer.__name__}", activation, _gelu_pattern(term, outer),
             {"half": 0.5, "one": 1.0, **constants})
        for term_name, activation, term, constants in terms
        for outer in (_half_on_x, _half_on_s, _half_last)
    ]


def _gelu_pattern(term, outer):
    def pattern(op, x, half, one, scale, cubic, power):
        return outer(op, x, half, op.Add(term(op, x, scale, cubic, power), one))

    return pattern


FORMS: list[Form] = [
    Form("hardsigmoid_div", "hardsigmoid", _hsig_div, {"three": 3.0, "six": 6.0}, _relu6_bounds),
    Form("hardsigmoid_mul", "hardsigmoid", _hsig_mul, {"three": 3.0, "sixth": 1 / 6}, _relu6_bounds),
    Form("hardswish_div", "hardswish", _hswish_div, {"three": 3.0, "six": 6.0}, _relu6_bounds),
    Form("hardswish_mul", "hardswish", _hswish_mul, {"three": 3.0, "sixth": 1 / 6}, _relu6_bounds),
    Form("hardswish_hardsigmoid", "hardswish", _hswish_hsig, {}, _hardsigmoid_is_sixth),
    Form("silu", "silu", _silu, {}),
    *_gelu_forms(),
]


def _rule(form: Form, target: tuple[str, str, dict[str, Any]] | str) -> Rule:
    def check(m, x, **b):
        reason = expect_scalars(x, **{k: (b[k], v) for k, v in form.constants.items()})
        if reason is None and form.extra is not None:
            reason = form.extra(b)
        if reason is not None:
            return reason
        if isinstance(target, str):
            return target
        # Every constant but Pow's exponent has x's element type (ONNX type constraints).
        dtype = dtype_of(x, *(b[k] for k in form.constants if k != "power"))
        if dtype is None:
            return "element type unknown (run infer_shapes first)"
        if dtype not in DTYPES:
            return f"activations are fused for float32/float16 only, not {dtype}"
        return None

    def rewrite(op, x, **b):
        domain, op_type, attributes = target
        return op.op(op_type, x, _domain=domain, **attributes)

    return Rule(form.name, form.pattern, rewrite, check)


@register_pass
class FuseActivations(RulePass):
    """Recognise HardSigmoid, HardSwish, SiLU and GELU chains and emit one op each (exact)."""

    name = "fuse_activations"

    class Config(PassConfig):
        #: Use onnxruntime's com.microsoft ops where the opset has no standard op.
        contrib_ops: bool = True

    def rules(self, model):
        targets = {k: t.resolve(model.opset, self.config.contrib_ops) for k, t in TARGETS.items()}
        return [_rule(form, targets[form.activation]) for form in FORMS]
