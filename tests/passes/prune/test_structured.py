"""prune.structured on real models (the trained digits CNN, magika, torch architectures
exported to ONNX) and its configuration errors."""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.errors import PassError, PipelineError

logger = logging.getLogger(__name__)


def prune(model, data=None, seed=0, **config):
    result = slimgraph.run(model, [{"prune.structured": config}], data=data, seed=seed)
    return result.model, result.report.rows[-1].stats


@pytest.fixture(scope="module")
def digits():
    return slimgraph.load(str(zoo.digits_cnn()))


@pytest.fixture(scope="module")
def digits_test():
    return zoo.digits_test_data()


def accuracy(model, test) -> float:
    out = ort.run_batched(model, {"input": test["input"]})
    return float((np.argmax(out["logits"], axis=1) == test["labels"]).mean())


# --- digits CNN (trained) ------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_digits_accuracy_without_finetuning(digits, digits_test, ratio, capsys):
    pruned, stats = prune(digits, ratio=ratio, multiple=1)
    base, acc = accuracy(digits, digits_test), accuracy(pruned, digits_test)
    with capsys.disabled():
        print(f"\ndigits CNN, ratio {ratio}: top-1 {base:.3f} -> {acc:.3f}, MACs {stats['macs_before']} -> "
              f"{stats['macs_after']}, params {stats['params_before']} -> {stats['params_after']}")
    assert acc > 0.3  # well above chance (0.1) without fine-tuning
    # the three conv groups are cut; the input and the logits are not
    assert (stats["groups_pruned"], stats["groups_unsafe"]) == (3, 2)
    assert stats["channels_after"] == sum(c - round(c * ratio) for c in (16, 32, 32))
    assert stats["macs_after"] < stats["macs_before"] * (1 - ratio) ** 2 * 1.15
    assert [r["out ch"] for r in stats["table"]][-1] == "10 -> 10"


def test_digits_l1_beats_random_selection(digits, digits_test):
    l1 = accuracy(prune(digits, ratio=0.3, multiple=1)[0], digits_test)
    randoms = [accuracy(prune(digits, ratio=0.3, multiple=1, criterion="random", seed=s)[0], digits_test)
               for s in range(5)]
    logger.info("digits at 30%%: l1 %.3f, random %s", l1, randoms)
    assert l1 > np.mean(randoms)


@pytest.mark.parametrize("mode", ["global", "macs"])
def test_digits_global_and_macs_modes(digits, digits_test, mode):
    pruned, stats = prune(digits, mode=mode, ratio=0.3, target_macs=0.5, min_keep=0.25, multiple=1)
    assert accuracy(pruned, digits_test) > 0.3
    if mode == "macs":
        assert stats["macs_after"] == pytest.approx(0.5 * stats["macs_before"], rel=0.1)
    # the per-group floor holds: no layer keeps fewer than a quarter of its channels
    for row in stats["table"]:
        before, after = (int(x) for x in row["out ch"].split(" -> "))
        assert after >= before // 4


def test_digits_macs_mode_with_a_parameter_budget(digits):
    """target_params adds a second budget to mode=macs: the threshold rises until both the
    MACs and the weight layers' parameters are cut by their targets."""
    _, macs_only = prune(digits, mode="macs", target_macs=0.3, multiple=1)
    _, both = prune(digits, mode="macs", target_macs=0.3, target_params=0.6, multiple=1)
    assert macs_only["params_after"] > 0.45 * macs_only["params_before"]  # the MAC budget alone keeps them
    assert both["params_after"] <= 0.42 * both["params_before"]  # weight layers <= 40%, biases aside
    assert both["macs_after"] <= 0.72 * both["macs_before"]


def test_digits_bn_scale_and_rounding(digits, digits_test):
    pruned, stats = prune(digits, ratio=0.3, criterion="bn_scale", multiple=8)
    outs = [r["out ch"] for r in stats["table"]]
    # multiples of 8, rounded up only while MACs and weights stay within the exact 30% cut's
    # (the third conv feeds the 512-input classifier: 24 channels would hold more weights than 22)
    assert outs == ["16 -> 8", "32 -> 24", "32 -> 16", "10 -> 10"]
    assert stats["params_after"] <= 0.7 * stats["params_before"]
    assert accuracy(pruned, digits_test) > 0.3


def test_exclude_and_layers(digits):
    # by torch module path: the second conv reads the first one's channels and makes the
    # second one's, so both of those groups stay whole; the third conv's is cut
    _, stats = prune(digits, ratio=0.5, multiple=1, exclude=["features.1.*"])
    assert [r["out ch"] for r in stats["table"]][:3] == ["16 -> 16", "32 -> 32", "32 -> 16"]
    _, stats = prune(digits, ratio=0.5, multiple=1, exclude=["Gemm"])  # by op type
    assert [r["out ch"] for r in stats["table"]][:3] == ["16 -> 8", "32 -> 16", "32 -> 32"]
    _, stats = prune(digits, ratio=0.5, multiple=1, layers=["node_conv2d_2"])
    assert [r["out ch"] for r in stats["table"]][:3] == ["16 -> 16", "32 -> 32", "32 -> 16"]


def test_digits_consumer_criterion_survives_batchnorm_folding(digits, digits_test):
    """After BatchNorm folding a filter's norm mostly reflects gamma / sigma, so l1 ranks the
    digits CNN's channels poorly; the readers' weights (consumer_l2) do not change with the
    producer's folding and keep far more accuracy (measured: 74% vs 95% at 30%, 34% vs 68%
    at 50%; Torch-Pruning L1 on the unfolded torch model: 94% and 51%)."""
    folded = slimgraph.run(digits, "cleanup,fuse").model
    for ratio, floor in ((0.3, 0.9), (0.5, 0.6)):
        l1 = accuracy(prune(folded, ratio=ratio, multiple=1)[0], digits_test)
        consumer = accuracy(prune(folded, ratio=ratio, multiple=1, criterion="consumer_l2")[0], digits_test)
        assert consumer > floor and consumer > l1 + 0.1, (ratio, l1, consumer)


# --- magika: a real ONNX file whose conv channels meet a LayerNorm built from Reduce ops -------------
def test_magika_conv_channels_pruned_through_its_layernorm():
    """magika's Conv_0 (512 channels) feeds GlobalMaxPool and a LayerNorm built by hand
    (ReduceSum * 1/512, Sub, Mul by gamma [1, 512]) before the classifier: the group is
    pruned with gamma / beta sliced and 1/512 rewritten to 1/kept; the dense layer's fold
    to 256 and the logits stay whole. The result runs on ORT and mostly agrees with the
    dense model on real files."""
    model = slimgraph.load(str(zoo.magika_model_path()))
    pruned, stats = prune(model, mode="macs", target_macs=0.5)
    assert stats["groups_pruned"] == 1
    assert stats["macs_after"] <= 0.52 * stats["macs_before"]
    assert any("Reshape that is not a provable flatten" in u for u in stats["unsafe"])
    assert any("graph output" in u for u in stats["unsafe"])
    scales = [v.const_value.numpy() for n, v in pruned.graph.initializers.items() if "mean_scale" in n]
    kept = int(next(r["out ch"] for r in stats["table"] if r["op"] == "Conv").split(" -> ")[1])
    assert len(scales) == 2 and all(np.isclose(float(s), 1 / kept) for s in scales)
    rows = zoo.magika_inputs(64)[zoo.MAGIKA_INPUT]
    a = ort.run_batched(model, {zoo.MAGIKA_INPUT: rows})
    b = ort.run_batched(pruned, {zoo.MAGIKA_INPUT: rows})
    agree = (next(iter(a.values())).argmax(-1) == next(iter(b.values())).argmax(-1)).mean()
    assert agree > 0.8


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_unit_interval(digits, ratio):
    with pytest.raises(PipelineError, match="ratio"):
        prune(digits, ratio=ratio)


def test_layers_pattern_matching_nothing(digits):
    with pytest.raises(PassError, match="'no_such_layer\\*' matches no node"):
        prune(digits, layers=["no_such_layer*"])


def test_latency_mode_without_its_module(digits, monkeypatch):
    import slimgraph.passes.prune as package

    monkeypatch.setitem(sys.modules, "slimgraph.passes.prune.latency", None)
    monkeypatch.delattr(package, "latency", raising=False)
    with pytest.raises(PassError, match="mode 'latency'"):
        prune(digits, mode="latency")


def test_latency_mode_uses_choose_keep(digits, monkeypatch):
    seen = {}

    def choose_keep(model, analysis, scores, config, info=None, losses=None):
        seen.update(scores=scores, config=config, losses=losses)
        info.update(predicted_ms=1.0)
        return {gid: 8 for gid in scores}

    fake = types.ModuleType("slimgraph.passes.prune.latency")
    fake.choose_keep = choose_keep
    monkeypatch.setitem(sys.modules, "slimgraph.passes.prune.latency", fake)
    import slimgraph.passes.prune as package

    monkeypatch.setattr(package, "latency", fake, raising=False)
    _, stats = prune(digits, mode="latency")
    assert sorted(len(s) for s in seen["scores"].values()) == [16, 32, 32]
    assert [r["out ch"] for r in stats["table"]][:3] == ["16 -> 8", "32 -> 8", "32 -> 8"]
    assert stats["latency"] == {"predicted_ms": 1.0}  # what choose_keep reports goes to the stats
    # objective sensitivity (the default): an output-error curve per group, 0 when whole
    assert sorted(seen["losses"]) == sorted(seen["scores"])
    assert all(curve[-1] == 0 and np.all(np.diff(curve) <= 0) for curve in seen["losses"].values())


# --- torch architectures exported to ONNX ----------------------------------------------------------
def images(size: int, n: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)}


@pytest.fixture(scope="module")
def c2f_block():
    """Conv, C2f (Split, Concat, residual Add, SiLU) and SPPF (MaxPool) from a real torch
    export (the TorchScript exporter, with BN kept: 1 s here, where torch.export takes 14 s)."""
    torch = pytest.importorskip("torch")
    import io

    import onnx
    import torch_models

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch_models.ConvBnSiLU(3, 32, 3, 2), torch_models.C2f(32, 32, 2),
                                torch_models.SPPF(32, 32), torch.nn.Conv2d(32, 4, 1)).eval()
    buffer = io.BytesIO()
    torch.onnx.export(block, (torch.randn(1, 3, 32, 32),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("fused", [False, True])
def test_c2f_sppf_block_from_torch(c2f_block, fused):
    """Before and after the `cleanup` and `fuse` recipes (BN folded, SiLU -> com.microsoft
    QuickGelu, as in the prune-50 recipe)."""
    model = slimgraph.load(c2f_block)
    steps = ["cleanup", "fuse"] if fused else []
    result = slimgraph.run(model, [*steps, {"prune.structured": {"ratio": 0.5}}])
    pruned, stats = result.model, result.report.rows[-1].stats
    ops = {n.op_type for n in pruned.graph}
    assert {"Split", "Concat", "MaxPool", "Add"} <= ops
    assert ("QuickGelu" in ops) == fused and ("BatchNormalization" in ops) != fused
    # stem, C2f: cv1 halves (2), bottlenecks (2 x 1 inner), cv2; SPPF: cv1, cv2 = 8 groups
    assert stats["groups_pruned"] == 8 and stats["groups_unsafe"] == 2
    out = ort.run(pruned, {"x": images(32)["x"]})
    assert next(iter(out.values())).shape == (1, 4, 16, 16)
    assert stats["macs_after"] < 0.35 * stats["macs_before"]
    assert all(not r["MACs"].endswith(" 0") for r in stats["table"])  # shapes kept through contrib ops


def _latency_ratio(a, b, feeds) -> float:
    """Speed-up of `b` over `a` with constants folded (a torch export computes its absent
    biases from weight shapes at run time; the pruned model no longer does)."""
    a = slimgraph.run(a, ["fold_constants", "eliminate_dead"]).model
    stats = ort.bench({"float": a, "pruned": b}, feeds, runs=20, threads=2)
    return stats["float"].ratio_to(stats["pruned"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_classifiers(exported, name, ratio, capsys):
    model = slimgraph.load(str(exported(name, 224)))
    pruned, stats = prune(model, ratio=ratio)
    feeds = {model.graph.inputs[0].name: images(224)["x"]}
    out = ort.run(pruned, feeds)
    assert next(iter(out.values())).shape == (1, 1000)
    # every internal group is provable; only the image input and the logits are not
    assert stats["groups_unsafe"] == 2 and stats["groups_pruned"] == stats["groups_safe"] >= 10
    kept = stats["macs_after"] / stats["macs_before"]
    assert (1 - ratio) ** 2 * 0.8 < kept < (1 - ratio) ** 2 * 1.25  # multiples of 8 move it a little
    speedup = _latency_ratio(model, pruned, feeds)
    with capsys.disabled():
        print(f"\n{name} ratio {ratio}: MACs kept {kept:.3f}, params {stats['params_before']} -> "
              f"{stats['params_after']}, ORT speedup {speedup:.2f}x")


@pytest.mark.slow
def test_yolo_like_macs_target(exported, capsys):
    model = slimgraph.load(str(exported("yolo_like", 320)))
    pruned, stats = prune(model, mode="macs", target_macs=0.5)
    feeds = {model.graph.inputs[0].name: images(320)["x"]}
    before, after = ort.run(model, feeds), ort.run(pruned, feeds)
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    # only the input and the six head convs feeding the three outputs are left whole
    assert stats["groups_unsafe"] == 7
    assert stats["macs_after"] == pytest.approx(0.5 * stats["macs_before"], rel=0.08)
    speedup = _latency_ratio(model, pruned, feeds)
    with capsys.disabled():
        print(f"\nyolo_like macs 0.5: MACs {stats['macs_before']} -> {stats['macs_after']}, "
              f"params {stats['params_before']} -> {stats['params_after']}, ORT speedup {speedup:.2f}x")


@pytest.mark.slow
def test_minilm_heads_and_feed_forward(capsys):
    """A transformer: the FFN's 1536 intermediate channels (MatMul -> GELU -> MatMul) and
    the 12 attention heads of each layer are provable; the hidden size (LayerNorm over it,
    the graph's inputs and outputs) is not."""
    model = slimgraph.load(str(zoo.minilm()))
    pruned, stats = prune(model, ratio=0.3)
    assert stats["groups_pruned"] == 12 and stats["channels_before"] == 6 * 1536 + 6 * 12
    heads = [r for r in stats["table"] if r["out ch"] == "384 -> 256"]  # 8.4 -> 8 heads of 32 kept
    assert len(heads) == 18  # Q, K and V of 6 layers
    unsafe = " ".join(stats["unsafe"])
    assert "LayerNormalization" in unsafe
    feeds = zoo.minilm_inputs(zoo.minilm_sentences(16))
    a, b = ort.run(model, feeds), ort.run(pruned, feeds)
    name = "sentence_embedding" if "sentence_embedding" in a else next(iter(a))
    assert a[name].shape == b[name].shape
    fidelity = float(zoo.minilm_fidelity(a[name], b[name]).mean())
    with capsys.disabled():
        print(f"\nMiniLM heads + FFN at 0.3: MACs {stats['macs_before']} -> {stats['macs_after']}, "
              f"mean cosine to the dense embeddings {fidelity:.3f} (no fine-tuning)")
    assert fidelity > 0.3
