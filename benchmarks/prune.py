"""Structured pruning side by side: Torch-Pruning 1.6 and slimgraph's `prune.structured`,
on the same torch models and ratios, in one run, on one machine.

Models:
- ResNet-18 and MobileNetV2 shapes (`torch_models`, random weights, BatchNorm statistics
  measured on random inputs so that the logits depend on the input, 224x224), at ratios
  0.3 and 0.5;
- the digits CNN (the architecture of `zoo.digits_cnn`, trained here with its seed and
  recipe, so both tools start from the same trained weights): test top-1 after pruning,
  without fine-tuning;
- the YOLO-style detector `torch_models.yolo_like()` (residuals, Split/Concat, SiLU,
  Upsample, three detection heads as outputs; 320x320) and magika (ONNX only): slimgraph
  with `mode: macs` at MAC targets 0.3 and 0.5; Torch-Pruning on the detector too, with its
  three head output convs ignored (magika has no torch module).

Variants of a model (each a row):
- Torch-Pruning: `tp.pruner.MetaPruner` with `tp.importance.MagnitudeImportance(p=1)`,
  `pruning_ratio=r`, per layer (`global_pruning=False`), the final Linear ignored; the
  pruned module exported exactly like the float model (opset 17, TorchScript exporter,
  BatchNormalization kept);
- slimgraph uniform: `prune.structured(ratio=r, criterion=l1, mode=uniform, multiple=8)`
  run on the float model's ONNX (`cleanup,fuse,<pass>,cleanup`);
- slimgraph macs: `mode=macs` with `target_macs` = Torch-Pruning's MAC cut at r and
  `target_params` = its parameter cut (both budgets honoured);
- slimgraph latency: `mode=latency` with the same target, i.e. the predicted latency (the
  per-layer ORT latency table, `slimgraph.passes.prune.latency`, calibrated end to end on
  the model) cut by that fraction, the cost of each cut its measured output error
  (`objective: sensitivity`, the default); `(importance objective)`: the same with the
  earlier objective, the log share of L1 importance;
- slimgraph macs @ latency's fidelity: `mode=macs` with `target_macs` bisected until its
  fidelity (mean logit cosine to the dense model on random inputs) equals the latency
  row's: latency-aware and MAC-driven pruning at equal accuracy proxy;
- slimgraph latency greedy / MAC greedy @ latency's fidelity: the latency mode's greedy and
  objective with measured time or MACs as the cost, each path followed as far as the
  fidelity stays at the latency row's: what measuring time adds, all else equal;
- slimgraph latency, target 1.8x / 3.6x (ratios 0.3 / 0.5): `target_speedup` set to the
  issue's target, with Torch-Pruning's MAC and parameter cuts as budgets.
The digits CNN has Torch-Pruning and slimgraph uniform (consumer_l2, multiple 1) plus a
sweep of criteria at the same channel counts; magika has mode=macs with l1 and consumer_l2.
The latency table is measured afresh in every run (`--table` to reuse one), so its entries
are timed under the same conditions. Where the time goes: ORT's profiler per kernel kind
(stem, pointwise, dense kxk, depthwise, Gemm, other) for dense, Torch-Pruning and the
fastest slimgraph variant, and the kernel-time ceiling of a uniform width multiplier at
Torch-Pruning's MACs (see `ceiling`).
Every exported model (float and Torch-Pruning's) goes through slimgraph's exact
`cleanup,fuse` before it is measured and timed, so BatchNorm is folded everywhere and
parameter counts compare like for like (ORT folds it at load anyway).

Columns: MACs and parameters as % of the dense model (slimgraph's counters for every
tool), file MB, ORT CPU speed-up vs dense (2 threads, batch 1, spinning off, every variant of
a model interleaved round-robin in one `ort.bench` call with a dense-vs-dense control row;
speed-up = 1 / the median over rounds of time / dense time in the same round,
`BenchStats.ratio_to`), validity (ORT loads and runs it, outputs finite and of the dense
shapes).

Targets (issue 4): at each ratio, slimgraph's MAC and parameter reduction >= Torch-Pruning's
and ORT speed-up >= 1.8x at 0.3 and >= 3.6x at 0.5 (ResNet-18 and MobileNetV2); the
latency-aware mode faster than MAC-driven pruning at equal fidelity; digits CNN
top-1 >= Torch-Pruning's at <= its MACs; magika valid with MACs down by the target. Exit
status 1 when a target is missed; tables to benchmarks/results/prune.md, the plots to
prune.png. Takes about 5 minutes on a quiet 2-core machine (most of it measuring the
latency table).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import common
import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import slimgraph  # noqa: E402
from slimgraph import zoo  # noqa: E402
from slimgraph.backends import ort  # noqa: E402
from slimgraph.errors import SlimgraphError  # noqa: E402

WORK = common.CACHE / "prune"
RATIOS = (0.3, 0.5)
TARGET_SPEEDUP = {0.3: 1.8, 0.5: 3.6}
DENSE, CONTROL = "dense", "dense (control)"
TP, UNIFORM, MACS, LATENCY, MACS_EQ = ("Torch-Pruning", "slimgraph uniform", "slimgraph macs",
                                       "slimgraph latency", "slimgraph macs @ latency's fidelity")
#: the latency mode with the earlier objective (log share of L1 importance), for comparison
LATENCY_IMP = "slimgraph latency (importance objective)"
#: the latency mode with an explicit speed-up target and Torch-Pruning's MAC and param cuts as budgets
SPEED = "slimgraph latency, target {}x"
#: the digits CNN's criteria sweep (besides consumer_l2 at multiple 1): (criterion, multiple)
DIGITS_SWEEP = (("l1", 1), ("l2", 1), ("consumer_l1", 1), ("l1", 8))
#: random inputs for the output-fidelity proxy of the random-weight CNNs
FIDELITY_INPUTS = 8
#: batches of 8 random inputs that set the CNNs' BatchNorm statistics (`seeded`)
CALIBRATION_BATCHES = 4
MACS_GREEDY = "slimgraph MAC greedy @ latency's fidelity"
#: the latency mode's own greedy path, followed to the same fidelity as the MAC greedy's
LATENCY_PATH = "slimgraph latency greedy @ latency's fidelity"
#: sensitivity inputs: what prune.structured uses by default (4 random inputs, the context's seed 0)
SENSITIVITY_SAMPLES = 4
logger = logging.getLogger("benchmarks.prune")


@dataclasses.dataclass
class Variant:
    model: str
    tool: str
    ratio: float | None
    path: Path | None = None
    macs: float = float("nan")
    params: float = float("nan")
    file_mb: float = float("nan")
    speedup: float = float("nan")
    valid: str = ""
    top1: float | None = None
    seconds: float = float("nan")
    note: str = ""
    #: slimgraph's accuracy proxy (`structured.importance_kept`), from the pass's stats
    importance: float | None = None
    #: mean cosine similarity of the logits to the dense model's on random inputs
    fidelity: float | None = None


# --- torch side -------------------------------------------------------------------------------------
def seeded(build: Callable, bn: bool = True, calibrate: tuple[int, ...] | None = None):
    """The module `common._export` exports: seed 0, non-trivial BatchNorm statistics.

    `calibrate` (an input size): BatchNorm statistics measured on random inputs of that
    size instead (gamma in [0.5, 1.5], beta in [-0.2, 0.2]), as a trained network's match
    its activations. With the random statistics, the signal fades layer by layer and the
    BatchNorm offsets take over: MobileNetV2's logits varied by 1e-7 of their norm across
    inputs (ResNet-18's by 0.6%), so any output-fidelity proxy measured the bias path, not
    what the network computes from its input."""
    import torch

    torch.manual_seed(0)
    model = build().eval()
    if not bn:
        return model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if calibrate is None:
        for m in norms:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        return model
    for m in norms:
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.2, 0.2)
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(CALIBRATION_BATCHES):
            model(torch.randn(8, *calibrate[1:]))
    return model.eval()


def export(module, path: Path, size: tuple[int, ...], outputs: list[str], dynamic_batch: bool = False) -> Path:
    """`common._export`'s settings: opset 17, TorchScript exporter, BatchNorm kept."""
    import torch

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.onnx.export(module, (torch.randn(*size),), str(tmp), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=outputs, training=torch.onnx.TrainingMode.PRESERVE,
                      dynamic_axes={n: {0: "batch"} for n in ["input", *outputs]} if dynamic_batch else None)
    tmp.replace(path)
    return path


def torch_pruned(module, ratio: float, size: tuple[int, ...], ignored: list) -> tuple[object, float]:
    """Torch-Pruning 1.6, L1 magnitude, per-layer ratio; returns (pruned copy, seconds)."""
    import torch
    import torch_pruning as tp

    model = copy.deepcopy(module)
    names = {id(m): n for n, m in module.named_modules()}
    by_name = dict(model.named_modules())
    ignored = [by_name[names[id(m)]] for m in ignored]
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, torch.randn(*size), importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=ignored, global_pruning=False)
    pruner.step()
    return model.eval(), time.perf_counter() - start


# --- slimgraph side ---------------------------------------------------------------------------------
#: the prune-50 recipe's order; FUSE_AFTER folds BatchNorm first but fuses activations after
#: pruning (the channel analysis does not know com.microsoft QuickGelu, SiLU's fused form)
RECIPE = "cleanup,fuse,prune.structured({}),cleanup"
FUSE_AFTER = "cleanup,fold_batchnorm,prune.structured({}),cleanup,fuse"


def slim(src: Path, dst: Path, options: str, pipeline: str = RECIPE) -> tuple[slimgraph.Model, dict, float]:
    """`pipeline` with prune.structured(options) on `src`, saved to `dst`."""
    model = slimgraph.load(src)
    start = time.perf_counter()
    result = slimgraph.run(model, pipeline.format(options))
    seconds = time.perf_counter() - start
    slimgraph.save(result.model, dst)
    stats = next(r.stats for r in result.report.rows if r.name == "prune.structured")
    return result.model, stats, seconds


def optimized(src: Path, dst: Path) -> Path:
    """slimgraph's exact cleanup + fusion (BatchNorm folded), as every tool's output gets."""
    slimgraph.save(slimgraph.run(slimgraph.load(src), "cleanup,fuse").model, dst)
    return dst


def measure(v: Variant, dense: slimgraph.Model, feeds: dict[str, np.ndarray]) -> None:
    """MACs / params (% of dense), file size, validity."""
    model = slimgraph.load(v.path)
    v.macs = 100 * sum(model.analysis("macs").values()) / sum(dense.analysis("macs").values())
    v.params = 100 * model.analysis("params")["params"] / dense.analysis("params")["params"]
    v.file_mb = v.path.stat().st_size / 2**20
    try:
        got = ort.run(ort.session(model), feeds)
        want = ort.run(ort.session(dense), feeds)
    except ort.ORT_ERRORS as e:
        v.valid = f"no: {str(e)[:80]}"
        return
    shapes = [g.shape for g in got.values()] == [w.shape for w in want.values()]
    finite = all(np.isfinite(g).all() for g in got.values())
    v.valid = "yes" if shapes and finite else f"no: shapes {shapes}, finite {finite}"


def bench(variants: list[Variant], dense_path: Path, feeds, runs: int) -> None:
    models = {DENSE: dense_path, CONTROL: dense_path}
    models.update({f"{v.tool} {v.ratio}": v.path for v in variants if v.valid == "yes"})
    stats = ort.bench(models, feeds, runs=runs, warmup=5, threads=2, progress=True)
    base = stats[DENSE]
    for v in variants:
        key = f"{v.tool} {v.ratio}"
        if key in stats:
            v.speedup = 1.0 / stats[key].ratio_to(base)
    control = 1.0 / stats[CONTROL].ratio_to(base)
    variants.insert(0, Variant(variants[0].model, CONTROL, None, dense_path, 100.0, 100.0,
                               dense_path.stat().st_size / 2**20, control, "yes",
                               note=f"dense median {base.median:.2f} ms"))


# --- the CNNs --------------------------------------------------------------------------------------
def cnn(name: str, build: Callable, runs: int) -> list[Variant]:
    import torch

    size = (1, 3, 224, 224)
    folder = WORK / name
    torch.set_num_threads(1)  # the machine is shared; only the BatchNorm calibration trains here
    module = seeded(build, calibrate=size)
    float_path = export(module, folder / f"float-bncal-torch{torch.__version__}.onnx", size, ["logits"])
    dense_path = optimized(float_path, folder / "dense.onnx")
    dense = slimgraph.load(dense_path)
    feeds = {"input": np.random.default_rng(0).standard_normal(size).astype(np.float32)}
    classifier = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
    variants = []
    for r in RATIOS:
        variants += prune_all(name, module, float_path, dense, feeds, r, size, [classifier], folder)
    fidelity(variants, dense, size)
    bench(variants, dense_path, feeds, runs)
    return variants


def fidelity(variants: list[Variant], dense: slimgraph.Model, size: tuple[int, ...]) -> None:
    """Mean cosine similarity of each valid variant's logits to the dense model's over
    `FIDELITY_INPUTS` random inputs (seed 1; the latency mode's sensitivity is measured on
    other inputs, seed 0): the accuracy proxy of the random-weight CNNs."""
    for v in variants:
        if v.valid == "yes" and v.fidelity is None:
            v.fidelity = fidelity_of(v.path, dense, size)


def prune_all(name, module, float_path, dense, feeds, r, size, ignored, folder, dynamic_batch=False,
              criterion: str = "l1", multiple: int = 8, modes: bool = True) -> list[Variant]:
    """The variants at ratio r (see the module docstring); `modes=False`: Torch-Pruning and
    uniform only."""
    out = []
    v = Variant(name, TP, r)
    try:
        pruned, v.seconds = torch_pruned(module, r, size, ignored)
        raw = export(pruned, folder / f"tp-{r}.raw.onnx", size, _outputs(float_path), dynamic_batch)
        v.path = optimized(raw, folder / f"tp-{r}.onnx")
        measure(v, dense, feeds)
    except Exception as e:  # report what Torch-Pruning did, whatever it raised
        v.valid, v.note = "failed", f"{type(e).__name__}: {str(e)[:120]}"
    out.append(v)
    uniform = slim_variant(name, UNIFORM, r, float_path, folder,
                           f"ratio={r}, criterion={criterion}, mode=uniform, multiple={multiple}", dense, feeds)
    out.append(uniform)
    # the MAC cut for the MAC- and latency-driven modes: Torch-Pruning's (else the uniform one's)
    reference = v if v.valid == "yes" else uniform
    if reference.valid != "yes" or not modes:
        return out
    cut = 1 - reference.macs / 100
    # and its parameter cut: a MAC-driven threshold alone keeps weight-heavy late layers
    cut_params = 1 - reference.params / 100
    out.append(slim_variant(name, MACS, r, float_path, folder,
                            f"ratio={r}, mode=macs, target_macs={cut:.4f}, target_params={cut_params:.4f}",
                            dense, feeds))
    lat = slim_variant(name, LATENCY, r, float_path, folder, f"ratio={r}, mode=latency, target_macs={cut:.4f}",
                       dense, feeds)
    out.append(lat)
    out.append(slim_variant(name, LATENCY_IMP, r, float_path, folder,
                            f"ratio={r}, mode=latency, target_macs={cut:.4f}, objective=importance", dense, feeds))
    if lat.valid == "yes":
        lat.fidelity = fidelity_of(lat.path, dense, size)
        eq, how = macs_target_for_fidelity(float_path, lat.fidelity, size)
        eq = np.floor(eq * 1e4) / 1e4  # written with 4 decimals: rounding up would cut deeper than bisected
        v = slim_variant(name, MACS_EQ, r, float_path, folder, f"ratio={r}, mode=macs, target_macs={eq:.4f}",
                         dense, feeds)
        v.note += f" ({how})"
        out.append(v)
        out.append(latency_path_variant(name, r, float_path, folder, lat.fidelity, dense, feeds, size))
        out.append(mac_greedy_variant(name, r, float_path, folder, lat.fidelity, dense, feeds, size))
    if r in SPEED_TARGETS:
        speed = SPEED_TARGETS[r]
        out.append(slim_variant(name, SPEED.format(speed), r, float_path, folder,
                                f"mode=latency, target_speedup={speed}, target_macs={cut:.4f}, "
                                f"target_params={cut_params:.4f}", dense, feeds))
    return out


#: ratio -> the latency mode's explicit speed-up target (the issue's at each ratio)
SPEED_TARGETS = dict(TARGET_SPEEDUP)


def _fidelity_inputs(size: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"input": rng.standard_normal(size).astype(np.float32)} for _ in range(FIDELITY_INPUTS)]


def fidelity_of(path: Path, dense: slimgraph.Model, size: tuple[int, ...]) -> float:
    """Mean cosine similarity of the logits to the dense model's (`fidelity`)."""
    want, got = ort.session(dense), ort.session(slimgraph.load(path))
    cos = []
    for f in _fidelity_inputs(size):
        w = next(iter(ort.run(want, f).values())).ravel().astype(np.float64)
        g = next(iter(ort.run(got, f).values())).ravel().astype(np.float64)
        cos.append(g @ w / (np.linalg.norm(g) * np.linalg.norm(w)))
    return float(np.mean(cos))


def _sensitivity_losses(model, groups, scores) -> dict:
    """The curves prune.structured's latency mode computes by default (same inputs, cached)."""
    from slimgraph.passes.prune import _sensitivity
    from slimgraph.passes.prune.structured import PruneStructured

    cfg = PruneStructured.Config(mode="latency")
    feeds = _sensitivity.calibration_feeds(model, None, SENSITIVITY_SAMPLES, np.random.default_rng(0))
    floors = {g.id: _sensitivity.floor_count(g.size, cfg) for g in groups}
    return _sensitivity.sensitivity(model, groups, scores, floors, cfg.multiple, feeds)


def _removed(groups, scores, counts) -> dict:
    """{group: the channels pruned at `counts`} (the lowest-scoring ones, as the pass cuts)."""
    return {g.id: np.argsort(-scores[g.id], kind="stable")[counts[g.id]:] for g in groups if counts[g.id] < g.size}


def _prepared(float_path: Path, criterion: str = "l1"):
    """(model, analysis, selected groups, scores) as `prune.structured` sees them after
    the recipe's `cleanup,fuse`."""
    from slimgraph.passes.prune import _importance
    from slimgraph.passes.prune.channels import analyze
    from slimgraph.passes.prune.structured import PruneStructured, _prepare

    model = slimgraph.run(slimgraph.load(float_path), "cleanup,fuse").model
    _prepare(model)
    analysis = analyze(model)
    groups = PruneStructured()._selected(model, analysis)
    return model, analysis, groups, _importance.scores(model, analysis, groups, criterion)


def _layer_macs(shape) -> float:
    """MACs (millions) of one layer signature at batch 1."""
    attrs = dict(shape.attrs)
    cin, cout = shape.channels()
    if shape.op != "Conv":
        return float(np.prod(shape.x[:-1])) * cin * cout / 1e6
    kernel = shape.w[2:]
    pads = attrs.get("pads", (0,) * 2 * len(kernel))
    strides, dil = attrs.get("strides", (1,) * len(kernel)), attrs.get("dilations", (1,) * len(kernel))
    out = [(x + pads[i] + pads[i + len(kernel)] - dil[i] * (k - 1) - 1) // strides[i] + 1
           for i, (x, k) in enumerate(zip(shape.x[2:], kernel))]
    return float(np.prod(out)) * cout * (cin // attrs.get("group", 1)) * float(np.prod(kernel)) / 1e6


def mac_greedy_variant(name, r, float_path, folder, fid: float, dense, feeds, size) -> Variant:
    """The latency mode's greedy and objective (measured output error per unit saved) with
    MACs as the cost instead of measured time, its path followed as far as the fidelity
    stays >= `fid`: with `latency_path_variant`, isolates what measuring latency adds."""
    from slimgraph.passes.prune import latency

    class MacTable(latency.LatencyTable):
        def _measure(self, shape):
            return _layer_macs(shape)

        def save(self):
            pass

    return _path_variant(name, MACS_GREEDY, r, float_path, folder, fid, dense, feeds, size,
                         MacTable(folder / "unused-mac-table.json", progress=False), calibrate=False,
                         note="latency mode's greedy and objective, MACs as the cost")


def latency_path_variant(name, r, float_path, folder, fid: float, dense, feeds, size) -> Variant:
    """The latency mode's own greedy path (measured, calibrated time) followed as far as the
    fidelity stays >= `fid`, as the MAC greedy's is: both compared at the same fidelity
    (the latency row itself stops at its time target, wherever its fidelity then is)."""
    from slimgraph.passes.prune import latency

    return _path_variant(name, LATENCY_PATH, r, float_path, folder, fid, dense, feeds, size,
                         latency.LatencyTable(progress=False), calibrate=True,
                         note="latency mode's greedy and objective, measured time as the cost")


def _path_variant(name, tool, r, float_path, folder, fid, dense, feeds, size, table, calibrate, note) -> Variant:
    """The greedy's path to a far target (95% of the time or MACs), followed as far as the
    fidelity (computed on the masked model, equal to the pruned one's) stays >= `fid`."""
    from slimgraph.passes.prune import _sensitivity, latency
    from slimgraph.passes.prune.structured import PruneStructured, importance_kept

    v = Variant(name, tool, r, note=note)
    start = time.perf_counter()
    model, analysis, groups, scores = _prepared(float_path)
    info: dict = {}
    cfg = PruneStructured.Config(mode="latency", target_latency=0.95, calibrate=calibrate)
    latency.choose_keep(model, analysis, {g.id: scores[g.id] for g in groups}, cfg, table=table, info=info,
                        losses=_sensitivity_losses(model, groups, scores))
    runner = _sensitivity.MaskedRunner(model, groups, _fidelity_inputs(size))

    def prefix(n: int) -> dict[int, int]:
        counts = {g.id: g.size for g in groups}
        counts.update(dict(info["steps"][:n]))
        return counts

    counts = prefix(_longest(len(info["steps"]), lambda n: runner.cosine(_removed(groups, scores, prefix(n))) >= fid))
    keep = {g.id: np.sort(np.argsort(-scores[g.id], kind="stable")[:counts[g.id]])
            for g in groups if counts[g.id] < g.size}
    analysis.apply(model, keep)
    v.path = folder / f"{tool.replace(' ', '_').replace('@', 'at').replace(chr(39), '')}-{r}.onnx"
    slimgraph.save(slimgraph.run(model, "cleanup").model, v.path)
    v.seconds = time.perf_counter() - start
    v.importance = importance_kept(groups, scores, counts)
    measure(v, dense, feeds)
    return v


def _longest(n: int, ok: Callable[[int], bool], grid: int = 32) -> int:
    """The largest k in [0, n] with ok(k), fidelity along a greedy path not being monotone:
    the last of `grid` evenly spaced points that is ok, then every step up to the next point."""
    points = sorted({int(round(x)) for x in np.linspace(0, n, min(n, grid) + 1)})
    good = [k for k in points if k == 0 or ok(k)]
    best = good[-1]
    following = [k for k in points if k > best]
    for k in range(best + 1, following[0] if following else n + 1):
        if ok(k):
            best = k
    return best


def macs_target_for_fidelity(float_path: Path, fid: float, size) -> tuple[float, str]:
    """The `target_macs` at which `mode=macs` keeps fidelity `fid`: bisection on the pass's
    own channel counts, the fidelity computed on the masked model (no pruning)."""
    from slimgraph.passes.prune import _sensitivity
    from slimgraph.passes.prune.structured import PruneStructured

    model, analysis, groups, scores = _prepared(float_path)
    macs = dict(model.analysis("macs"))
    runner = _sensitivity.MaskedRunner(model, groups, _fidelity_inputs(size))
    p = PruneStructured(mode="macs")

    def cos(target: float) -> float:
        p.config = PruneStructured.Config(mode="macs", target_macs=target)
        return runner.cosine(_removed(groups, scores, p._counts(model, analysis, groups, scores, macs)))

    grid = np.linspace(0.0, 0.95, 20)  # fidelity falls as the target rises, not strictly
    good = [t for t in grid if t == 0 or cos(t) >= fid]
    lo = good[-1]
    if lo == grid[-1]:
        return lo, "fidelity never falls to the latency mode's: the deepest cut tried"
    hi = lo + grid[1]
    for _ in range(10):  # bisected between the last grid point that keeps it and the next
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cos(mid) >= fid else (lo, mid)
    return lo, "the deepest cut whose fidelity is >= the latency mode's"


def slim_variant(name, tool, r, float_path, folder, options, dense, feeds, pipeline=RECIPE) -> Variant:
    v = Variant(name, tool, r, note=options if pipeline == RECIPE else f"{options}; {pipeline.format('...')}")
    path = folder / f"{tool.replace(' ', '_').replace('@', 'at').replace(chr(39), '')}-{r}.onnx"
    try:
        _, stats, v.seconds = slim(float_path, path, options, pipeline)
        v.path = path
        v.importance = stats.get("importance_kept")
        if "predicted_speedup" in stats.get("latency", {}):
            v.note += f"; predicted {stats['latency']['predicted_speedup']:.2f}x"
        measure(v, dense, feeds)
    except SlimgraphError as e:
        v.valid, v.note = "failed", f"{type(e).__name__}: {str(e)[:160]}"
    return v


def _outputs(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


# --- digits: accuracy after pruning ---------------------------------------------------------------
def digits(runs: int) -> list[Variant]:
    """Train the digits CNN (zoo's architecture, seed and recipe), export it; both tools
    prune the same weights; test top-1 without fine-tuning."""
    import torch

    data = zoo.digits_data()
    module = train_digits(torch, data)
    folder = WORK / "digits"
    size = (1, 1, 8, 8)
    float_path = export(module, folder / f"float-torch{torch.__version__}.onnx", size, ["logits"], dynamic_batch=True)
    dense_path = optimized(float_path, folder / "dense.onnx")
    dense = slimgraph.load(dense_path)
    feeds = {"input": data.x_test[:1]}
    variants = []
    for r in RATIOS:
        variants += prune_all("digits CNN", module, float_path, dense, feeds, r, size, [module.head], folder, True,
                              criterion="consumer_l2", multiple=1, modes=False)
        for criterion, multiple in DIGITS_SWEEP:  # every criterion at Torch-Pruning's channel counts
            variants.append(slim_variant("digits CNN", f"{UNIFORM} ({criterion}, multiple {multiple})", r, float_path,
                                         folder, f"ratio={r}, criterion={criterion}, mode=uniform, multiple={multiple}",
                                         dense, feeds))
    for v in variants:
        if v.valid == "yes":
            v.top1 = top1(v.path, data)
    bench(variants, dense_path, feeds, runs)
    variants[0].top1 = top1(dense_path, data)
    return variants


def train_digits(torch, data):
    """`zoo.digits_cnn`'s training (same seed, schedule and epochs, one thread), keeping the
    torch module; the export of the result is cached by the caller's path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return zoo.fit_digits(torch, data)
    finally:
        torch.set_num_threads(threads)


def top1(path: Path, data) -> float:
    logits = ort.run(ort.session(slimgraph.load(path)), {"input": data.x_test})
    return float((next(iter(logits.values())).argmax(1) == data.y_test).mean())


# --- ONNX models with residuals, Concat/Split, SiLU, Resize: slimgraph mode macs -----------------------
def detector(runs: int) -> list[Variant]:
    import torch
    from torch_models import yolo_like

    size = (1, 3, 320, 320)
    folder = WORK / "yolo_like"
    module = seeded(yolo_like)
    outputs = ["p3", "p4", "p5"]
    float_path = export(module, folder / f"float-torch{torch.__version__}.onnx", size, outputs)
    dense_path = optimized(float_path, folder / "dense.onnx")
    dense = slimgraph.load(dense_path)
    feeds = {"input": np.random.default_rng(0).standard_normal(size).astype(np.float32)}
    heads = [seq[-1] for branch in (module.box, module.cls) for seq in branch]
    variants = []
    for r in RATIOS:
        v = Variant("yolo_like", TP, r)
        try:
            pruned, v.seconds = torch_pruned(module, r, size, heads)
            v.path = optimized(export(pruned, folder / f"tp-{r}.raw.onnx", size, outputs), folder / f"tp-{r}.onnx")
            measure(v, dense, feeds)
        except Exception as e:  # report what Torch-Pruning did, whatever it raised
            v.valid, v.note = "failed", f"{type(e).__name__}: {str(e)[:120]}"
        variants.append(v)
        variants += with_fallback("yolo_like", r, float_path, folder, dense, feeds)
    bench(variants, dense_path, feeds, runs)
    return variants


def with_fallback(name, r, src, folder, dense, feeds) -> list[Variant]:
    """slimgraph mode=macs at target r in the recipe's order; when that fails, also with
    activations fused after pruning."""
    first = slim_variant(name, MACS, r, src, folder, f"mode=macs, target_macs={r}", dense, feeds)
    if first.valid == "yes":
        return [first]
    return [first, slim_variant(name, f"{MACS} (fuse after)", r, src, folder, f"mode=macs, target_macs={r}",
                                dense, feeds, FUSE_AFTER)]


def magika(runs: int) -> list[Variant]:
    folder = WORK / "magika"
    folder.mkdir(parents=True, exist_ok=True)
    dense_path = optimized(zoo.magika_model_path(), folder / "dense.onnx")
    dense = slimgraph.load(dense_path)
    rows = zoo.magika_inputs(256)[zoo.MAGIKA_INPUT]
    feeds = {zoo.MAGIKA_INPUT: rows[:1]}
    variants = [slim_variant("magika", f"{MACS} ({c})", r, dense_path, folder,
                             f"mode=macs, target_macs={r}, criterion={c}", dense, feeds)
                for r in RATIOS for c in ("l1", "consumer_l2")]
    for v in variants:  # agreement with the dense model's top-1 on real files
        if v.valid == "yes":
            a = ort.run_batched(dense, {zoo.MAGIKA_INPUT: rows})
            b = ort.run_batched(slimgraph.load(v.path), {zoo.MAGIKA_INPUT: rows})
            v.top1 = float((next(iter(a.values())).argmax(-1) == next(iter(b.values())).argmax(-1)).mean())
    variants.append(Variant("magika", TP, None, valid="n/a", note="ONNX only: no torch module to prune"))
    bench(variants, dense_path, feeds, runs)
    return variants


# --- report ----------------------------------------------------------------------------------------
def table(variants: list[Variant], accuracy: str | None = None, proxies: bool = False) -> str:
    headers = ["model", "tool", "ratio", "MACs %", "params %", "file MB", "speed-up", "valid"]
    headers += [accuracy] if accuracy else []
    headers += ["importance kept", "fidelity"] if proxies else []
    headers += ["note"]
    rows = []
    for v in variants:
        row = [v.model, v.tool, "" if v.ratio is None else v.ratio, _num(v.macs, "{:.1f}"), _num(v.params, "{:.1f}"),
               _num(v.file_mb, "{:.2f}"), _num(v.speedup, "{:.2f}x"), v.valid]
        if accuracy:
            row.append("" if v.top1 is None else f"{v.top1:.2%}")
        if proxies:
            row += ["" if v.importance is None else f"{v.importance:.3f}",
                    "" if v.fidelity is None else f"{v.fidelity:.3f}"]
        rows.append(row + [v.note.replace("|", "/")])
    return common.markdown_table(headers, rows)


def _num(x: float, fmt: str) -> str:
    return "" if x != x else fmt.format(x)


def targets(cnns: list[Variant]) -> list[tuple[str, bool, str]]:
    """The issue's targets, per model and ratio: (what, met, measured)."""
    out = []
    for model in dict.fromkeys(v.model for v in cnns):
        for r in RATIOS:
            rows = {v.tool: v for v in cnns if v.model == model and v.ratio == r}
            tp = rows.get(TP)
            if tp is None or tp.valid != "yes":
                continue
            for tool in (UNIFORM, MACS):  # at the same ratio; at Torch-Pruning's MAC cut
                v = rows.get(tool)
                if v is None:
                    continue
                ok = v.valid == "yes" and v.macs <= tp.macs + 0.05 and v.params <= tp.params + 0.05
                out.append((f"{model} {r}: {tool} MACs and params <= Torch-Pruning's ({tp.macs:.1f}% / "
                            f"{tp.params:.1f}%)", ok, f"{v.macs:.1f}% / {v.params:.1f}%"))
                out.append((f"{model} {r}: {tool} speed-up >= {TARGET_SPEEDUP[r]}x", v.speedup >= TARGET_SPEEDUP[r],
                            f"{v.speedup:.2f}x (Torch-Pruning {tp.speedup:.2f}x)"))
            for ours, tool in ((LATENCY, MACS_EQ), (LATENCY_PATH, MACS_GREEDY)):
                a, b = rows.get(ours), rows.get(tool)
                if a is None or b is None or a.valid != "yes" or b.valid != "yes":
                    continue
                # equal accuracy: each the deepest cut (bisected) whose fidelity is at least the latency
                # row's; fidelity moves in steps, so the other row may keep somewhat more
                ref = rows[LATENCY].fidelity
                what = (f"{ours.replace('slimgraph ', '').replace(' @', ' at')} faster than "
                        f"{tool.replace('slimgraph ', '').replace(' @', ' at')}")
                ok = a.speedup > b.speedup and min(a.fidelity, b.fidelity) >= ref - 0.005
                out.append((f"{model} {r}: {what}", ok,
                            f"{a.speedup:.2f}x vs {b.speedup:.2f}x; fidelity {a.fidelity:.3f} vs {b.fidelity:.3f}; "
                            f"MACs {a.macs:.1f}% vs {b.macs:.1f}%"))
            sp = rows.get(SPEED.format(SPEED_TARGETS.get(r)))
            if sp is not None:
                ok = sp.valid == "yes" and sp.macs <= tp.macs + 0.05 and sp.params <= tp.params + 0.05
                out.append((f"{model} {r}: {sp.tool} MACs and params <= Torch-Pruning's ({tp.macs:.1f}% / "
                            f"{tp.params:.1f}%)", ok, f"{sp.macs:.1f}% / {sp.params:.1f}%"))
                more = "more" if sp.macs < tp.macs - 0.5 else "about as many"
                out.append((f"{model} {r}: {sp.tool} speed-up >= {TARGET_SPEEDUP[r]}x", sp.speedup >= TARGET_SPEEDUP[r],
                            f"{sp.speedup:.2f}x (Torch-Pruning {tp.speedup:.2f}x), cutting {more} MACs than "
                            f"Torch-Pruning ({sp.macs:.1f}% vs {tp.macs:.1f}% kept), fidelity {sp.fidelity:.3f} vs "
                            f"{tp.fidelity:.3f}"))
    return out


def _ceiling_note(name: str, ceil_rows: list[list]) -> str:
    """For a speed-target check: what the kernel-time ceiling allows at Torch-Pruning's own MACs."""
    for model, r, macs, _, best, target, reachable, _ in ceil_rows:
        if name.startswith(f"{model} {r}: ") and "speed-up >=" in name:
            verdict = "reachable there" if reachable == "yes" else f"so {target} cannot be reached at its MACs"
            return f"; at Torch-Pruning's own MACs ({macs}%) the kernel-time ceiling is {best}, {verdict}"
    return ""


def objective_rows(cnns: list[Variant]) -> list[list[str]]:
    """The latency mode's two objectives at the same time target (not an issue target)."""
    out = []
    for model in dict.fromkeys(v.model for v in cnns):
        for r in RATIOS:
            rows = {v.tool: v for v in cnns if v.model == model and v.ratio == r}
            a, b = rows.get(LATENCY), rows.get(LATENCY_IMP)
            if a is not None and b is not None and a.valid == b.valid == "yes":
                out.append([model, r, f"{a.fidelity:.3f}", f"{b.fidelity:.3f}", f"{a.speedup:.2f}x",
                            f"{b.speedup:.2f}x", f"{a.macs:.1f} / {a.params:.1f}", f"{b.macs:.1f} / {b.params:.1f}"])
    return out


def digits_targets(rows: list[Variant]) -> list[tuple[str, bool, str]]:
    """slimgraph's default-recipe uniform row (consumer_l2, multiple 1) vs Torch-Pruning: test
    top-1 at least as high at no more MACs."""
    out = []
    for r in RATIOS:
        by = {v.tool: v for v in rows if v.ratio == r}
        tp, sg = by.get(TP), by.get(UNIFORM)
        if tp and sg and tp.top1 is not None and sg.top1 is not None:
            out.append((f"digits CNN {r}: slimgraph top-1 >= Torch-Pruning's at <= its MACs (no fine-tuning)",
                        sg.top1 >= tp.top1 and sg.macs <= tp.macs + 0.05,
                        f"{sg.top1:.2%} at {sg.macs:.1f}% MACs vs {tp.top1:.2%} at {tp.macs:.1f}%"))
    return out


def magika_targets(rows: list[Variant]) -> list[tuple[str, bool, str]]:
    out = []
    for v in rows:
        if v.model == "magika" and v.ratio is not None and v.tool.startswith(MACS):
            ok = v.valid == "yes" and v.macs <= 100 * (1 - v.ratio) + 0.5
            out.append((f"magika {v.tool} {v.ratio}: valid, ORT runs it, MACs down by {v.ratio:.0%}", ok,
                        f"{v.valid}, {_num(v.macs, '{:.1f}')}% MACs, {_num(v.speedup, '{:.2f}x')}, top-1 agreement "
                        f"{'' if v.top1 is None else f'{v.top1:.1%}'}"))
    return out


def plot(cnns: list[Variant], path: Path) -> None:
    """Per model: MACs vs speed-up (every tool), and the accuracy proxy (fidelity) vs
    speed-up, each tool's points joined into its curve."""
    models = list(dict.fromkeys(v.model for v in cnns))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 9), squeeze=False)
    markers = {TP: "s", UNIFORM: "o", MACS: "^", LATENCY: "*", MACS_EQ: "v", MACS_GREEDY: "D", LATENCY_IMP: "x",
               LATENCY_PATH: "p",
               **{SPEED.format(t): "P" for t in SPEED_TARGETS.values()}}
    for col, model in enumerate(models):
        ax, ax2 = axes[0][col], axes[1][col]
        for tool, marker in markers.items():
            pts = [(v.macs, v.speedup, v.ratio, v.fidelity) for v in cnns
                   if v.model == model and v.tool == tool and v.valid == "yes"]
            if not pts:
                continue
            color = f"C{list(markers).index(tool)}"  # one colour per tool in both rows
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=70, label=tool, color=color)
            for x, y, r, _ in pts:
                ax.annotate(f"{r}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            curve = sorted((p[3], p[1]) for p in pts if p[3] is not None)
            if curve:
                ax2.plot([c[0] for c in curve], [c[1] for c in curve], marker=marker, ms=8, label=tool, color=color)
        xs = np.linspace(15, 100, 50)
        ax.plot(xs, 100 / xs, "k:", lw=1, label="speed-up = 1 / MAC fraction")
        ax.set(title=f"{model} (ORT CPU, 2 threads, batch 1)", xlabel="MACs (% of dense)", ylabel="speed-up vs dense")
        ax2.set(title=f"{model}: accuracy proxy vs speed", xlabel="fidelity (mean logit cosine to dense)",
                ylabel="speed-up vs dense")
        for a in (ax, ax2):
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- ceiling analysis -----------------------------------------------------------------------------
KINDS = ("stem", "pointwise 1x1", "dense kxk", "depthwise", "Gemm", "other")
#: how a kind's time (and MACs) scale when every channel count is multiplied by k: a conv
#: whose input and output channels both shrink goes with k^2; the stem (3 input channels),
#: depthwise convs, the classifier (1000 outputs) and elementwise/pool ops with k
EXPONENT = {"stem": 1, "pointwise 1x1": 2, "dense kxk": 2, "depthwise": 1, "Gemm": 1, "other": 1}


#: percentage points of MACs below Torch-Pruning's that still count as "at its MACs"
NEAR = 1.5


def _kind(op_type: str, attrs: dict, first: bool) -> str:
    if op_type in ("Conv", "FusedConv"):
        if first:
            return "stem"
        if attrs.get("group", 1) > 1:
            return "depthwise"
        return "pointwise 1x1" if list(attrs.get("kernel_shape", [1, 1])) == [1, 1] else "dense kxk"
    return "Gemm" if op_type in ("Gemm", "FusedGemm", "MatMul") else "other"


def kernel_profiles(paths: dict[str, Path], feeds, runs: int = 20, rounds: int = 3) -> dict[str, dict[str, float]]:
    """ms per kernel kind for each model: ORT's profiler (median kernel time over `runs`
    runs, summed per kind), the models profiled in turn `rounds` times, the fastest round
    kept per kind (other processes only add time)."""
    import onnx

    out = {name: dict.fromkeys(KINDS, float("inf")) for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            report = ort.runtime_report(path, feeds=feeds, profile_runs=runs, threads=2)
            protos = {p.name: p for p in report.optimized_model.graph.node}
            times = dict.fromkeys(KINDS, 0.0)
            first = True
            for n in report.nodes:
                p = protos.get(n.name)
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in p.attribute} if p is not None else {}
                kind = _kind(n.op_type, attrs, first and n.op_type in ("Conv", "FusedConv"))
                first = first and kind != "stem"
                times[kind] += (n.time_us or 0.0) / 1e3
            out[name] = {k: min(out[name][k], times[k]) for k in KINDS}
    return out


def mac_shares(path: Path) -> dict[str, float]:
    """Fraction of the model's MACs per kernel kind."""
    model = slimgraph.load(path)
    macs = dict(model.analysis("macs"))
    out = dict.fromkeys(KINDS, 0.0)
    first = True
    for n in model.graph:
        if n.name not in macs:
            continue
        attrs = {k: a.value for k, a in n.attributes.items()}
        kind = _kind(n.op_type, attrs, first and n.op_type == "Conv")
        first = first and kind != "stem"
        out[kind] += macs[n.name]
    total = sum(out.values()) or 1.0
    return {k: v / total for k, v in out.items()}


def isolation_gap(model_name: str, dense_path: Path, rounds: int = 3) -> list[list[str]]:
    """Per layer shape of the dense model: the latency table's time (the layer alone, as the
    latency mode predicts it) vs ORT's profiled kernel time inside the whole model (the
    fastest of `rounds` profiles, 20 runs each)."""
    from slimgraph.passes.cleanup.infer_shapes import InferShapes
    from slimgraph.passes.prune import latency

    model = slimgraph.load(dense_path)
    InferShapes()(model)
    iso: dict[tuple, list[float]] = {}
    with latency.LatencyTable(progress=False) as t:
        for node in model.graph:
            shape = latency.layer_shape(node)
            if shape is not None:
                iso.setdefault((shape.x, shape.w), []).append(t.latency(shape))
    inside = {key: float("inf") for key in iso}
    for _ in range(rounds):
        report = ort.runtime_report(dense_path, profile_runs=20, threads=2)
        sums: dict[tuple, float] = {}
        for n in report.nodes:
            if len(n.input_shapes) > 1 and n.input_shapes[0] and n.input_shapes[1]:
                key = (tuple(n.input_shapes[0]), tuple(n.input_shapes[1]))
                if key in iso:
                    sums[key] = sums.get(key, 0.0) + (n.time_us or 0.0) / 1e3
        inside = {k: min(inside[k], sums.get(k, float("inf"))) for k in iso}
    rows = []
    for (x, w), times in iso.items():
        ms_in = inside[(x, w)]
        rows.append([model_name, "x".join(map(str, x)), "x".join(map(str, w)), len(times), f"{sum(times):.2f}",
                     _num(ms_in if ms_in != float("inf") else float("nan"), "{:.2f}"),
                     _num(ms_in / sum(times) if ms_in != float("inf") else float("nan"), "{:.2f}"),
                     f"{sum(float(np.prod(w)) for _ in times) * 4 / 2**20:.1f}"])
    return rows


def ceiling(cnns: list[Variant]) -> tuple[str, list[tuple[str, bool, str]]]:
    """Per model and ratio: where the time goes (dense, Torch-Pruning, the fastest slimgraph
    variant at <= Torch-Pruning's MACs) and the best kernel-time speed-up a uniform width
    multiplier k could give at Torch-Pruning's MAC fraction if every kernel kept its dense
    efficiency (time of kind c scales as k^EXPONENT[c]). Returns (markdown, notes)."""
    rows, ceil_rows = [], []
    for model in dict.fromkeys(v.model for v in cnns):
        dense = next(v for v in cnns if v.model == model and v.tool == CONTROL)
        feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
        shares = mac_shares(dense.path)
        picked: list[tuple[float, Variant | None, Variant]] = []
        for r in RATIOS:
            at = [v for v in cnns if v.model == model and v.ratio == r and v.valid == "yes"]
            tp = next((v for v in at if v.tool == TP), None)
            if tp is not None:
                # at about Torch-Pruning's MACs: the ceiling below is for its MAC fraction
                ours = max((v for v in at if v.tool != TP and tp.macs - NEAR <= v.macs <= tp.macs + 0.05),
                           key=lambda v: v.speedup, default=None)
                picked.append((r, ours, tp))
        paths = {"dense": dense.path}
        for r, ours, tp in picked:
            paths.update({f"{v.tool} {r}": v.path for v in (tp, ours) if v is not None})
        prof = kernel_profiles(paths, feeds)
        base = prof["dense"]
        rows.append([model, "", "dense", "100.0", *(f"{base[k]:.2f}" for k in KINDS), f"{sum(base.values()):.2f}",
                     "1.00x", f"{dense.speedup:.2f}x"])
        for r, ours, tp in picked:
            for v in (tp, ours):
                if v is None:
                    continue
                t = prof[f"{v.tool} {r}"]
                rows.append([model, r, v.tool, f"{v.macs:.1f}", *(f"{t[k]:.2f}" for k in KINDS),
                             f"{sum(t.values()):.2f}", f"{sum(base.values()) / sum(t.values()):.2f}x",
                             f"{v.speedup:.2f}x"])
            m = tp.macs / 100
            lo, hi = 0.0, 1.0
            for _ in range(50):  # the k whose MAC fraction is m
                k = (lo + hi) / 2
                lo, hi = (k, hi) if sum(shares[c] * k ** EXPONENT[c] for c in KINDS) < m else (lo, k)
            k = (lo + hi) / 2
            best = sum(base.values()) / sum(base[c] * k ** EXPONENT[c] for c in KINDS)
            measured = ours.speedup if ours is not None else float("nan")
            ceil_rows.append([model, r, f"{tp.macs:.1f}", f"{k:.3f}", f"{best:.2f}x", f"{TARGET_SPEEDUP[r]}x",
                              "yes" if best >= TARGET_SPEEDUP[r] else "**no**", _num(measured, "{:.2f}x")])
    gap_rows = []
    for model in dict.fromkeys(v.model for v in cnns):
        gap_rows += isolation_gap(model, next(v for v in cnns if v.model == model and v.tool == CONTROL).path)
    text = [
        "Predicted vs actual: each weight layer shape of the dense models, its latency-table time (the layer "
        "alone: what the latency mode's table predicts) against ORT's profiled kernel time for the same shape "
        "inside the whole model (fastest of 3 profiles). A ratio that varies with the shape is what the "
        "end-to-end calibration (`a * table ms + b * weight MB`) has to absorb: alone, a layer finds its "
        "weights hot in cache; in the model they stream in after everyone else's.",
        "",
        common.markdown_table(["model", "input", "weight", "layers", "table ms (alone)", "in-model ms", "ratio",
                               "weight MB"], gap_rows),
        "",
        "Kernel time per kind, ms (ORT profiler, 2 threads, median of 20 runs per kernel, summed per kind; the "
        "models profiled in turn 3 times, the fastest kept per kind; the variant is the fastest slimgraph row at "
        f"Torch-Pruning's MACs (at most {NEAR} points below them). The profile runs after the timing, so its kernel speed-ups and the measured "
        "ones need not agree exactly):",
        "",
        common.markdown_table(["model", "ratio", "variant", "MACs %", *KINDS, "kernels ms", "kernel speed-up",
                               "measured speed-up"], rows),
        "",
        "Ceiling at Torch-Pruning's MAC fraction: a uniform width multiplier k (channels x k everywhere) that "
        "gives those MACs, every kernel kind's dense time scaled by k^e (e = 2 for pointwise and dense convs, "
        "1 for the stem, depthwise convs, the classifier and other ops), i.e. the speed-up if ORT ran the "
        "pruned kernels as efficiently as the dense ones; per-run overhead outside kernels is left out, so "
        "the real ceiling is lower still:",
        "",
        common.markdown_table(["model", "ratio", "MACs %", "k", "kernel-time ceiling", "target", "target reachable",
                               "best measured"], ceil_rows),
    ]
    return "\n".join(text), ceil_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="timed runs per variant (interleaved)")
    parser.add_argument("--no-torch", action="store_true", help="skip (this benchmark needs torch)")
    parser.add_argument("--only", nargs="*", default=["resnet18", "mobilenet_v2", "digits", "yolo_like", "magika"])
    parser.add_argument("--table", help="latency table to use and extend (default: a fresh one, measured in this run)")
    args = parser.parse_args()
    if args.no_torch:
        print("prune.py needs torch and torch-pruning; skipped (--no-torch)")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch
    import torch_pruning
    from torch_models import mobilenet_v2, resnet18

    from slimgraph.passes.prune import latency

    start = time.perf_counter()
    # a fresh table measured in this run: entries cached over hours of other work were timed
    # under other loads and do not compare (the latency mode chooses between them)
    table_path = Path(args.table) if args.table else WORK / "latency-table.json"
    if not args.table and table_path.exists():
        table_path.unlink()
    table_path.parent.mkdir(parents=True, exist_ok=True)
    os.environ[latency.TABLE_ENV] = str(table_path)
    entries_before = len(latency.LatencyTable(table_path, progress=False).entries)
    cnns, digit_rows, others = [], [], []
    if "resnet18" in args.only:
        cnns += cnn("ResNet-18", resnet18, args.runs)
    if "mobilenet_v2" in args.only:
        cnns += cnn("MobileNetV2", mobilenet_v2, args.runs)
    if "digits" in args.only:
        digit_rows = digits(args.runs * 4)
    if "yolo_like" in args.only:
        others += detector(args.runs)
    if "magika" in args.only:
        others += magika(args.runs * 4)
    entries_after = len(latency.LatencyTable(table_path, progress=False).entries)
    checks = targets(cnns) + digits_targets(digit_rows) + magika_targets(others)
    ceiling_text = ""
    if cnns:
        plot(cnns, common.RESULTS / "prune.png")
        ceiling_text, ceil_rows = ceiling(cnns)
        checks = [(n, ok, m + _ceiling_note(n, ceil_rows)) for n, ok, m in checks]
    text = [
        "# Structured pruning: slimgraph vs Torch-Pruning",
        "",
        f"Machine: {common.machine()}; torch {torch.__version__}, torch-pruning {torch_pruning.__version__}. "
        f"One run of `benchmarks/prune.py` ({time.perf_counter() - start:.0f} s). Latency table: "
        f"`{table_path.name}`, {entries_after} layer shapes ({entries_after - entries_before} measured in this run).",
        "",
        "How: see the docstring of benchmarks/prune.py. MACs and params are % of the dense model (BatchNorm "
        "folded for every tool); speed-up is ORT CPU, 2 threads, batch 1, interleaved with a dense-vs-dense "
        "control row (its speed-up is the noise floor).",
        "",
        "## ResNet-18 and MobileNetV2 (random weights, BatchNorm statistics set on random inputs, 224x224)",
        "",
        "The weights are random, so there is no accuracy to measure; the proxy is *fidelity*: the mean cosine "
        "similarity of the logits to the dense model's on 8 random inputs (seed 1). The models' BatchNorm "
        "statistics are now measured on random inputs (`seeded(calibrate=...)`, gamma in [0.5, 1.5], beta in "
        "[-0.2, 0.2]), as a trained network's match its activations: with the random statistics of earlier "
        "runs the input signal faded layer by layer and the BatchNorm offsets took over, so MobileNetV2's "
        "logits varied by 1e-7 of their norm across inputs (ResNet-18's by 0.6%) and fidelity measured the "
        "bias path, not what the network computes. Now they vary by 23% (MobileNetV2) and 16% (ResNet-18). "
        "Speed-ups and MAC counts do not depend on the weights; fidelity numbers are not comparable with "
        "those of earlier runs.",
        "",
        "The latency mode's accuracy side: it used to trade the log share of each group's L1 importance, which "
        "undervalues the late, weight-heavy layers of MobileNetV2 (it cut them and kept 0.36 fidelity at the "
        "0.5 target: the 'importance objective' rows). Now (`objective: sensitivity`, the default) each "
        "channel group is cut alone to 75/50/25% and to its floor (its lowest-L1 channels, as the pass cuts "
        "them) and the model is run on 4 random inputs (seed 0, not the fidelity inputs): the relative squared "
        "output error is the cost of that cut, interpolated between the measured counts, summed over groups "
        "(AMC / NetAdapt / NNCF-style sensitivity analysis; `slimgraph/passes/prune/_sensitivity.py`). A cut "
        "is simulated by zeroing the weights that read the channels, fed to one ORT session, which gives "
        "exactly the pruned model's outputs here (tested on the digits CNN). The greedy then cuts where "
        "predicted time saved per unit of output error is highest.",
        "",
        "Equal accuracy, compared: the latency row runs at Torch-Pruning's MAC cut as its latency target; "
        "'macs @ latency's fidelity' is plain MAC-driven pruning (`mode=macs`) with `target_macs` bisected "
        "until its fidelity equals the latency row's (the deepest cut keeping at least that fidelity; "
        "fidelity computed on the masked model, then measured on the pruned file). The two greedy rows "
        "isolate what measuring time adds: the same sensitivity objective with measured, calibrated time "
        "('latency greedy') or MACs ('MAC greedy') as the cost, each greedy's path followed as far as its "
        "fidelity stays at the latency row's. The 'target 1.8x' / 'target 3.6x' rows: `target_speedup` "
        "at the issue's target for the ratio (predicted time <= dense / target) with Torch-Pruning's MAC and parameter cuts as budgets (`target_macs`, "
        "`target_params`). Timing noise of this run: see each model's control row.",
        "",
        table(cnns, proxies=True),
        "",
        "![MACs vs latency](prune.png)",
        "",
        "## Where the time goes, and the ceiling at Torch-Pruning's MACs",
        "",
        ceiling_text,
        "",
        "## Digits CNN: test top-1 after pruning, no fine-tuning",
        "",
        "slimgraph uniform: `criterion=consumer_l2` (the norm of the weights that read each channel; after "
        "BatchNorm folding a filter's own norm mostly reflects gamma/sigma, not what the channel carries) at "
        "`multiple=1` (16-32 channel layers at 8x8 gain nothing from rounding; at multiple 8 the 16-channel "
        "conv would keep 8 of 16 at ratio 0.3). The other criteria are rows of their own at the same counts.",
        "",
        table(digit_rows, "top-1"),
        "",
        "## Detector (yolo_like, 320x320) and magika: structured pruning on ONNX graphs",
        "",
        "magika's accuracy column: agreement with the dense model's top-1 on 256 real files. Its Conv_0 "
        "(512 channels, ~90% of the MACs) feeds GlobalMaxPool and a LayerNorm built from ReduceSum * 1/512, "
        "Sub, Mul by gamma [1, 512] and Add beta: a reduction over the channel axis is now a per-sample "
        "statistic (the model stays valid; the statistics change as any pruned layer's output does), "
        "gamma and beta are sliced with the channels and 1/512 becomes 1/kept. Dense_0's 64 channels stay "
        "whole (its Reshape to [N, 512, 256] interleaves 4 positions with the 64 channels), as do the logits.",
        "",
        table(others, "top-1 agree"),
        "",
        "## The latency mode's objective: measured sensitivity vs importance share (same time target)",
        "",
        common.markdown_table(["model", "ratio", "fidelity, sensitivity", "fidelity, importance",
                               "speed-up, sensitivity", "speed-up, importance", "MACs / params %, sensitivity",
                               "MACs / params %, importance"], objective_rows(cnns)),
        "",
        "## Targets",
        "",
        common.markdown_table(["target", "met", "measured"], [(n, "yes" if ok else "**no**", m) for n, ok, m in checks]),
    ]
    common.write_result("prune", "\n".join(text))
    missed = [n for n, ok, _ in checks if not ok]
    if missed:
        print(f"missed: {'; '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
