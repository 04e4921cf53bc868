"""fuse_conv_bias: a constant per-channel Add after Conv/ConvTranspose folds into its bias."""

import numpy as np
import pytest

from slimgraph.passes import get_pass
from tests.helpers import assert_same_outputs, ops, parse

RNG = np.random.default_rng(0)


def init(name: str, *shape: int) -> str:
    values = ", ".join(f"{v:.5f}" for v in RNG.uniform(-1, 1, size=shape).ravel())
    dims = f"[{','.join(map(str, shape))}]" if shape else ""
    return f"float{dims} {name} = {{{values}}}"


def conv_add(c_shape: tuple[int, ...], conv: str = "Conv (x, w, b)", out: str = "float[1,4,4,4] y") -> str:
    return f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => ({out}) <{init("w", 4, 3, 3, 3)}, {init("b", 4)}, {init("c", *c_shape)}> {{
        v = {conv}
        y = Add (v, c)
    }}
    """


def fuse(model):
    before = model.clone()
    return before, get_pass("fuse_conv_bias")()(model)


X = {"x": RNG.normal(size=(1, 3, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize("c_shape", [(4, 1, 1), (1, 4, 1, 1), (1,), ()])
def test_per_channel_constant_joins_the_bias(c_shape):
    model = parse(conv_add(c_shape))
    before, result = fuse(model)
    assert result.modified and result.stats["fused"] == 1
    assert ops(model) == ["Conv"]
    assert_same_outputs(before, model, X)


def test_conv_without_bias_gets_the_constant_as_bias():
    model = parse(conv_add((4, 1, 1), conv="Conv (x, w)"))
    before, _ = fuse(model)
    assert ops(model) == ["Conv"] and len(model.graph.node(0).inputs) == 3
    assert_same_outputs(before, model, X)


def test_conv_transpose():
    model = parse(conv_add((1, 3, 1, 1), conv="ConvTranspose (x, wt)", out="float[1,3,7,7] y")
                  .replace("<float[4,3,3,3] w", f"<{init('wt', 3, 3, 2, 2)}, float[4,3,3,3] w"))
    before, _ = fuse(model)
    assert ops(model) == ["ConvTranspose"]
    assert_same_outputs(before, model, X)


def test_a_shared_bias_stays_intact_for_the_other_conv():
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,4,4,4] y, float[1,4,4,4] z) <{init("w", 4, 3, 3, 3)}, {init("b", 4)}, {init("c", 4, 1, 1)}> {{
        v = Conv (x, w, b)
        y = Add (v, c)
        z = Conv (x, w, b)
    }}
    """)
    before, result = fuse(model)
    assert result.modified and ops(model) == ["Conv", "Conv"]
    assert "b" in model.graph.initializers
    assert_same_outputs(before, model, X)


# --- not fused ------------------------------------------------------------------------------------
@pytest.mark.parametrize("c_shape, reason", [
    ((4,), "added constant is not per-channel"),  # runs along the last spatial axis
    ((1, 1, 4, 4), "added constant is not per-channel"),
    ((1, 1, 4, 1, 1), "added constant would broadcast the output to a higher rank"),
])
def test_constant_that_is_not_per_channel_is_skipped(c_shape, reason):
    out = "float[1,1,4,4,4] y" if len(c_shape) == 5 else "float[1,4,4,4] y"
    model = parse(conv_add(c_shape, out=out))
    _, result = fuse(model)
    assert not result.modified and result.stats["skipped"] == {reason: 1}


def test_added_graph_input_is_skipped():
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x, float[4,1,1] c) => (float[1,4,4,4] y) <{init("w", 4, 3, 3, 3)}> {{
        v = Conv (x, w)
        y = Add (c, v)
    }}
    """)
    _, result = fuse(model)
    assert not result.modified and result.stats["skipped"] == {"added value is not a constant": 1}
