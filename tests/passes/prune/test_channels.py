"""Channel-coupling rules on hand-written graphs.

Each model has, in every prunable group, channels whose producer weights, biases, BN shift
and mean, and consumer columns are exactly zero: they are the lowest-L1 channels and
contribute nothing, so pruning exactly them must leave every output unchanged (1e-5).
A wrong coupling or a misaligned slice removes a live channel and changes the outputs.
"""

from __future__ import annotations

import numpy as np
import pytest

import slimgraph
from slimgraph.backends import ort
from slimgraph.passes.cleanup.infer_shapes import InferShapes
from slimgraph.passes.prune.channels import analyze
from tests.helpers import assert_same_outputs
from tests.passes.prune.conftest import build, dead_vector, dead_weight

HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'


def prune(model, pipeline=None, **config):
    config = {"multiple": 1, **config}
    result = slimgraph.run(model, pipeline or [{"prune.structured": config}])
    return result.model, result.report.rows[-1].stats


def weight_shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(v.const_value.shape) for name, v in model.graph.initializers.items()}


def groups_of(model):
    m = model.clone()
    InferShapes()(m)
    return analyze(m)


@pytest.fixture
def x(rng):
    return {"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}


def conv_bn_model(rng, dead=(1, 3, 4, 6)):
    return build(HEAD + """
        g (float[1,4,8,8] x, float[8,4,3,3] w1, float[8] b1, float[8] gamma, float[8] beta,
           float[8] mean, float[8] var, float[6,8,1,1] w2) => (float[1,6,8,8] y) {
            c = Conv<pads=[1,1,1,1]>(x, w1, b1)
            n = BatchNormalization(c, gamma, beta, mean, var)
            r = Relu(n)
            y = Conv(r, w2)
        }""",
        w1=dead_weight(rng, (8, 4, 3, 3), dead), b1=dead_vector(rng, 8, dead),
        gamma=dead_vector(rng, 8, (), 0.5, 1.5), beta=dead_vector(rng, 8, dead),
        mean=dead_vector(rng, 8, dead), var=dead_vector(rng, 8, (), 0.5, 2.0),
        w2=dead_weight(rng, (6, 8, 1, 1), (), dead),
    )


def test_conv_bn_relu_conv_groups(rng):
    a = groups_of(conv_bn_model(rng))
    safe = a.safe_groups()
    assert len(safe) == 1
    g = safe[0]
    assert g.size == 8 and len(g.producers) == 1 and len(g.consumers) == 1
    assert {s.value.name for s, _ in g.slices} == {"w1", "b1", "gamma", "beta", "mean", "var", "w2"}
    # the input (graph input) and the output (graph output) are unsafe and say why
    reasons = " ".join(x.reason for x in a.groups if not x.safe)
    assert "graph input" in reasons and "graph output" in reasons
    layers = list(a.layer_groups.values())
    assert layers == [(None, g.id), (g.id, None)]


def test_conv_bn_relu_conv_exact(rng, x):
    model = conv_bn_model(rng)
    pruned, stats = prune(model, ratio=0.5)
    assert_same_outputs(model, pruned, x)
    shapes = weight_shapes(pruned)
    assert shapes["w1"] == (4, 4, 3, 3) and shapes["w2"] == (6, 4, 1, 1)
    assert all(shapes[k] == (4,) for k in ("gamma", "beta", "mean", "var", "b1"))
    assert stats["groups_pruned"] == 1 and stats["channels_before"] == 8 and stats["channels_after"] == 4
    assert stats["macs_after"] < stats["macs_before"]
    row = next(r for r in stats["table"] if r["out ch"] == "8 -> 4")
    assert row["op"] == "Conv" and row["in ch"] == "4 -> 4"


def test_after_batchnorm_folding(rng, x):
    model = conv_bn_model(rng)
    pruned, stats = prune(model, ["fold_batchnorm", {"prune.structured": {"ratio": 0.5, "multiple": 1}}])
    assert "BatchNormalization" not in [n.op_type for n in pruned.graph]
    assert stats["groups_pruned"] == 1
    assert_same_outputs(model, pruned, x)


def test_residual_add(rng, x):
    dead = (0, 2, 5, 7)
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[8,4,1,1] w1, float[8,8,3,3] w2, float[8] b2, float[5,8,1,1] w3)
          => (float[1,5,8,8] y) {
            a = Conv(x, w1)
            r = Relu(a)
            b = Conv<pads=[1,1,1,1]>(r, w2, b2)
            s = Add(a, b)
            t = Relu(s)
            y = Conv(t, w3)
        }""",
        w1=dead_weight(rng, (8, 4, 1, 1), dead), w2=dead_weight(rng, (8, 8, 3, 3), dead, dead),
        b2=dead_vector(rng, 8, dead), w3=dead_weight(rng, (5, 8, 1, 1), (), dead),
    )
    safe = groups_of(model).safe_groups()
    assert len(safe) == 1 and len(safe[0].producers) == 2  # both branches of the residual
    pruned, _ = prune(model, ratio=0.5)
    assert_same_outputs(model, pruned, x)
    assert weight_shapes(pruned)["w2"] == (4, 4, 3, 3)


def test_depthwise(rng, x):
    dead = (1, 2, 4, 7)
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[8,4,1,1] w1, float[8,1,3,3] dw, float[8] db, float[3,8,1,1] w3)
          => (float[1,3,8,8] y) {
            a = Conv(x, w1)
            r = Clip(a)
            d = Conv<group=8, pads=[1,1,1,1]>(r, dw, db)
            e = Relu(d)
            y = Conv(e, w3)
        }""",
        w1=dead_weight(rng, (8, 4, 1, 1), dead), dw=dead_weight(rng, (8, 1, 3, 3), dead),
        db=dead_vector(rng, 8, dead), w3=dead_weight(rng, (3, 8, 1, 1), (), dead),
    )
    pruned, _ = prune(model, ratio=0.5)
    assert_same_outputs(model, pruned, x)
    dw = next(n for n in pruned.graph if n.op_type == "Conv" and n.attributes.get_int("group", 1) > 1)
    assert dw.attributes.get_int("group") == 4 and weight_shapes(pruned)["dw"] == (4, 1, 3, 3)


def test_grouped_conv_is_unsafe(rng):
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[8,4,1,1] w1, float[8,4,3,3] gw, float[3,8,1,1] w3) => (float[1,3,8,8] y) {
            a = Conv(x, w1)
            d = Conv<group=2, pads=[1,1,1,1]>(a, gw)
            y = Conv(d, w3)
        }""",
        w1=dead_weight(rng, (8, 4, 1, 1)), gw=dead_weight(rng, (8, 4, 3, 3)), w3=dead_weight(rng, (3, 8, 1, 1)),
    )
    a = groups_of(model)
    assert not a.safe_groups()
    assert sum("grouped Conv" in g.reason for g in a.groups) == 2  # its input and its output


def test_concat(rng, x):
    da, db = (0, 2), (1, 3, 5)
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[4,4,1,1] wa, float[6,4,3,3] wb, float[5,10,1,1] wc) => (float[1,5,8,8] y) {
            a = Conv(x, wa)
            b = Conv<pads=[1,1,1,1]>(x, wb)
            c = Concat<axis=1>(a, b)
            r = Relu(c)
            y = Conv(r, wc)
        }""",
        wa=dead_weight(rng, (4, 4, 1, 1), da), wb=dead_weight(rng, (6, 4, 3, 3), db),
        wc=dead_weight(rng, (5, 10, 1, 1), (), da + tuple(4 + i for i in db)),
    )
    safe = groups_of(model).safe_groups()
    assert sorted(g.size for g in safe) == [4, 6]
    assert all(g.consumers == safe[0].consumers for g in safe)  # both read by the Conv after the Concat
    pruned, _ = prune(model, ratio=0.5)
    assert_same_outputs(model, pruned, x)
    assert weight_shapes(pruned)["wc"] == (5, 5, 1, 1)


@pytest.mark.parametrize("opset, split", [
    (17, "Split<axis=1>(t, sizes)"),  # sizes as an input
    (18, "Split<axis=1, num_outputs=2>(t)"),  # equal parts: becomes an explicit sizes input
])
def test_split(rng, x, opset, split):
    dead = (1, 2, 4, 7)  # two in each half
    sizes = ", int64[2] sizes" if opset == 17 else ""
    model = build(HEAD.replace("17", str(opset)) + f"""
        g (float[1,4,8,8] x, float[8,4,1,1] w1{sizes}, float[3,4,1,1] wa, float[3,4,1,1] wb)
          => (float[1,3,8,8] y) {{
            a = Conv(x, w1)
            s = Sigmoid(a)
            t = Mul(a, s)
            p, q = {split}
            u = Conv(p, wa)
            v = Conv(q, wb)
            y = Add(u, v)
        }}""",
        w1=dead_weight(rng, (8, 4, 1, 1), dead), **({"sizes": np.array([4, 4], np.int64)} if sizes else {}),
        wa=dead_weight(rng, (3, 4, 1, 1), (), (1, 2)), wb=dead_weight(rng, (3, 4, 1, 1), (), (0, 3)),
    )
    safe = groups_of(model).safe_groups()
    assert sorted(g.size for g in safe) == [4, 4]
    pruned, _ = prune(model, ratio=0.5)
    assert_same_outputs(model, pruned, x)
    split = next(n for n in pruned.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().tolist() == [2, 2]


@pytest.mark.parametrize("flatten", ["f = Flatten(r)", "f = Reshape(r, shape)"])
def test_flatten_gemm(rng, flatten):
    dead = (0, 3)
    cols = [c * 9 + i for c in dead for i in range(9)]
    model = build(HEAD + f"""
        g (float[1,4,3,3] x, float[4,4,1,1] w1, float[4] b1, int64[2] shape, float[5,36] wg, float[5] bg)
          => (float[1,5] y) {{
            a = Conv(x, w1, b1)
            r = Relu(a)
            {flatten}
            y = Gemm<transB=1>(f, wg, bg)
        }}""",
        w1=dead_weight(rng, (4, 4, 1, 1), dead), b1=dead_vector(rng, 4, dead), shape=np.array([1, 36], np.int64),
        wg=dead_weight(rng, (5, 36), (), cols), bg=dead_vector(rng, 5),
    )
    feeds = {"x": rng.standard_normal((1, 4, 3, 3)).astype(np.float32)}
    pruned, _ = prune(model, ratio=0.5)
    assert_same_outputs(model, pruned, feeds)
    assert weight_shapes(pruned)["wg"] == (5, 18)
    if "Reshape" in flatten:
        reshape = next(n for n in pruned.graph if n.op_type == "Reshape")
        assert reshape.inputs[1].const_value.numpy().tolist() == [1, 18]


def test_squeeze_excite_gate(rng, x):
    da, db = (1, 2, 5, 7), (0, 2)
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[8,4,3,3] w1, float[4,8,1,1] w2, float[4] b2, float[8,4,1,1] w3,
           float[8] b3, float[3,8,1,1] w4) => (float[1,3,8,8] y) {
            a = Conv<pads=[1,1,1,1]>(x, w1)
            r = Relu(a)
            p = GlobalAveragePool(r)
            h = Conv(p, w2, b2)
            hr = Relu(h)
            e = Conv(hr, w3, b3)
            s = Sigmoid(e)
            m = Mul(r, s)
            y = Conv(m, w4)
        }""",
        w1=dead_weight(rng, (8, 4, 3, 3), da), w2=dead_weight(rng, (4, 8, 1, 1), db, da), b2=dead_vector(rng, 4, db),
        w3=dead_weight(rng, (8, 4, 1, 1), da, db), b3=dead_vector(rng, 8, da), w4=dead_weight(rng, (3, 8, 1, 1), (), da),
    )
    safe = groups_of(model).safe_groups()
    assert sorted(g.size for g in safe) == [4, 8]
    big = next(g for g in safe if g.size == 8)
    assert len(big.producers) == 2  # the trunk conv and the gate's expanding conv
    pruned, _ = prune(model, ratio=0.5)
    assert_same_outputs(model, pruned, x)
    assert weight_shapes(pruned)["w3"] == (4, 2, 1, 1)


def test_resize_and_channel_constant(rng, x):
    dead = (0, 1, 4, 6)
    scale = dead_vector(rng, 8, (), 0.5, 2.0).reshape(1, 8, 1, 1)
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[8,4,1,1] w1, float[1,8,1,1] scale, float[4] scales, float[3,8,1,1] w2)
          => (float[1,3,16,16] y) {
            a = Conv(x, w1)
            b = Mul(a, scale)
            u = Resize<mode="nearest">(b, , scales)
            y = Conv(u, w2)
        }""",
        w1=dead_weight(rng, (8, 4, 1, 1), dead), scale=scale, scales=np.array([1, 1, 2, 2], np.float32),
        w2=dead_weight(rng, (3, 8, 1, 1), (), dead),
    )
    pruned, _ = prune(model, ratio=0.5)
    assert_same_outputs(model, pruned, x)
    assert weight_shapes(pruned)["scale"] == (1, 4, 1, 1)


def test_transpose_to_matmul(rng, x):
    dead = (2, 3, 5, 6)
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[8,4,1,1] w1, float[8,5] wm) => (float[1,8,8,5] y) {
            a = Conv(x, w1)
            r = Relu(a)
            t = Transpose<perm=[0,2,3,1]>(r)
            y = MatMul(t, wm)
        }""",
        w1=dead_weight(rng, (8, 4, 1, 1), dead), wm=dead_weight(rng, (8, 5), dead),
    )
    pruned, _ = prune(model, ratio=0.5)
    assert_same_outputs(model, pruned, x)
    assert weight_shapes(pruned)["wm"] == (4, 5)


def test_no_safe_group_is_a_clear_error(rng):
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[8,4,1,1] w1, float[3,8,1,1] w2) => (float[1,3,8,8] y, float[1,8,8,8] z) {
            a = Conv(x, w1)
            z = Softmax<axis=1>(a)
            y = Conv(z, w2)
        }""",
        w1=dead_weight(rng, (8, 4, 1, 1)), w2=dead_weight(rng, (3, 8, 1, 1)),
    )
    a = groups_of(model)
    conv_group = next(g for g in a.groups if g.size == 8)
    assert not conv_group.safe and "softmax over the channel axis" in conv_group.reason
    with pytest.raises(slimgraph.PassError, match="no channel group can be proved safe.*softmax"):
        prune(model, ratio=0.5)


def test_shared_weight_is_unsafe(rng):
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[4,4,1,1] w) => (float[1,4,8,8] y) {
            a = Conv(x, w)
            r = Relu(a)
            y = Conv(r, w)
        }""",
        w=dead_weight(rng, (4, 4, 1, 1)),
    )
    a = groups_of(model)
    assert not a.safe_groups()
    assert any("indexed by two channel spaces" in g.reason for g in a.groups)


def test_activation_criteria_need_data_and_use_it(rng, x):
    model = conv_bn_model(rng)
    with pytest.raises(slimgraph.PassError, match="needs sample data"):
        prune(model, ratio=0.5, criterion="apoz")
    data = {"x": rng.standard_normal((8, 4, 8, 8)).astype(np.float32)}
    for criterion in ("apoz", "mean_activation"):
        result = slimgraph.run(model, [{"prune.structured": {"ratio": 0.5, "multiple": 1, "criterion": criterion}}],
                               data=data)
        # the dead channels are always zero after the Relu: both criteria remove exactly them
        assert_same_outputs(model, result.model, x)


def test_input_model_is_not_modified(rng, x):
    model = conv_bn_model(rng)
    before = model.to_proto().SerializeToString()
    prune(model, ratio=0.5)
    assert model.to_proto().SerializeToString() == before


def test_space_of_unknown_size_is_left_alone(rng):
    """A MatMul reading a tensor whose channel count is symbolic: its input space is unsafe
    (unknown size) and its weight's K axis must not be touched when another group is cut."""
    dead = (1, 4, 9, 12, 13, 14, 2, 7)
    model = build(HEAD + """
        g (float[N, T, D] h, float[8,16] w1, float[16] b1, float[16,8] w2) => (float[N, T, 8] y) {
            a = MatMul(h, w1)
            b = Add(a, b1)
            r = Relu(b)
            y = MatMul(r, w2)
        }""",
        w1=dead_weight(rng, (8, 16), (), dead), b1=dead_vector(rng, 16, dead), w2=dead_weight(rng, (16, 8), dead),
    )
    a = groups_of(model)
    assert [g.size for g in a.safe_groups()] == [16]
    assert any("channel count unknown" in g.reason for g in a.groups)
    pruned, _ = prune(model, ratio=0.5)
    assert weight_shapes(pruned)["w1"] == (8, 8) and weight_shapes(pruned)["w2"] == (8, 8)
    assert_same_outputs(model, pruned, {"h": rng.standard_normal((2, 5, 8)).astype(np.float32)})


def test_slices_into_pieces(rng, x):
    """Two Slices tiling the channels [0, 4) and [4, 10) act like a Split."""
    dead = (0, 3, 5, 8, 9)  # 2 of the first piece, 3 of the second
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[10,4,1,1] w1, int64[1] s0, int64[1] e0, int64[1] s1, int64[1] e1, int64[1] ax,
           float[3,4,1,1] wa, float[3,6,1,1] wb) => (float[1,3,8,8] y) {
            a = Conv(x, w1)
            p = Slice(a, s0, e0, ax)
            q = Slice(a, s1, e1, ax)
            u = Conv(p, wa)
            v = Conv(q, wb)
            y = Add(u, v)
        }""",
        w1=dead_weight(rng, (10, 4, 1, 1), dead), s0=np.array([0]), e0=np.array([4]), s1=np.array([4]),
        e1=np.array([2**62]), ax=np.array([1]),
        wa=dead_weight(rng, (3, 4, 1, 1), (), (0, 3)), wb=dead_weight(rng, (3, 6, 1, 1), (), (1, 4, 5)),
    )
    assert sorted(g.size for g in groups_of(model).safe_groups()) == [4, 6]
    pruned, _ = prune(model, ratio=0.5)
    assert_same_outputs(model, pruned, x)
    bounds = [(int(n.inputs[1].const_value.numpy()[0]), int(n.inputs[2].const_value.numpy()[0]))
              for n in pruned.graph if n.op_type == "Slice"]
    assert bounds == [(0, 2), (2, 5)]


def test_slice_dropping_channels_is_unsafe(rng):
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[8,4,1,1] w1, int64[1] s0, int64[1] e0, int64[1] ax, float[3,4,1,1] wa)
          => (float[1,3,8,8] y) {
            a = Conv(x, w1)
            p = Slice(a, s0, e0, ax)
            y = Conv(p, wa)
        }""",
        w1=dead_weight(rng, (8, 4, 1, 1)), s0=np.array([0]), e0=np.array([4]), ax=np.array([1]),
        wa=dead_weight(rng, (3, 4, 1, 1)),
    )
    a = groups_of(model)
    assert not a.safe_groups()
    assert any("do not tile the channels" in g.reason for g in a.groups)


def test_pad_conv_transpose_gemm_matmul(rng, x):
    """ConvTranspose (weight [C_in, C_out, k, k]: consumer axis 0, producer axis 1), a
    spatial Pad, and Gemm without transB followed by a 2-D MatMul."""
    d1, d2, d3 = (1, 2, 5, 6), (0, 4, 5), (0, 2, 5)
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[8,4,1,1] w1, int64[8] pads, float[8,6,2,2] wt, float[6] bt,
           float[6,8] wg, float[8] bg, float[8,3] wm) => (float[1,3] y) {
            a = Conv(x, w1)
            p = Pad(a, pads)
            t = ConvTranspose<strides=[2,2]>(p, wt, bt)
            r = Relu(t)
            s = GlobalAveragePool(r)
            f = Flatten(s)
            h = Gemm(f, wg, bg)
            hr = Relu(h)
            y = MatMul(hr, wm)
        }""",
        w1=dead_weight(rng, (8, 4, 1, 1), d1), pads=np.array([0, 0, 1, 1, 0, 0, 1, 1]),
        wt=dead_weight(rng, (8, 6, 2, 2), d1, d2), bt=dead_vector(rng, 6, d2),
        wg=dead_weight(rng, (6, 8), d2, d3 + (7,)), bg=dead_vector(rng, 8, d3 + (7,)),
        wm=dead_weight(rng, (8, 3), d3 + (7,)),
    )
    # Gemm's weight [K=6, N=8]: rows are its input channels, columns its outputs
    wg = weight_shapes(model)["wg"]
    assert wg == (6, 8)
    pruned, _ = prune(model, ratio=0.5)
    shapes = weight_shapes(pruned)
    assert shapes["wt"] == (4, 3, 2, 2) and shapes["wg"] == (3, 4) and shapes["wm"] == (4, 3)
    assert_same_outputs(model, pruned, x)


def test_attention_heads(rng):
    """Q, K, V projections reshaped into 4 heads of 4, attention, heads folded back into
    the output projection: whole heads are pruned. Heads 1 and 3 have zero Q/K/V columns
    and zero output-projection rows, so removing them is exact."""
    dead = [h * 4 + i for h in (1, 3) for i in range(4)]
    model = build(HEAD + """
        g (float[1,5,16] x, float[16,16] wq, float[16] bq, float[16,16] wk, float[16,16] wv, float[16] bv,
           int64[4] split_heads, int64[3] merge_heads, float[] scale, float[16,16] wo) => (float[1,5,16] y) {
            q0 = MatMul(x, wq)
            q1 = Add(q0, bq)
            q2 = Reshape(q1, split_heads)
            q = Transpose<perm=[0,2,1,3]>(q2)
            k0 = MatMul(x, wk)
            k1 = Reshape(k0, split_heads)
            kt = Transpose<perm=[0,2,3,1]>(k1)
            v0 = MatMul(x, wv)
            v1 = Add(v0, bv)
            v2 = Reshape(v1, split_heads)
            v = Transpose<perm=[0,2,1,3]>(v2)
            s0 = MatMul(q, kt)
            s1 = Mul(s0, scale)
            p = Softmax<axis=-1>(s1)
            o0 = MatMul(p, v)
            o1 = Transpose<perm=[0,2,1,3]>(o0)
            o2 = Reshape(o1, merge_heads)
            y = MatMul(o2, wo)
        }""",
        wq=dead_weight(rng, (16, 16), (), dead), bq=dead_vector(rng, 16, dead), wk=dead_weight(rng, (16, 16), (), dead),
        wv=dead_weight(rng, (16, 16), (), dead), bv=dead_vector(rng, 16, dead),
        split_heads=np.array([0, 0, -1, 4]), merge_heads=np.array([0, 0, 16]), scale=np.array(0.5, np.float32),
        wo=dead_weight(rng, (16, 16), dead),
    )
    heads = [g for g in groups_of(model).safe_groups()]
    assert [(g.size, g.unit, len(g.producers), g.consumers) for g in heads] == [(4, 4, 3, ["MatMul_17"])]
    pruned, stats = prune(model, ratio=0.5, multiple=8)  # heads of 4 channels: 2 heads = 8 channels
    shapes = weight_shapes(pruned)
    assert shapes["wq"] == shapes["wk"] == shapes["wv"] == (16, 8) and shapes["wo"] == (8, 16)
    merge = next(n for n in pruned.graph if n.op_type == "Reshape" and n.inputs[0].name == "o1")
    assert merge.inputs[1].const_value.numpy().tolist() == [0, 0, 8]
    assert_same_outputs(model, pruned, {"x": rng.standard_normal((1, 5, 16)).astype(np.float32)})


def test_attention_over_channels_is_unsafe(rng):
    """Q K^T contracting over the projected channels (no head reshape) is not a batch axis."""
    model = build(HEAD + """
        g (float[1,5,16] x, float[16,8] wq, float[16,8] wk, float[5,16] wo) => (float[1,5,16] y) {
            q = MatMul(x, wq)
            k = MatMul(x, wk)
            kt = Transpose<perm=[0,2,1]>(k)
            s = MatMul(q, kt)
            y = MatMul(s, wo)
        }""",
        wq=dead_weight(rng, (16, 8)), wk=dead_weight(rng, (16, 8)), wo=dead_weight(rng, (5, 16)),
    )
    a = groups_of(model)
    assert not a.safe_groups()
    assert any("MatMul of two activations over their channel axis" in g.reason for g in a.groups)


def test_channels_read_inside_a_subgraph_are_unsafe(rng):
    model = build(HEAD + """
        g (float[1,4,8,8] x, bool cond, float[8,4,1,1] w1, float[3,8,1,1] w2) => (float[1,3,8,8] y) {
            a = Conv(x, w1)
            r = Relu(a)
            z = If(cond) <then_branch = g1 () => (float[1,8,8,8] t) { t = Identity(r) },
                          else_branch = g2 () => (float[1,8,8,8] e) { e = Neg(r) }>
            y = Conv(z, w2)
        }""",
        w1=dead_weight(rng, (8, 4, 1, 1)), w2=dead_weight(rng, (3, 8, 1, 1)),
    )
    a = groups_of(model)
    assert not a.safe_groups()
    assert any("read inside the subgraph of If" in g.reason for g in a.groups)


def test_layer_norm_over_other_axes_passes_channels(rng, x):
    """LayerNormalization over H, W of an NCHW tensor normalises each channel alone; over
    the channels it mixes them (unsafe)."""
    dead = (0, 5, 6, 7)
    text = HEAD + """
        g (float[1,4,8,8] x, float[8,4,1,1] w1, float[8,8] ln_scale, float[3,8,1,1] w2) => (float[1,3,8,8] y) {
            a = Conv(x, w1)
            n = LayerNormalization<axis=AXIS>(a, ln_scale)
            y = Conv(n, w2)
        }"""
    weights = dict(w1=dead_weight(rng, (8, 4, 1, 1), dead), ln_scale=dead_vector(rng, 64, (), 0.5, 1.5).reshape(8, 8),
                   w2=dead_weight(rng, (3, 8, 1, 1), (), dead))
    model = build(text.replace("AXIS", "2"), **weights)
    pruned, _ = prune(model, ratio=0.5)
    assert_same_outputs(model, pruned, x)
    over_channels = build(text.replace("AXIS", "1").replace("float[8,8] ln_scale", "float[8,8,8] ln_scale"),
                          **{**weights, "ln_scale": np.ones((8, 8, 8), np.float32)})
    assert not groups_of(over_channels).safe_groups()


def test_concat_then_split_elsewhere_is_unsafe(rng):
    """Concat of 4 + 4 channels split again as 2 + 6: no per-group decision maps onto both."""
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[4,4,1,1] wa, float[4,4,1,1] wb, int64[2] sizes, float[3,2,1,1] wc,
           float[3,6,1,1] wd) => (float[1,3,8,8] y) {
            a = Conv(x, wa)
            b = Conv(x, wb)
            c = Concat<axis=1>(a, b)
            p, q = Split<axis=1>(c, sizes)
            u = Conv(p, wc)
            v = Conv(q, wd)
            y = Add(u, v)
        }""",
        wa=dead_weight(rng, (4, 4, 1, 1)), wb=dead_weight(rng, (4, 4, 1, 1)), sizes=np.array([2, 6]),
        wc=dead_weight(rng, (3, 2, 1, 1)), wd=dead_weight(rng, (3, 6, 1, 1)),
    )
    a = groups_of(model)
    assert not a.safe_groups()
    assert any("split two incompatible ways" in g.reason for g in a.groups)


def test_layernorm_built_from_reductions_over_the_channels(rng):
    """A LayerNorm over the channels built from ops (as magika's jax export has it): the
    sums become per-sample statistics, gamma [1, C] and beta are sliced with the channels,
    and the 1/C of the hand-built mean becomes 1/C' so the pruned model normalises over the
    channels it keeps (checked against numpy)."""
    dead = (1, 3, 4, 6)
    w1, b1 = dead_weight(rng, (6, 8), (), dead), dead_vector(rng, 8, dead)
    gamma, beta = dead_vector(rng, 8, (), 0.5, 1.5).reshape(1, 8), dead_vector(rng, 8).reshape(1, 8)
    w2 = dead_weight(rng, (8, 3), dead)
    model = build(HEAD + """
        g (float[1,6] x, float[6,8] w1, float[8] b1, float[1,8] gamma, float[1,8] beta, float[8,3] w2,
           int64[1] axes, float inv_c, float eps) => (float[1,3] y) {
            h = Gemm(x, w1, b1)
            s = ReduceSum(h, axes)
            mean = Mul(s, inv_c)
            d = Sub(h, mean)
            sq = Mul(d, d)
            s2 = ReduceSum(sq, axes)
            var = Mul(s2, inv_c)
            ve = Add(var, eps)
            sd = Sqrt(ve)
            inv = Reciprocal(sd)
            scale = Mul(inv, gamma)
            n = Mul(d, scale)
            o = Add(n, beta)
            y = Gemm(o, w2)
        }""", w1=w1, b1=b1, gamma=gamma, beta=beta, w2=w2, axes=np.array([1]), inv_c=np.float32(1 / 8),
        eps=np.float32(1e-5))
    pruned, stats = prune(model, ratio=0.5)
    assert weight_shapes(pruned)["gamma"] == (1, 4) and weight_shapes(pruned)["w2"] == (4, 3)
    scales = [v.const_value.numpy() for n, v in pruned.graph.initializers.items() if "mean_scale" in n]
    assert len(scales) == 2 and all(np.isclose(float(s), 0.25) for s in scales)
    x = rng.standard_normal((1, 6)).astype(np.float32)
    keep = [c for c in range(8) if c not in dead]
    h = x @ w1[:, keep] + b1[keep]
    d = h - h.mean(axis=1, keepdims=True)
    want = (d / np.sqrt((d ** 2).mean(axis=1, keepdims=True) + 1e-5) * gamma[:, keep] + beta[:, keep]) @ w2[keep]
    got = ort.run(ort.session(pruned), {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_reduce_max_over_channels_is_a_statistic(rng):
    """A ReduceMax over the channels is a per-sample statistic: safe to prune through (a
    Softmax over them is not, see test_no_safe_group_is_a_clear_error: its output has the
    channels, each normalised by all of them)."""
    model = build(HEAD + """
        g (float[1,4,8,8] x, float[8,4,1,1] w1, float[3,8,1,1] w2) => (float[1,3,8,8] y, float[1,1,8,8] m) {
            a = Conv(x, w1)
            m = ReduceMax<axes=[1]>(a)
            y = Conv(a, w2)
        }""", w1=dead_weight(rng, (8, 4, 1, 1)), w2=dead_weight(rng, (3, 8, 1, 1)))
    group = next(g for g in groups_of(model).groups if g.size == 8)
    assert group.safe
