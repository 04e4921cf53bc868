"""int8 quantization side by side: float, onnxruntime's quantizer, NNCF and slimgraph's
recipes, in one run, on one machine, with the same inputs.

Models, and what "accuracy" means for each:
- ResNet-18 and MobileNetV2 shapes (random weights, 224x224, exported by torch with
  BatchNormalization folded): accuracy is meaningless on random weights, so the column is
  the mean cosine of the logits against the float model on held-out random images.
- the digits CNN (`zoo.digits_cnn`, trained here): top-1 on its test split (360 images);
  the target is a drop of at most 0.5 points.
- magika on real files of this machine (`zoo.magika_inputs(2000)`): agreement with the
  float model's top-1, at batch 1 and at batch 64 (dynamic quantization's ranges depend on
  the batch).

Every tool starts from the same float model: for the CNNs, the exported graph after
slimgraph's exact `optimize` recipe (cleanup + fusion: BatchNormalization folded, outputs
within 1e-5), for magika its original file. Calibration data (the same arrays for every
tool): 32 random images for ResNet/MobileNet, 256 training images for digits, 256 files for
magika drawn with another seed than the evaluation files.

Rows: float; a self-vs-self control (its speed-up is the noise floor); ORT
`quantize_static` QOperator U8S8 per-channel and its default (QDQ, S8S8, per-tensor);
ORT `quantize_dynamic`; NNCF's ONNX post-training quantization when it is installed;
slimgraph's `int8`, `int8-qdq` and `int8-dynamic` recipes (`slimgraph.run(model,
recipe, data=calib)`), "not available yet" while a recipe is missing.

Latency: ORT CPU, `--threads` threads (2), batch 1 (and 64 for magika), spinning off, all
variants of a model interleaved round-robin in one `ort.bench` call, medians of `--runs`
runs; speed-up = 1 / the median over rounds of time / float's time in the same round
(`BenchStats.ratio_to`). Integer MAC share, Q/DQ counts and float islands come from
`slimgraph.backends.runtime_check` (ORT's optimized graph and a profiling run).

Exit status 1 when a target is missed or a slimgraph recipe is missing; the tables go to
benchmarks/results/quantize.md and the plot to quantize.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
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
from slimgraph.backends import ort, runtime_check  # noqa: E402
from slimgraph.errors import SlimgraphError  # noqa: E402
from slimgraph.passes.pipeline import recipe_names  # noqa: E402

WORK = common.CACHE / "quantize"
BENCH_SECONDS = 15.0
SESSION_SETS = 3
FLOAT, CONTROL = "float", "float (control)"
ORT_QOP, ORT_QDQ, ORT_DYN = "ORT static QOperator U8S8 per-channel", "ORT static default (QDQ S8S8)", "ORT dynamic"
NNCF = "NNCF PTQ"
SLIM = {"int8": "slimgraph int8", "int8-qdq": "slimgraph int8-qdq", "int8-dynamic": "slimgraph int8-dynamic"}
STATIC_TOOLS = [ORT_QOP, ORT_QDQ, NNCF, SLIM["int8"], SLIM["int8-qdq"]]
DYNAMIC_TOOLS = [ORT_DYN, SLIM["int8-dynamic"]]


# --- the tools ------------------------------------------------------------------------------------
def _reader(calib: dict[str, np.ndarray]):
    """onnxruntime.quantization's CalibrationDataReader over [N, ...] arrays, one sample a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = len(next(iter(calib.values())))
            self.items = [{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)]
            self.at = 0

        def get_next(self):
            self.at += 1
            return self.items[self.at - 1] if self.at <= len(self.items) else None

        def rewind(self):
            self.at = 0

    return Reader()


def ort_qoperator(src: Path, dst: Path, calib) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), _reader(calib), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)


def ort_default_qdq(src: Path, dst: Path, calib) -> None:
    from onnxruntime.quantization import quantize_static

    quantize_static(str(src), str(dst), _reader(calib))


def ort_dynamic(src: Path, dst: Path, calib) -> None:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(src), str(dst))


def nncf_ptq(src: Path, dst: Path, calib) -> None:
    import nncf
    import onnx

    n = len(next(iter(calib.values())))
    dataset = nncf.Dataset([{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)])
    onnx.save(nncf.quantize(onnx.load(str(src)), dataset, subset_size=n), str(dst))


def slimgraph_recipe(recipe: str) -> Callable:
    def build(src: Path, dst: Path, calib) -> None:
        result = slimgraph.run(src, recipe, data=calib)
        slimgraph.save(result.model, dst)

    build.recipe = recipe
    return build


TOOLS: dict[str, Callable] = {
    ORT_QOP: ort_qoperator, ORT_QDQ: ort_default_qdq, ORT_DYN: ort_dynamic, NNCF: nncf_ptq,
    **{label: slimgraph_recipe(recipe) for recipe, label in SLIM.items()},
}


def unavailable(tool: str) -> str | None:
    """Why a tool cannot run in this environment, or None."""
    recipe = getattr(TOOLS[tool], "recipe", None)
    if recipe is not None and recipe not in recipe_names():
        return f"not available yet (no `{recipe}` recipe in slimgraph/recipes)"
    if tool == NNCF:
        try:
            import nncf  # noqa: F401
        except ImportError as e:
            return f"nncf not installed ({e})"
    return None


# --- the models -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Subject:
    name: str
    path: Path
    calib: dict[str, np.ndarray]
    #: batch size -> feeds for latency
    feeds: dict[int, dict[str, np.ndarray]]
    #: (model path, batch size) -> accuracy metric
    accuracy: Callable[[Path, int], float]
    metric: str
    tools: list[str]
    note: str = ""
    #: batch size -> timed runs per row (set by `measure`)
    runs: dict[int, int] = dataclasses.field(default_factory=dict)


def _prepared(name: str, source: Path) -> Path:
    """`source` after slimgraph's exact optimize recipe (BN folded), checked within 1e-5."""
    path = WORK / name / "float.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        slimgraph.save(slimgraph.run(source, "optimize", verify=True).model, path)
    return path


def _export_folded(name: str, build: Callable) -> Path:
    """A torch architecture exported at opset 17 in eval mode: BatchNormalization folded by
    the exporter (common._export keeps BN on purpose, for the fusion benchmark)."""
    import torch

    path = WORK / name / f"export-torch{torch.__version__}.onnx"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build().eval()
    for m in model.modules():  # the same non-trivial BN statistics as common._export
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    tmp = path.with_suffix(".tmp")
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(tmp), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    tmp.replace(path)
    return path


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def torch_subjects() -> list[Subject]:
    from torch_models import mobilenet_v2, resnet18

    rng = np.random.default_rng(0)
    calib = {"input": rng.standard_normal((32, 3, 224, 224)).astype(np.float32)}
    held_out = {"input": rng.standard_normal((8, 3, 224, 224)).astype(np.float32)}
    subjects = []
    for name, build in (("resnet18", resnet18), ("mobilenet_v2", mobilenet_v2)):
        path = _prepared(name, _export_folded(name, build))
        reference = ort.run_batched(path, held_out)["logits"]

        def cosine(model: Path, batch: int, reference=reference) -> float:
            return float(_cosine(ort.run_batched(model, held_out)["logits"], reference).mean())

        subjects.append(Subject(name, path, calib, {1: {"input": held_out["input"][:1]}}, cosine,
                                "logit cosine vs float", [*STATIC_TOOLS, *DYNAMIC_TOOLS],
                                "random weights: fidelity, not accuracy"))
    return subjects


def digits_subject() -> Subject:
    path = _prepared("digits_cnn", zoo.digits_cnn())
    test = zoo.digits_test_data()
    data = {zoo.DIGITS_INPUT: test[zoo.DIGITS_INPUT]}
    calib = {zoo.DIGITS_INPUT: zoo.digits_data().x_train[:256]}

    def top1(model: Path, batch: int) -> float:
        logits = ort.run_batched(model, data, batch_size=batch)
        return float((next(iter(logits.values())).argmax(1) == test["labels"]).mean())

    return Subject("digits_cnn", path, calib, {1: {zoo.DIGITS_INPUT: data[zoo.DIGITS_INPUT][:1]}}, top1,
                   "test top-1", [*STATIC_TOOLS, *DYNAMIC_TOOLS], f"{len(test['labels'])} test images")


def magika_subject(n_files: int) -> Subject:
    path = zoo.magika_model_path()
    data = zoo.magika_inputs(n_files, seed=0)
    calib = zoo.magika_inputs(256, seed=1)
    references: dict[int, np.ndarray] = {}

    def agreement(model: Path, batch: int) -> float:
        if batch not in references:
            references[batch] = _top1(ort.run_batched(path, data, batch_size=batch))
        return float((_top1(ort.run_batched(model, data, batch_size=batch)) == references[batch]).mean())

    feeds = {b: {k: v[:b] for k, v in data.items()} for b in (1, 64)}
    n = len(next(iter(data.values())))
    return Subject("magika", path, calib, feeds, agreement, "top-1 agreement with float",
                   [*STATIC_TOOLS, *DYNAMIC_TOOLS], f"{n} real files of this machine")


def _top1(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return next(iter(outputs.values())).argmax(-1)


# --- measuring ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    model: str
    tool: str
    path: Path | None = None
    error: str | None = None
    build_s: float | None = None
    size: int | None = None
    #: batch -> metric / median ms / speed-up vs float
    metric: dict[int, float] = dataclasses.field(default_factory=dict)
    ms: dict[int, float] = dataclasses.field(default_factory=dict)
    speedup: dict[int, float] = dataclasses.field(default_factory=dict)
    check: runtime_check.RuntimeCheck | None = None


def build(subject: Subject, tool: str) -> Row:
    row = Row(subject.name, tool)
    if tool in (FLOAT, CONTROL):
        row.path = subject.path
    elif (why := unavailable(tool)) is not None:
        row.error = why
    else:
        dst = WORK / subject.name / f"{tool.replace(' ', '_').replace('/', '-')}.onnx"
        dst.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            TOOLS[tool](subject.path, dst, subject.calib)
        except SlimgraphError as e:
            row.error = f"failed: {e}"
        except Exception as e:  # a third-party quantizer's own failure: recorded in the table
            row.error = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        else:
            row.path = dst
        row.build_s = time.perf_counter() - start
    if row.path is not None:
        row.size = row.path.stat().st_size
    return row


def measure(subject: Subject, runs: int, threads: int) -> list[Row]:
    rows = [build(subject, t) for t in (FLOAT, CONTROL, *subject.tools)]
    for row in rows:
        if row.path is None:
            continue
        if row.tool != CONTROL:
            for batch in subject.feeds:
                try:
                    row.metric[batch] = subject.accuracy(row.path, batch)
                except SlimgraphError as e:
                    row.error = f"does not run: {e}"
                    row.path = None
                    break
        if row.path is not None and row.tool != CONTROL:
            try:
                row.check = runtime_check.check_runtime(row.path, feeds=subject.feeds[1], threads=threads,
                                                        on_warning=lambda p: None)
            except SlimgraphError as e:
                logging.warning("%s / %s: runtime check failed: %s", subject.name, row.tool, e)
    for batch, feeds in subject.feeds.items():
        live = {r.tool: r.path for r in rows if r.path is not None}
        subject.runs[batch] = _runs(subject.path, feeds, len(live), runs, threads)
        stats = _bench(live, feeds, subject.runs[batch], threads)
        for row in rows:
            if row.tool in stats:
                row.ms[batch] = stats[row.tool].median
                row.speedup[batch] = 1.0 / stats[row.tool].ratio_to(stats[FLOAT])
    control = next(r for r in rows if r.tool == CONTROL)
    control.metric = next(r for r in rows if r.tool == FLOAT).metric
    return rows


def _bench(models: dict[str, Path], feeds, runs: int, threads: int) -> dict[str, ort.BenchStats]:
    """`ort.bench` in SESSION_SETS calls of runs / SESSION_SETS rounds, each with fresh
    sessions, the rounds pooled: the same model in two sessions can differ by several
    percent for a whole run here (memory placement, thread wake-ups), which interleaving
    cannot cancel but fresh sessions average out."""
    per = -(-runs // SESSION_SETS)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(SESSION_SETS):
        for name, stats in ort.bench(models, feeds, runs=per, warmup=5, threads=threads).items():
            times[name] += stats.times
    return {name: ort.BenchStats.from_times(t, threads=threads, provider="cpu") for name, t in times.items()}


def _runs(path: Path, feeds, models: int, runs: int, threads: int) -> int:
    """`runs`, or more for fast models: enough rounds for about BENCH_SECONDS of timing, up
    to 20x `runs`, so sub-millisecond medians are not at the mercy of a few noisy rounds."""
    pilot = ort.bench({FLOAT: path}, feeds, runs=5, warmup=2, threads=threads)[FLOAT].median / 1e3
    return int(min(20 * runs, max(runs, BENCH_SECONDS / (models * pilot))))


# --- targets ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Target:
    model: str
    what: str
    met: bool
    detail: str


def targets(subject: Subject, rows: list[Row]) -> list[Target]:
    by = {r.tool: r for r in rows}
    out = []
    slim_int8 = by.get(SLIM["int8"])
    ort_rows = [r for r in rows if r.tool.startswith("ORT") and r.speedup.get(1)]
    ort_best = max(ort_rows, key=lambda r: r.speedup[1], default=None)

    def speed(row: Row | None, batch: int = 1) -> str:
        return f"{row.speedup[batch]:.2f}x" if row is not None and batch in row.speedup else "n/a"

    if subject.name in ("resnet18", "mobilenet_v2"):
        goal = 2.0 if subject.name == "resnet18" else 1.6
        s = slim_int8.speedup.get(1) if slim_int8 and slim_int8.path else None
        best = ort_best.speedup[1] if ort_best else 0.0
        out.append(Target(subject.name, f"slimgraph int8 >= {goal}x and >= ORT's best",
                          s is not None and s >= goal and s >= best,
                          f"slimgraph int8 {speed(slim_int8)}, ORT best {speed(ort_best)}"
                          f"{f' ({ort_best.tool})' if ort_best else ''}"
                          + (f"; {slim_int8.error}" if slim_int8 and slim_int8.error else "")))
        chk = slim_int8.check if slim_int8 else None
        out.append(Target(
            subject.name, "slimgraph int8: 100% of Conv/Gemm/MatMul MACs integer, one Q per input, one DQ per output",
            chk is not None and chk.integer_mac_share == 1.0 and chk.quantize_nodes == chk.quantize_at_inputs == 1
            and chk.dequantize_nodes == chk.dequantize_at_outputs == 1,
            "n/a" if chk is None else f"{chk.integer_mac_share:.1%} MACs integer, Q {chk.quantize_nodes} "
            f"({chk.quantize_at_inputs} at inputs), DQ {chk.dequantize_nodes} ({chk.dequantize_at_outputs} at outputs)"))
    elif subject.name == "digits_cnn":
        base = by[FLOAT].metric[1]
        got = slim_int8.metric.get(1) if slim_int8 else None
        ort_drops = ", ".join(f"{r.tool} {round(100 * (base - r.metric[1]), 2) + 0.0:.2f}"
                              for r in rows if r.tool.startswith("ORT") and 1 in r.metric)
        out.append(Target(subject.name, "slimgraph int8 top-1 drop <= 0.5 points",
                          got is not None and 100 * (base - got) <= 0.5,
                          f"float {base:.2%}, slimgraph int8 "
                          f"{'n/a' if got is None else f'{got:.2%} (drop {100 * (base - got):.2f} pt)'}; "
                          f"ORT drops (pt): {ort_drops}"))
    elif subject.name == "magika":
        candidates = [by[t] for t in (SLIM["int8"], SLIM["int8-dynamic"]) if t in by]
        ok = [r for r in candidates if all(r.metric.get(b, 0) >= 0.995 and r.speedup.get(b, 0) > 1.0 for b in (1, 64))]
        detail = "; ".join(
            f"{r.tool}: " + (r.error or ", ".join(
                f"batch {b}: {r.metric.get(b, float('nan')):.2%} at {speed(r, b)}" for b in (1, 64)))
            for r in candidates)
        out.append(Target(subject.name, ">= 99.5% agreement and faster than float at batch 1 and 64 "
                          "(slimgraph int8 or int8-dynamic)", bool(ok), detail))
    return out


# --- output -----------------------------------------------------------------------------------------
def table(subject: Subject, rows: list[Row]) -> str:
    batches = list(subject.feeds)
    base = next(r for r in rows if r.tool == FLOAT)
    headers = ["tool"]
    for b in batches:
        headers += [f"ms (batch {b})", f"speed-up (batch {b})"]
    headers += [f"{subject.metric}" + (f" (batch {b})" if len(batches) > 1 else "") for b in batches]
    headers += ["file MB", "int MACs", "Q (at inputs)", "DQ (at outputs)", "float islands", "ORT pitfalls"]
    lines = []
    for r in rows:
        if r.path is None and not r.ms:
            lines.append([r.tool, *[""] * (len(headers) - 2), r.error or ""])
            continue
        cells = [r.tool]
        for b in batches:
            cells += [f"{r.ms[b]:.3f}" if b in r.ms else "", f"{r.speedup[b]:.2f}x" if b in r.speedup else ""]
        for b in batches:
            m = r.metric.get(b)
            if m is None:
                cells.append("")
            elif subject.metric.startswith("logit cosine"):
                cells.append(f"{m:.4f}")
            else:
                delta = round(100 * (m - base.metric[b]), 2) + 0.0  # + 0.0: no "-0.00"
                cells.append(f"{m:.2%}" + ("" if r.tool in (FLOAT, CONTROL) else f" ({delta:+.2f} pt)"))
        c = r.check
        cells.append(f"{r.size / 1e6:.2f}" if r.size else "")
        if c is None:
            cells += ["", "", "", "", ""]
        else:
            share = c.integer_mac_share
            cells += [f"{share:.1%}" if share is not None else "-", f"{c.quantize_nodes} ({c.quantize_at_inputs})",
                      f"{c.dequantize_nodes} ({c.dequantize_at_outputs})", str(len(c.islands)),
                      ", ".join(f"{p.kind.value} x{len(p.nodes)}" for p in c.pitfalls) or "-"]
        lines.append(cells)
    return common.markdown_table(headers, lines)


def report(results: list[tuple[Subject, list[Row]]], goals: list[Target], runs: int, threads: int) -> str:
    import onnxruntime

    cpu = runtime_check.cpu_info()
    parts = [
        "# int8 quantization: float vs onnxruntime's quantizer vs NNCF vs slimgraph\n",
        f"Machine: {common.machine()}; {cpu.model or cpu.arch}, "
        f"{'VNNI' if cpu.vnni else 'no VNNI' if cpu.vnni is False else 'VNNI unknown'}; "
        f"onnxruntime {onnxruntime.__version__}{_nncf_version()}. Latency: ORT CPU, {threads} threads, spinning off, "
        f"all rows of a model interleaved round-robin, median of {runs} runs (more for fast models: about {BENCH_SECONDS:.0f} s of rounds, up to {20 * runs}) in {SESSION_SETS} sets of fresh sessions, each after 5 warm-up runs; speed-up = 1 / "
        "the median over rounds of (time / float's time in the same round); the control row is the float model "
        "timed against itself (its distance from 1.00x is the noise floor). int MACs: share of Conv/Gemm/MatMul "
        "multiply-accumulates ORT runs in integer kernels; Q (at inputs) / DQ (at outputs): nodes of ORT's "
        "optimized graph that quantize float activations (QuantizeLinear, DynamicQuantizeLinear, ...) / "
        "dequantize them (DequantizeLinear of activations, integer kernels with float outputs such as "
        "MatMulIntegerToFloat), and how many read a model input / write a model output; float islands and "
        "pitfalls: `slimgraph inspect --runtime` (slimgraph/backends/runtime_check.py).\n",
        "## Targets\n",
        common.markdown_table(["model", "target", "met", "measured"],
                              [[g.model, g.what, "yes" if g.met else "**NO**", g.detail] for g in goals]),
    ]
    for subject, rows in results:
        timed = ", ".join(f"batch {b}: {n} runs" for b, n in subject.runs.items())
        parts += [f"\n## {subject.name} ({subject.metric}; {subject.note}; {timed})\n", table(subject, rows)]
        errors = [f"- {r.tool}: {r.error}" for r in rows if r.error]
        if errors:
            parts += ["", *errors]
    return "\n".join(parts)


def _nncf_version() -> str:
    try:
        import nncf
    except ImportError:
        return "; nncf not installed"
    return f"; nncf {nncf.__version__}"


def plot(results: list[tuple[Subject, list[Row]]], path: Path) -> None:
    """One panel per model: speed-up vs float (batch 1) against the accuracy metric; one
    colour and marker per tool across panels (stars: slimgraph)."""
    tools = [FLOAT, *dict.fromkeys(t for s, _ in results for t in s.tools)]
    colors = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(tools)}
    cols = 2
    rows_n = (len(results) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(12, 4.2 * rows_n), squeeze=False)
    for ax, (subject, rows) in zip(axes.flat, results):
        for r in rows:
            if r.tool == CONTROL or 1 not in r.speedup or 1 not in r.metric:
                continue
            star = r.tool.startswith("slimgraph")
            ax.scatter(r.speedup[1], r.metric[1], color=colors[r.tool], marker="*" if star else "o",
                       s=160 if star else 50, label=r.tool, edgecolors="black" if star else "none", linewidths=0.5)
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{subject.name} ({subject.note})", fontsize=10)
        ax.set_xlabel("speed-up vs float, batch 1 (right is faster)")
        ax.set_ylabel(subject.metric)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.collections if h.get_label() in colors}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--magika-files", type=int, default=2000)
    parser.add_argument("--no-torch", action="store_true", help="skip ResNet-18 and MobileNetV2")
    parser.add_argument("--only", action="append", help="run only these models (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    makers: list[Callable[[], list[Subject]]] = []
    if not args.no_torch:
        makers.append(torch_subjects)
    makers += [lambda: [digits_subject()], lambda: [magika_subject(args.magika_files)]]
    results, goals = [], []
    for make in makers:
        for subject in make():
            if args.only and subject.name not in args.only:
                continue
            print(f"{subject.name} ...", file=sys.stderr, flush=True)
            rows = measure(subject, args.runs, args.threads)
            results.append((subject, rows))
            goals += targets(subject, rows)
    common.write_result("quantize", report(results, goals, args.runs, args.threads))
    plot(results, common.RESULTS / "quantize.png")
    missing = sorted({r.tool for _, rows in results for r in rows if r.tool.startswith("slimgraph") and r.error})
    missed = [f"{g.model}: {g.what}" for g in goals if not g.met]
    if missing:
        print(f"slimgraph rows without results: {', '.join(missing)}", file=sys.stderr)
    if missed:
        print("targets missed:\n  " + "\n  ".join(missed), file=sys.stderr)
    return 1 if missed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
