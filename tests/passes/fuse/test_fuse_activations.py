"""fuse_activations: HardSigmoid, HardSwish, SiLU and GELU chains become one op each."""

import math

import numpy as np
import pytest

from slimgraph.errors import ModelLoadError
from slimgraph.ir.check import check
from slimgraph.passes import get_pass
from slimgraph.passes.rewrite import USED_OUTSIDE
from tests.helpers import assert_same_outputs, ops, parse

CONSTANTS = {
    "zero": 0.0, "one": 1.0, "half": 0.5, "three": 3.0, "six": 6.0, "sixth": 1 / 6,
    "sqrt2": math.sqrt(2), "inv_sqrt2": 1 / math.sqrt(2), "k": math.sqrt(2 / math.pi), "cubic": 0.044715,
}

# name: (graph body computing y from x, activation it is)
FORMS = {
    "hardsigmoid_div": ("a = Add (x, three)  c = Clip (a, zero, six)  y = Div (c, six)", "HardSigmoid"),
    "hardsigmoid_mul": ("a = Add (three, x)  c = Clip (a, zero, six)  y = Mul (sixth, c)", "HardSigmoid"),
    "hardswish_div": ("a = Add (x, three)  c = Clip (a, zero, six)  m = Mul (c, x)  y = Div (m, six)", "HardSwish"),
    "hardswish_mul": ("a = Add (x, three)  c = Clip (a, zero, six)  m = Mul (x, c)  y = Mul (m, sixth)", "HardSwish"),
    "hardswish_two_steps": ("a = Add (x, three)  c = Clip (a, zero, six)  h = Div (c, six)  y = Mul (x, h)", "HardSwish"),
    "silu": ("s = Sigmoid (x)  y = Mul (s, x)", "SiLU"),
    "gelu_erf": ("d = Div (x, sqrt2)  e = Erf (d)  a = Add (e, one)  m = Mul (x, a)  y = Mul (m, half)", "GELU"),
    "gelu_erf_half_first": ("d = Mul (x, inv_sqrt2)  e = Erf (d)  a = Add (one, e)  h = Mul (half, x)  y = Mul (h, a)",
                            "GELU"),
    "gelu_tanh_pow": ("p = Pow (x, three)  c = Mul (cubic, p)  s = Add (x, c)  u = Mul (s, k)  t = Tanh (u)"
                      "  a = Add (t, one)  h = Mul (a, half)  y = Mul (x, h)", "GELU tanh"),
    "gelu_tanh_cube": ("x2 = Mul (x, x)  x3 = Mul (x2, x)  c = Mul (x3, cubic)  s = Add (c, x)  u = Mul (k, s)"
                       "  t = Tanh (u)  a = Add (one, t)  m = Mul (a, x)  y = Mul (half, m)", "GELU tanh"),
}

#: What each activation becomes at opset 17 (below Gelu's 20: contrib ops) and at 20.
EXPECTED = {
    "HardSigmoid": {17: "HardSigmoid", 20: "HardSigmoid"},
    "HardSwish": {17: "HardSwish", 20: "HardSwish"},
    "SiLU": {17: "com.microsoft.QuickGelu", 20: "com.microsoft.QuickGelu"},
    "GELU": {17: "com.microsoft.Gelu", 20: "Gelu"},
    "GELU tanh": {17: "com.microsoft.FastGelu", 20: "Gelu"},
}

X = {"x": np.linspace(-7, 7, 2 * 50, dtype=np.float32).reshape(2, 50)}


def model_text(body: str, opset: int, dtype: str = "float", x_type: str | None = None) -> str:
    consts = ", ".join(f"{dtype} {n} = {{{v!r}}}" for n, v in CONSTANTS.items() if f" {n})" in body or f"({n}," in body
                       or f" {n}," in body)
    return f"""
    <ir_version: 10, opset_import: ["" : {opset}]>
    g ({x_type or dtype + "[2,50]"} x) => ({dtype}[2,50] y) <{consts}> {{ {body} }}
    """


def qualified_ops(model) -> list[str]:
    return [f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph]


def fuse(model, **config):
    before = model.clone()
    return before, get_pass("fuse_activations")(**config)(model)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_chain_becomes_one_op_with_the_same_outputs(form, opset):
    body, activation = FORMS[form]
    model = parse(model_text(body, opset))
    before, result = fuse(model)
    assert result.modified
    assert qualified_ops(model) == [EXPECTED[activation][opset]]
    check(model)
    assert_same_outputs(before, model, X)


def test_clip_with_attributes_before_opset_11():
    model = parse(model_text("a = Add (x, three)  c = Clip <min = 0.0, max = 6.0> (a)  y = Div (c, six)", 10))
    before, _ = fuse(model)
    assert ops(model) == ["HardSigmoid"]
    assert_same_outputs(before, model, X)


def test_silu_is_onnx_swish_at_opset_24_only():
    # onnxruntime 1.32 runs Swish for opset 24 exactly; at 25 it has no kernel for it.
    for opset, op in [(24, "Swish"), (25, "com.microsoft.QuickGelu")]:
        model = parse(model_text(FORMS["silu"][0], opset))
        before, _ = fuse(model)
        assert qualified_ops(model) == [op]
        assert_same_outputs(before, model, X)


def test_torch_exports():
    torch = pytest.importorskip("torch")
    import io

    import slimgraph

    class Net(torch.nn.Module):
        def forward(self, x):
            f = torch.nn.functional
            return f.gelu(x) + f.gelu(x, approximate="tanh") + f.silu(x) + x * f.relu6(x + 3) / 6

    f = io.BytesIO()
    torch.onnx.export(Net(), (torch.randn(2, 50),), f, dynamo=False, opset_version=17, input_names=["x"])
    model = slimgraph.load(f.getvalue())
    before, result = fuse(model)
    assert sorted(o for o in ops(model) if o not in ("Add", "Constant")) == ["FastGelu", "Gelu", "HardSwish", "QuickGelu"]
    assert_same_outputs(before, model, X)


# --- not fused ------------------------------------------------------------------------------------
def test_hardswish_below_opset_14_is_skipped():
    model = parse(model_text(FORMS["hardswish_div"][0], 13))
    _, result = fuse(model)
    assert not result.modified
    assert result.stats["skipped"] == {"HardSwish needs opset >= 14": 1}


def test_hardswish_below_opset_14_keeps_its_hardsigmoid():
    model = parse(model_text(FORMS["hardswish_two_steps"][0], 13))
    before, _ = fuse(model)
    assert ops(model) == ["HardSigmoid", "Mul"]
    assert_same_outputs(before, model, X)


def test_gelu_below_opset_20_without_contrib_ops_is_skipped():
    model = parse(model_text(FORMS["gelu_erf"][0], 17))
    _, result = fuse(model, contrib_ops=False)
    assert not result.modified
    assert result.stats["skipped"] == {"Gelu needs opset >= 20 or contrib_ops=True": 1}


def test_not_fused_when_an_intermediate_is_an_output():
    model = parse(model_text(FORMS["silu"][0], 17).replace("=> (float[2,50] y)", "=> (float[2,50] y, float[2,50] s)"))
    _, result = fuse(model)
    assert not result.modified and result.stats["skipped"] == {USED_OUTSIDE: 1}


def test_other_constants_are_not_a_match_nor_a_skip():
    model = parse(model_text(FORMS["gelu_erf"][0], 20).replace("half = {0.5}", "half = {0.4}"))
    _, result = fuse(model)
    assert not result.modified and not result.stats["skipped"]


def test_double_is_skipped():
    # onnxruntime has no double HardSigmoid/HardSwish/Gelu(erf) kernel on CPU.
    model = parse(model_text(FORMS["hardswish_div"][0], 17, dtype="double"))
    _, result = fuse(model)
    assert not result.modified
    assert result.stats["skipped"] == {"activations are fused for float32/float16 only, not DOUBLE": 1}


def test_one_element_constant_of_rank_1_needs_a_known_rank():
    # Adding a [1]-shaped 1.0 would turn a rank-0 x into rank 1: unknown rank, no fusion.
    body = "r = Relu (x)  d = Div (r, sqrt2)  e = Erf (d)  a = Add (e, one1)  m = Mul (r, a)  y = Mul (m, half)"
    text = model_text(body, 20).replace("<float", "<float[1] one1 = {1.0}, float", 1)
    model = parse(text)
    _, result = fuse(model)
    assert not result.modified
    assert result.stats["skipped"] == {
        "one-element constant of rank 1 might raise the output's rank (run infer_shapes first)": 1}
    get_pass("infer_shapes")()(model)
    before, result = fuse(model)
    assert ops(model) == ["Relu", "Gelu"]
    assert_same_outputs(before, model, X)


def test_magika_gelu_tanh_becomes_fastgelu():
    from slimgraph import zoo

    try:
        model = __import__("slimgraph").load(zoo.magika_model_path())
        feeds = zoo.magika_inputs(8)
    except ModelLoadError as e:
        pytest.skip(str(e))
    get_pass("infer_shapes")()(model)  # one of its two GELUs adds a [1,1,1] constant
    before, result = fuse(model)
    assert result.stats["fused"] == 2 and ops(model).count("FastGelu") == 2
    assert_same_outputs(before, model, feeds)
