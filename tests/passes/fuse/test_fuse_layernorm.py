"""fuse_layernorm: ReduceMean/Sub/Pow/.../Div chains become LayerNormalization."""

import numpy as np
import pytest

from slimgraph.errors import ModelLoadError
from slimgraph.ir.check import check
from slimgraph.passes import get_pass
from tests.helpers import assert_same_outputs, ops, parse

RNG = np.random.default_rng(0)
X = {"x": (RNG.normal(size=(2, 3, 8)) * 3 + 1).astype(np.float32)}

SQUARE = {"pow": "sq = Pow (d, two)", "mul": "sq = Mul (d, d)"}
NORMALIZE = {
    "div": "n = Div (d, std)",
    "reciprocal": "r = Reciprocal (std)  n = Mul (r, d)",
    "reciprocal_scaled": "r = Reciprocal (std)  rg = Mul (gamma, r)  n = Mul (d, rg)",
}


def chain(square="pow", normalize="div", affine="y = Add (beta, s)  s = Mul (n, gamma)", opset=17,
          axes="[-1]", x_type="float[2,3,8]", gamma="float[8] gamma = {1, 2, 3, 4, 5, 6, 7, 8}",
          eps="float eps = {1e-5}") -> str:
    if opset >= 18:
        mean, var = f"ReduceMean (x, axes)", f"ReduceMean (sq, axes)"
    else:
        mean, var = f"ReduceMean <axes = {axes}> (x)", f"ReduceMean <axes = {axes}> (sq)"
    # The affine step is written output-first for readability; put it in graph order.
    affine_lines = list(reversed(affine.split("  "))) if affine else ["y = Identity (n)"]
    body = "\n".join([
        f"mean = {mean}", "d = Sub (x, mean)", SQUARE[square], f"var = {var}",
        "ve = Add (var, eps)", "std = Sqrt (ve)", NORMALIZE[normalize], *affine_lines,
    ])
    inits = [eps, "float two = {2.0}", f"int64[{axes.count(',') + 1}] axes = {{{axes.strip('[]')}}}", gamma,
             "float[8] beta = {0.5, 0, 0, 0, 0, 0, 0, -0.5}"]
    return f"""
    <ir_version: 9, opset_import: ["" : {opset}]>
    g ({x_type} x) => (float[2,3,8] y) <{", ".join(i for i in inits if i)}> {{
    {body}
    }}
    """


def fuse(model):
    before = model.clone()
    return before, get_pass("fuse_layernorm")()(model)


@pytest.mark.parametrize("normalize", sorted(NORMALIZE))
@pytest.mark.parametrize("square", sorted(SQUARE))
def test_chain_with_scale_and_bias_becomes_one_layernorm(square, normalize):
    model = parse(chain(square, normalize))
    before, result = fuse(model)
    assert result.modified and result.stats["fused"] == 1
    assert ops(model) == ["LayerNormalization"]
    ln = model.graph.node(0)
    assert ln.attributes.get_int("axis") == -1 and len(ln.inputs) == 3
    assert ln.attributes.get_float("epsilon") == pytest.approx(1e-5)
    check(model)
    assert_same_outputs(before, model, X)


def test_chain_without_scale_or_bias():
    model = parse(chain(affine=""))
    before, _ = fuse(model)
    assert ops(model) == ["LayerNormalization", "Identity"]
    assert_same_outputs(before, model, X)


def test_axes_as_input_at_opset_18_and_two_trailing_axes():
    model = parse(chain(opset=18, axes="[-2, -1]", affine="").replace("axes = {-2, -1}", "axes = {1, 2}"))
    before, _ = fuse(model)
    assert ops(model) == ["LayerNormalization", "Identity"]
    assert model.graph.node(0).attributes.get_int("axis") == -2
    assert_same_outputs(before, model, X)


def test_torch_chain_after_upgrading_the_opset():
    torch = pytest.importorskip("torch")
    import io

    import slimgraph

    net = torch.nn.LayerNorm(8).eval()
    with torch.no_grad():
        net.weight.uniform_(0.5, 2)
        net.bias.uniform_(-1, 1)
    f = io.BytesIO()  # below opset 17 torch writes the chain
    torch.onnx.export(net, (torch.randn(2, 3, 8),), f, dynamo=False, opset_version=16, input_names=["x"])
    model = slimgraph.load(f.getvalue())
    get_pass("lift_constants")()(model)
    _, result = fuse(model)
    assert result.stats["skipped"] == {"LayerNormalization needs opset >= 17": 1}
    get_pass("upgrade_opset")(target=17)(model)
    get_pass("infer_shapes")()(model)
    before, _ = fuse(model)
    assert ops(model) == ["LayerNormalization"]
    assert_same_outputs(before, model, X)


# --- not fused ------------------------------------------------------------------------------------
def test_below_opset_17_is_skipped():
    model = parse(chain(opset=16))
    _, result = fuse(model)
    assert not result.modified
    assert result.stats["skipped"] == {"LayerNormalization needs opset >= 17": 1}


def test_reduction_over_a_middle_axis_is_not_fused():
    model = parse(chain(axes="[1]"))
    _, result = fuse(model)
    assert not result.modified
    assert result.stats["skipped"] == {"normalization axes are not the trailing axes": 1}


def test_non_constant_gamma_is_not_folded_in():
    # The normalization still fuses; the multiplication by an input stays a Mul.
    model = parse(chain(gamma="").replace("(float[2,3,8] x)", "(float[2,3,8] x, float[8] gamma)"))
    before, _ = fuse(model)
    assert ops(model) == ["LayerNormalization", "Mul", "Add"]
    feeds = {**X, "gamma": RNG.normal(size=8).astype(np.float32)}
    assert_same_outputs(before, model, feeds)


def test_gamma_varying_along_another_axis_is_not_folded_in():
    model = parse(chain(gamma="float[3,1] gamma = {1, 2, 3}"))
    before, result = fuse(model)
    assert ops(model) == ["LayerNormalization", "Mul", "Add"]
    assert result.stats["skipped"] == {"multiplier broadcasts along the non-normalized axes": 1}
    assert_same_outputs(before, model, X)


def test_non_constant_epsilon_is_not_fused():
    model = parse(chain(eps="").replace("(float[2,3,8] x)", "(float[2,3,8] x, float eps)"))
    _, result = fuse(model)
    assert not result.modified


def test_unknown_normalized_dimension_is_skipped():
    model = parse(chain(x_type="float[2,3,D]", affine=""))
    _, result = fuse(model)
    assert not result.modified
    assert result.stats["skipped"] == {"normalized dimensions are not known (run infer_shapes first)": 1}


def test_magika_one_pass_variance_is_not_a_layernorm():
    # magika (jax2tf) computes var = E[x^2] - E[x]^2: not the same function in floats.
    import slimgraph
    from slimgraph import zoo

    try:
        model = slimgraph.load(zoo.magika_model_path())
    except ModelLoadError as e:
        pytest.skip(str(e))
    get_pass("infer_shapes")()(model)
    _, result = fuse(model)
    assert not result.modified and "LayerNormalization" not in ops(model)


def test_affine_steps_after_an_existing_layernorm_are_absorbed():
    model = parse("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[2,3,8] x) => (float[2,3,8] y) <float[8] s = {1, 1, 2, 2, 1, 1, 2, 2}, float[8] b = {0, 1, 0, 1, 0, 1, 0, 1},
                                           float g = {3.0}, float[1,8] beta = {1, 2, 3, 4, 5, 6, 7, 8}> {
        n = LayerNormalization <axis = -1, epsilon = 0.001> (x, s, b)
        m = Mul (g, n)
        y = Add (m, beta)
    }
    """)
    before, result = fuse(model)
    assert result.stats["fused"] == 0  # no chain fused; two affine steps absorbed
    assert result.stats["rules"] == {"layernorm_absorb_scale": 1, "layernorm_absorb_bias": 1}
    assert ops(model) == ["LayerNormalization"]
    assert model.graph.node(0).attributes.get_float("epsilon") == pytest.approx(1e-3)
    assert_same_outputs(before, model, X)
