"""prune.n_m: N:M groups along each op's reduction axis, annotations, the N:M contract,
skipped layers, bad configs; small graphs and the digits CNN."""

import logging

import numpy as np
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.errors import PassError, PipelineError
from slimgraph.ir import Model
from slimgraph.passes import contracts
from slimgraph.passes.prune.n_m import nm_mask
from slimgraph.passes.prune.sparsity import conforms, nm_shapes
from tests.passes.prune._graphs import digits_top1, mlp, weight


def groups_ok(w: np.ndarray, axis: int, n: int, m: int) -> bool:
    return conforms(np.moveaxis(w != 0, axis, -1), n, m)


def test_two_four_along_the_reduction_axis_of_matmul_and_gemm():
    model = mlp()
    out = slimgraph.run(model, "prune.n_m").model
    w2, w3 = weight(out, "w2"), weight(out, "w3")  # MatMul [K, N]: axis 0; Gemm transB [N, K]: axis 1
    assert groups_ok(w2, 0, 2, 4) and groups_ok(w3, 1, 2, 4)
    assert not groups_ok(w2, 1, 2, 4) and not groups_ok(w3, 0, 2, 4)  # not along the other axis
    assert (w2 == 0).mean() == 0.5 and (w3 == 0).mean() == 0.5
    # each group keeps its two largest magnitudes, unchanged
    orig = np.abs(weight(model, "w2")).reshape(16, 4, 128)
    kept = (w2 != 0).reshape(16, 4, 128)
    assert (np.sort(orig, axis=1)[:, 2:, :].sum(1) == (orig * kept).sum(1)).all()
    assert (weight(out, "w1") == 0).sum() == 0 and (weight(out, "w4") == 0).sum() == 0  # first/last dense


def test_conv_groups_run_over_input_channels():
    w = np.random.default_rng(0).standard_normal((8, 16, 3, 3)).astype(np.float32)
    keep = nm_mask(w, 1, 1, 4)
    assert keep.sum() == w.size // 4
    assert (keep.reshape(8, 4, 4, 3, 3).sum(axis=2) == 1).all()


def test_annotations_and_contract():
    out = slimgraph.run(mlp(), "prune.n_m(n=1, m=8)").model
    annotated = {n.op_type: Model.annotation(n, "n_m") for n in out.graph if Model.annotation(n, "n_m")}
    assert annotated == {"MatMul": {"n": 1, "m": 8, "axis": 0, "weight": "w2"},
                         "Gemm": {"n": 1, "m": 8, "axis": 1, "weight": "w3"}}
    records = dict(contracts.records(out))
    # reduction axis last: MatMul w2 [K=64, N=128] -> [128, 64]; Gemm w3 [N=64, K=128] stays
    assert records["n_m"]["tensors"] == [{"shape": [64, 128], "count": 1}, {"shape": [128, 64], "count": 1}]
    assert nm_shapes(out, 1, 8) == {(64, 128): 1, (128, 64): 1}
    assert contracts.check(out) == []


def test_layer_not_divisible_by_m_is_skipped_with_a_warning(caplog):
    from tests.passes.prune.conftest import build

    rng = np.random.default_rng(0)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, 64] x, float[64, 64] w1, float[64, 66] w2, float[66, 64] w3, float[64, 64] w4) => (float[B, 64] y) {
      a = MatMul(x, w1)
      b = MatMul(a, w2)
      c = MatMul(b, w3)
      y = MatMul(c, w4)
    }
    """
    shapes = {"w1": (64, 64), "w2": (64, 66), "w3": (66, 64), "w4": (64, 64)}
    model = build(text, **{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()})
    with caplog.at_level(logging.WARNING):
        result = slimgraph.run(model, "prune.n_m")
    assert "reduction size 66" in caplog.text and "not a multiple of 4" in caplog.text
    assert (weight(result.model, "w3") == 0).sum() == 0  # K = 66
    assert groups_ok(weight(result.model, "w2"), 0, 2, 4)
    skipped = result.report.rows[-1].stats["skipped"]
    assert {"layer": "w3", "reason": "reduction size 66 is not a multiple of m=4"} in skipped
    with pytest.raises(PassError, match=r"prune.n_m.*no layer has a reduction size divisible by m=16"):
        slimgraph.run(model, "prune.n_m(m=16, exclude=[w2])")


@pytest.mark.parametrize("config, message", [
    ("prune.n_m(n=4, m=4)", r"n must be smaller than m \(n=4, m=4\)"),
    ("prune.n_m(m=3)", r"m must be one of \[2, 4, 8, 16\]"),
    ("prune.n_m(n=0)", r"n: Input should be greater than or equal to 1"),
])
def test_bad_config(config, message):
    with pytest.raises(PipelineError, match=message):
        slimgraph.run(mlp(), config)


def test_digits_cnn_two_four(capsys):
    model = slimgraph.load(zoo.digits_cnn())
    out = slimgraph.run(model, "cleanup,prune.n_m").model
    convs = [n for n in out.graph if n.op_type == "Conv"]
    assert Model.annotation(convs[0], "n_m") is None  # stem: first layer (and Cin = 1)
    for conv in convs[1:]:
        w = conv.inputs[1].const_value.numpy()
        assert groups_ok(w, 1, 2, 4) and (w == 0).mean() == 0.5
        assert Model.annotation(conv, "n_m")["axis"] == 1
    top1 = digits_top1(out)
    with capsys.disabled():
        print(f"\ndigits CNN 2:4 (no fine-tuning): top-1 {top1:.4f} (dense {digits_top1(model):.4f})")
    assert contracts.check(out) == []
