"""prune.magnitude: per-layer and global targets, overrides, exclusions, first/last dense,
embeddings, the sparsity contract; on small graphs, the digits CNN and MiniLM."""

import numpy as np
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.errors import PassError, PipelineError
from slimgraph.passes import contracts
from slimgraph.passes.prune import sparsity
from tests.helpers import parse
from tests.passes.prune._graphs import digits_top1, mlp, weight


def zeros(a: np.ndarray) -> float:
    return float((a == 0).mean())


def test_layer_scope_prunes_each_weight_exactly_and_keeps_first_last_dense():
    model = mlp()
    out = slimgraph.run(model, "prune.magnitude(sparsity=0.75)").model
    assert zeros(weight(out, "w1")) == 0 and zeros(weight(out, "w4")) == 0  # first / last layer
    for name in ("w2", "w3"):
        w, orig = weight(out, name), weight(model, name)
        assert zeros(w) == 0.75
        # the dropped ones are the smallest magnitudes; the kept ones are unchanged
        assert np.abs(orig[w == 0]).max() <= np.abs(orig[w != 0]).min()
        np.testing.assert_array_equal(w[w != 0], orig[w != 0])
    assert zeros(weight(model, "w2")) == 0  # input model untouched


def test_keep_first_last_off_and_report_table():
    result = slimgraph.run(mlp(), "prune.magnitude(sparsity=0.5, keep_first_last=false)")
    assert all(zeros(weight(result.model, n)) == 0.5 for n in ("w1", "w2", "w3", "w4"))
    assert "| w1 | MatMul | 64x64 | 0.5 | 0.000 -> 0.500 |" in result.report.to_markdown()


def test_per_layer_override_and_exclude():
    out = slimgraph.run(mlp(), [{"prune.magnitude": {"sparsity": 0.5, "per_layer": {"w3": 0.9},
                                                    "keep_first_last": False, "exclude": ["w1"]}}]).model
    assert zeros(weight(out, "w1")) == 0
    assert zeros(weight(out, "w2")) == 0.5
    assert zeros(weight(out, "w3")) == round(0.9 * 8192) / 8192
    assert zeros(weight(out, "w4")) == 0.5


def test_global_scope_normalises_each_layer_by_its_rms():
    # w2 is 100x larger than w3: raw magnitudes would empty w3 and spare w2
    model = mlp(scales=(1.0, 100.0, 1.0, 1.0))
    out = slimgraph.run(model, "prune.magnitude(sparsity=0.6, scope=global)").model
    z2, z3 = zeros(weight(out, "w2")), zeros(weight(out, "w3"))
    assert (z2 * 8192 + z3 * 8192) / 16384 == pytest.approx(0.6, abs=1e-4)
    assert 0.5 < z2 < 0.7 and 0.5 < z3 < 0.7


def test_min_size_skips_small_weights():
    out = slimgraph.run(mlp(), "prune.magnitude(sparsity=0.5, keep_first_last=false, min_size=4096)").model
    assert zeros(weight(out, "w1")) == 0.5 and zeros(weight(out, "w4")) == 0  # 64x16 = 1024 < 4096


def test_shared_weight_pruned_once_and_embeddings():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[B, 4] ids) => (float[B, 4, 64] y) {
      e = Gather(table, ids)
      h = MatMul(e, w)
      a = Relu(h)
      y = MatMul(a, w)
    }
    """
    from tests.passes.prune.conftest import build

    rng = np.random.default_rng(1)
    table, w = rng.standard_normal((100, 64)).astype(np.float32), rng.standard_normal((64, 64)).astype(np.float32)
    model = build(text.replace("g (int64[B, 4] ids)", "g (int64[B, 4] ids, float[100, 64] table, float[64, 64] w)"),
                  table=table, w=w)
    result = slimgraph.run(model, "prune.magnitude(sparsity=0.5, keep_first_last=false, embeddings=true)")
    out = result.model
    assert zeros(weight(out, "table")) == 0.5 and zeros(weight(out, "w")) == 0.5  # not 0.75
    assert len(result.report.rows[-1].stats["table"]) == 2  # table and w, w once
    no_emb = slimgraph.run(model, "prune.magnitude(sparsity=0.5, keep_first_last=false)").model
    assert zeros(weight(no_emb, "table")) == 0


def test_contract_recorded_by_content():
    out = slimgraph.run(mlp(), "prune.magnitude(sparsity=0.5)").model
    (kind, record), = contracts.records(out)
    assert kind == "sparsity" and record["zeros"] == 8192 == sparsity.count_zeros(out)
    assert contracts.check(out) == []


@pytest.mark.parametrize("config, message", [
    ("prune.magnitude(sparsity=1.0)", r"sparsity: Input should be less than 1"),
    ("prune.magnitude(sparsity=-0.1)", r"sparsity: Input should be greater than or equal to 0"),
    ("prune.magnitude(scope=model)", r"scope must be one of \['layer', 'global'\]"),
    ("prune.magnitude(per_layer={w2: 1.5})", r"sparsities must be in \[0, 1\)"),
])
def test_bad_config_is_a_pipeline_error(config, message):
    with pytest.raises(PipelineError, match=message):
        slimgraph.run(mlp(), config)


@pytest.mark.parametrize("config, message", [
    ({"exclude": ["w9"]}, r"exclude pattern\(s\) \['w9'\] match no layer"),
    ({"per_layer": {"layer_typo*": 0.5}}, r"per_layer pattern\(s\) \['layer_typo\*'\] match no prunable layer"),
    ({"per_layer": {"w1": 0.5}}, r"per_layer pattern\(s\) \['w1'\]"),  # w1 is the first layer, kept dense
])
def test_patterns_matching_nothing_are_errors_naming_them(config, message):
    with pytest.raises(PassError, match=message):
        slimgraph.run(mlp(), [{"prune.magnitude": config}])


def test_no_prunable_weight_is_a_noop():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 3] y) <float[4, 3] w = {1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0}> {
      y = MatMul(x, w)
    }
    """)
    result = slimgraph.run(model, "prune.magnitude(sparsity=0.5, keep_first_last=false)")
    np.testing.assert_array_equal(weight(result.model, "w"), weight(model, "w"))
    assert contracts.records(result.model) == []


# --- real models -------------------------------------------------------------------------
def test_digits_cnn_80_percent(capsys):
    """Digits CNN: the two inner convs at exactly 80% zeros, the stem conv and the classifier
    dense; top-1 on the test split reported (no fine-tuning, so no target)."""
    model = slimgraph.load(zoo.digits_cnn())
    data = zoo.digits_test_data()
    result = slimgraph.run(model, "cleanup,prune.magnitude(sparsity=0.8)", data={"input": data["input"][:64]})
    out = result.model
    convs = [n for n in out.graph if n.op_type == "Conv"]
    gemm = next(n for n in out.graph if n.op_type == "Gemm")
    ws = [n.inputs[1].const_value.numpy() for n in convs]
    assert zeros(ws[0]) == 0 and zeros(gemm.inputs[1].const_value.numpy()) == 0
    assert [int((w == 0).sum()) for w in ws[1:]] == [round(0.8 * w.size) for w in ws[1:]]
    before, after = digits_top1(model), digits_top1(out)
    with capsys.disabled():
        print(f"\ndigits CNN top-1: dense {before:.4f}, 80% unstructured (no fine-tuning) {after:.4f}")
    assert before > 0.9 and 0.1 < after <= 1.0
    assert contracts.check(out) == []


@pytest.mark.slow
def test_minilm_80_percent_with_embeddings(capsys):
    model = slimgraph.load(zoo.minilm())
    out = slimgraph.run(model, "cleanup,prune.magnitude(sparsity=0.8, embeddings=true)").model
    gathers = [n for n in out.graph if n.op_type == "Gather" and n.inputs[0].const_value is not None
               and n.inputs[0].const_value.size >= 1024]
    tables = [n.inputs[0].const_value.numpy() for n in gathers]
    assert tables and all(int((t == 0).sum()) == round(0.8 * t.size) for t in tables)
    from slimgraph.backends import ort

    feeds = zoo.minilm_inputs(zoo.minilm_sentences(64))
    a = ort.run(ort.session(model), feeds)[zoo.MINILM_OUTPUT]
    b = ort.run(ort.session(out), feeds)[zoo.MINILM_OUTPUT]
    cos = zoo.minilm_fidelity(a, b)
    with capsys.disabled():
        print(f"\nMiniLM 80% with embeddings: cosine mean {cos.mean():.4f} min {cos.min():.4f} (64 sentences)")
    assert np.isfinite(cos).all() and cos.mean() > 0
