"""fold_batchnorm: BatchNormalization folded into Conv / ConvTranspose / Gemm / MatMul."""

import numpy as np
import pytest

from slimgraph.ir import Model
from slimgraph.passes import get_pass
from tests.helpers import assert_same_outputs, ops, parse

RNG = np.random.default_rng(0)


def init(name: str, *shape: int, low: float = -1.0, high: float = 1.0) -> str:
    """A float initializer in ONNX text syntax, with seeded random values."""
    values = ", ".join(f"{v:.5f}" for v in RNG.uniform(low, high, size=shape).ravel())
    return f"float[{','.join(map(str, shape))}] {name} = {{{values}}}"


def bn_params(c: int) -> str:
    return ", ".join([init("scale", c), init("shift", c), init("mean", c), init("var", c, low=0.5, high=2.0)])


def fold(model):
    before = model.clone()
    result = get_pass("fold_batchnorm")()(model)
    return before, result


def feeds(**shapes):
    return {name: RNG.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


CONV_BN = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3,6,6] x) => (float[2,4,4,4] y) <{init("w", 4, 3, 3, 3)}, {init("b", 4)}, {bn_params(4)}> {{
    c = Conv (x, w, b)
    y = BatchNormalization <epsilon = 0.001> (c, scale, shift, mean, var)
}}
"""


def test_conv_batchnorm_becomes_one_conv():
    model = parse(CONV_BN)
    before, result = fold(model)
    assert result.modified and result.stats["folded"] == 1
    assert ops(model) == ["Conv"]
    assert Model.annotation(model.graph.node(0), "rule") == "fold_batchnorm_conv"
    assert len(model.graph.initializers) == 2  # the folded weight and bias only
    assert_same_outputs(before, model, feeds(x=(2, 3, 6, 6)))


def test_conv_without_bias_gets_one():
    model = parse(CONV_BN.replace("Conv (x, w, b)", "Conv (x, w)"))
    before, result = fold(model)
    assert ops(model) == ["Conv"] and len(model.graph.node(0).inputs) == 3
    assert_same_outputs(before, model, feeds(x=(2, 3, 6, 6)))


def test_grouped_conv_transpose():
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,5,5] x) => (float[1,6,7,7] y) <{init("w", 4, 3, 3, 3)}, {bn_params(6)}> {{
        c = ConvTranspose <group = 2> (x, w)
        y = BatchNormalization (c, scale, shift, mean, var)
    }}
    """)
    before, result = fold(model)
    assert ops(model) == ["ConvTranspose"]
    assert_same_outputs(before, model, feeds(x=(1, 4, 5, 5)))


def test_gemm_with_transposed_weight_bias_and_beta():
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3,5] a) => (float[3,4] y) <{init("w", 4, 5)}, {init("c", 4)}, {bn_params(4)}> {{
        m = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (a, w, c)
        y = BatchNormalization (m, scale, shift, mean, var)
    }}
    """)
    before, result = fold(model)
    assert ops(model) == ["Gemm"]
    assert "beta" not in model.graph.node(0).attributes
    assert_same_outputs(before, model, feeds(a=(3, 5)))


def test_matmul_with_2d_input_becomes_matmul_add():
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3,5] a) => (float[3,4] y) <{init("w", 5, 4)}, {bn_params(4)}> {{
        m = MatMul (a, w)
        y = BatchNormalization (m, scale, shift, mean, var)
    }}
    """)
    before, result = fold(model)
    assert ops(model) == ["MatMul", "Add"]
    assert_same_outputs(before, model, feeds(a=(3, 5)))


def test_torch_conv_batchnorm():
    torch = pytest.importorskip("torch")
    import io

    import slimgraph

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    f = io.BytesIO()  # without constant folding, the exporter keeps BatchNormalization
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), f, dynamo=False, do_constant_folding=False,
                      input_names=["x"], opset_version=17)
    model = slimgraph.load(f.getvalue())
    get_pass("eliminate_identity")()(model)  # it passes the BN parameters through Identity
    before, result = fold(model)
    assert ops(model) == ["Conv", "Relu"]
    assert_same_outputs(before, model, feeds(x=(1, 3, 8, 8)))


# --- not folded ---------------------------------------------------------------------------------
def test_not_folded_when_the_weight_is_shared():
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,4,4,4] y, float[1,4,4,4] z) <{init("w", 4, 3, 3, 3)}, {bn_params(4)}> {{
        c = Conv (x, w)
        y = BatchNormalization (c, scale, shift, mean, var)
        z = Conv (x, w)
    }}
    """)
    _, result = fold(model)
    assert not result.modified
    assert result.stats["skipped"] == {"weight is shared with another node": 1}


def test_not_folded_when_batchnorm_parameters_are_inputs():
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x, float[4] scale) => (float[1,4,4,4] y) <{init("w", 4, 3, 3, 3)}, {init("shift", 4)}, {init("mean", 4)}, {init("var", 4, low=0.5)}> {{
        c = Conv (x, w)
        y = BatchNormalization (c, scale, shift, mean, var)
    }}
    """)
    _, result = fold(model)
    assert not result.modified
    assert result.stats["skipped"] == {"BatchNormalization parameters are not constant": 1}


def test_not_folded_in_training_mode():
    model = parse(CONV_BN.replace("<epsilon = 0.001>", "<training_mode = 1>"))
    _, result = fold(model)
    assert not result.modified
    assert result.stats["skipped"] == {"BatchNormalization is in training mode": 1}


def test_not_folded_when_the_conv_output_is_used_elsewhere():
    model = parse(CONV_BN.replace("=> (float[2,4,4,4] y)", "=> (float[2,4,4,4] y, float[2,4,4,4] c)"))
    _, result = fold(model)
    assert not result.modified and ops(model) == ["Conv", "BatchNormalization"]


def test_matmul_with_3d_input_is_not_folded():
    # BatchNormalization normalizes axis 1 (the 3 here), not the weight's output axis.
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,4,5] a) => (float[2,4,4] y) <{init("w", 5, 4)}, {bn_params(4)}> {{
        m = MatMul (a, w)
        y = BatchNormalization (m, scale, shift, mean, var)
    }}
    """)
    _, result = fold(model)
    assert not result.modified
    assert result.stats["skipped"] == {"MatMul input is not known to be 2-D": 1}
