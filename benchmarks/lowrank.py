"""Low-rank factorization (`lowrank.svd`) on all-MiniLM-L6-v2 and the ResNet-18 shape:
file size, fidelity to the float model and ORT CPU latency, per configuration.

Models and what "fidelity" means:
- all-MiniLM-L6-v2 (`zoo.minilm()`, after the exact `optimize` recipe, which folds the
  exporter's weight transposes so MatMul weights are constants): mean and minimum cosine of
  the sentence embeddings against the float model on `--sentences` (500) real sentences
  (`zoo.minilm_sentences(seed=0)`); `max_error` rows calibrate on 64 other sentences.
- ResNet-18 shape (`torch_models.resnet18`, random weights, exported as
  `benchmarks/quantize.py` does: BatchNormalization folded, then `optimize`): mean logit
  cosine against float on 16 random images. Random weights have flat spectra, so energy
  criteria keep most of the rank; fixed `rank_ratio` rows show what a given rank costs.
  Channel and spatial SVD, each with objective size and latency.

Latency: ORT CPU, `--threads` (2) threads, spinning off, batch 1 (one sentence at 128
tokens; one 224x224 image), every row of a model interleaved round-robin in one `ort.bench`
call, `--runs` rounds; speed-up = 1 / the median over rounds of (time / float's time in the
same round). The control row is the float model timed against itself: its distance from
1.00x is the noise floor. Writes benchmarks/results/lowrank.md and lowrank.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import common
import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import slimgraph  # noqa: E402
import slimgraph.passes.lowrank  # noqa: E402,F401  (registration, until slimgraph.passes imports it)
from slimgraph import zoo  # noqa: E402
from slimgraph.backends import ort  # noqa: E402

WORK = common.CACHE / "lowrank"
FLOAT, CONTROL = "float", "float (control)"

MINILM_CONFIGS = [
    "lowrank.svd(energy=0.9)",
    "lowrank.svd(energy=0.95)",
    "lowrank.svd(energy=0.9, margin=1.0)",
    "lowrank.svd(max_error=0.02)",
    "lowrank.svd(max_error=0.05)",
    "lowrank.svd(max_error=0.1)",
    "lowrank.svd(max_error=0.05, whiten=false)",
    "lowrank.svd(max_error=0.05, objective=latency)",
]
RESNET_CONFIGS = [
    f"lowrank.svd({rule}, conv={conv}, objective={objective})"
    for rule in ("energy=0.9", "rank_ratio=0.25")
    for conv in ("channel", "spatial")
    for objective in ("size", "latency")
]


@dataclasses.dataclass
class Row:
    label: str
    path: Path
    seconds: float = 0.0
    factorized: str = ""
    params: str = ""
    fidelity: tuple[float, float] = (1.0, 1.0)
    ms: float = 0.0
    speedup: float = 1.0

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def build(source: Path, config: str, dst: Path, data=None) -> Row:
    start = time.perf_counter()
    result = slimgraph.run(source, config, data=data)
    seconds = time.perf_counter() - start
    slimgraph.save(result.model, dst)
    stats = result.report.rows[-1].stats
    considered = len(stats["table"])
    return Row(config.removeprefix("lowrank.svd"), dst, seconds, f"{stats['factorized']}/{considered}",
               f"{stats['params_before'] / 1e6:.2f}M -> {stats['params_after'] / 1e6:.2f}M")


def timed(rows: list[Row], feeds: dict, runs: int, threads: int) -> None:
    """Interleaved latency of every row and a control copy of the float model (rows[0])."""
    models = {r.label: r.path for r in rows}
    models[CONTROL] = rows[0].path
    stats = ort.bench(models, feeds, runs=runs, threads=threads)
    base = stats[FLOAT]
    for r in rows:
        r.ms, r.speedup = stats[r.label].median, 1.0 / stats[r.label].ratio_to(base)
    control = stats[CONTROL]
    rows.append(Row(CONTROL, rows[0].path, ms=control.median, speedup=1.0 / control.ratio_to(base)))


# --- MiniLM ---------------------------------------------------------------------------------------
def minilm(args) -> list[Row]:
    folder = WORK / "minilm"
    folder.mkdir(parents=True, exist_ok=True)
    sentences = zoo.minilm_sentences(args.sentences, seed=0)
    held = set(sentences)
    calib = zoo.minilm_inputs([s for s in zoo.minilm_sentences(args.sentences + 64, seed=1) if s not in held][:64])
    source = folder / "float.onnx"
    if not source.is_file():  # optimize is exact: verified within 1e-5 on the calibration sentences
        slimgraph.save(slimgraph.run(zoo.minilm(), "optimize", verify=True, data=calib).model, source)
    feeds = zoo.minilm_inputs(sentences)
    rows = [Row(FLOAT, source, factorized="-", params="-")]
    for i, config in enumerate(MINILM_CONFIGS):
        print("MiniLM:", config, flush=True)
        rows.append(build(source, config, folder / f"v{i}.onnx", calib if "max_error" in config else None))
    reference = ort.run_batched(source, feeds)[zoo.MINILM_OUTPUT]
    for r in rows[1:]:
        cos = zoo.minilm_fidelity(reference, ort.run_batched(r.path, feeds)[zoo.MINILM_OUTPUT])
        r.fidelity = (float(cos.mean()), float(cos.min()))
    timed(rows, {k: v[:1] for k, v in feeds.items()}, args.runs, args.threads)
    return rows


# --- ResNet-18 ------------------------------------------------------------------------------------
def resnet(args) -> list[Row]:
    import quantize
    from torch_models import resnet18

    folder = WORK / "resnet18"
    folder.mkdir(parents=True, exist_ok=True)
    source = quantize._prepared("resnet18", quantize._export_folded("resnet18", resnet18))
    images = {"input": np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)}
    rows = [Row(FLOAT, source, factorized="-", params="-")]
    for i, config in enumerate(RESNET_CONFIGS):
        print("ResNet-18:", config, flush=True)
        rows.append(build(source, config, folder / f"v{i}.onnx"))
    reference = ort.run_batched(source, images)["logits"]
    for r in rows[1:]:
        out = ort.run_batched(r.path, images)["logits"]
        cos = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
        r.fidelity = (float(cos.mean()), float(cos.min()))
    timed(rows, {"input": images["input"][:1]}, args.runs, args.threads)
    return rows


# --- output ---------------------------------------------------------------------------------------
def table(rows: list[Row], fidelity: str) -> str:
    base = rows[0].size
    lines = [[r.label, r.factorized, r.params, f"{r.size / 1e6:.2f}", f"{base / r.size:.2f}x",
              f"{r.fidelity[0]:.4f} / {r.fidelity[1]:.4f}", f"{r.ms:.2f}", f"{r.speedup:.2f}x",
              f"{r.seconds:.0f} s" if r.seconds else ""] for r in rows]
    return common.markdown_table(["config", "layers factorized", "params", "file MB", "smaller",
                                  f"{fidelity} mean / min", "ms (batch 1)", "speed-up", "pass time"], lines)


def plot(results: dict[str, list[Row]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        for r in rows:
            if r.label == CONTROL:
                continue
            ax.scatter(rows[0].size / r.size, r.fidelity[0])
            ax.annotate(r.label.strip("()") or r.label, (rows[0].size / r.size, r.fidelity[0]), fontsize=6)
        ax.set_xlabel("file size reduction (x)")
        ax.set_ylabel("mean cosine vs float")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(results: dict[str, list[Row]], args) -> str:
    parts = [
        "# Low-rank factorization (`lowrank.svd`)\n",
        f"Machine: {common.machine()}. Latency: ORT CPU, {args.threads} threads, spinning off, batch 1, every "
        f"row of a model interleaved round-robin in one `ort.bench` call, {args.runs} rounds after 5 warm-up "
        "rounds; speed-up = 1 / median over rounds of (time / float's time in the same round); the control row "
        "is the float model timed against itself (its distance from 1.00x is the noise floor). Config cells "
        "are `lowrank.svd` arguments; defaults: energy 0.9, multiple 8, conv channel, objective size, margin "
        "0.8, whiten on with max_error, 64 calibration samples. `layers factorized` counts kept "
        "factorizations out of the layers considered; params are those of the considered layers' weights.\n",
        "## all-MiniLM-L6-v2\n",
        f"Float: the exported model after the exact `optimize` recipe. Cosine of the sentence embeddings vs "
        f"float on {args.sentences} real sentences (`zoo.minilm_sentences(seed=0)`); `max_error` rows "
        "calibrate on 64 other sentences (inputs padded to 128 tokens).\n",
        table(results["all-MiniLM-L6-v2"], "embedding cosine"),
        "\n## ResNet-18 shape (random weights)\n",
        "Exported with BatchNormalization folded (as `benchmarks/quantize.py`), then `optimize`. Cosine of "
        "the logits vs float on 16 random 224x224 images. Random weights: accuracy is meaningless, and their "
        "flat spectra leave energy criteria little to cut.\n",
        table(results["ResNet-18"], "logit cosine"),
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["minilm", "resnet"], default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = {}
    if args.only in (None, "minilm"):
        results["all-MiniLM-L6-v2"] = minilm(args)
    if args.only in (None, "resnet"):
        results["ResNet-18"] = resnet(args)
    if len(results) == 2:
        common.write_result("lowrank", report(results, args))
        plot(results, common.RESULTS / "lowrank.png")
    else:
        for name, rows in results.items():
            print(name)
            print(table(rows, "cosine"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
