"""slimgraph's dynamic int8 and weight-only int4 against onnxruntime's quantizers, on
all-MiniLM-L6-v2 and magika, in one run (writes results/quantize_transformers.md).

all-MiniLM-L6-v2 (`zoo.minilm()`: inputs padded to 128 tokens, output the normalized
mean-pooled sentence embedding), fidelity = cosine of each sentence's embedding with the
float model's on `--sentences` (500) real English sentences of this machine, every model
run at batch 1 (dynamic quantization depends on the batch). slimgraph's recipes get 64
*other* sentences as calibration data (smoothing for int8-dynamic, GPTQ for int4-weights).
Side by side: `onnxruntime.quantization.quantize_dynamic` with its defaults and with
per_channel=True, and its `MatMulNBitsQuantizer` (int4, block 128, its defaults), each on
the model after onnxruntime's own pre-processing (`quant_pre_process`).
Targets: int8-dynamic mean cosine >= 0.995, min >= 0.985, speed-up >= the best ORT
variant's; int4-weights (embedding included) file >= 5x smaller, mean cosine >= 0.975.

magika (`zoo.magika_inputs`), fidelity = top-1 agreement with the float model on
`--files` (2,000) real files at batch 1 and at batch 64: slimgraph's int8-dynamic
(data-free), onnxruntime's quantize_dynamic (defaults: its Conv becomes ConvInteger) and
with MatMul only. Targets: >= 99.5% agreement at both batch sizes, faster than float at both.

Latency: ORT CPU, `--threads` (2) threads, spinning off, all models of a table timed
interleaved (`ort.bench`), speed-up = 1 / the median of paired per-round time ratios to
float (`BenchStats.ratio_to`). Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)
import numpy as np

import slimgraph  # noqa: E402
from slimgraph import zoo  # noqa: E402
from slimgraph.backends import ort  # noqa: E402

logging.getLogger("onnxruntime").setLevel(logging.ERROR)
logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization warns about pre-processing


def ort_preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's recommended pre-processing (its optimizer folds the exporter's weight
    Transposes into initializers; without it quantize_dynamic finds no constant MatMul
    weight in the torch export and quantizes only the embedding). Its symbolic shape
    inference crashes on this export, so it is skipped."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def ort_dynamic(src: Path, dst: Path, **kwargs) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(src), str(dst), **kwargs)
    return dst


def ort_int4(src: Path, dst: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)))
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    return dst


def slim(src: Path, dst: Path, recipe: str, data=None) -> tuple[Path, float]:
    start = time.perf_counter()
    result = slimgraph.run(src, recipe, data=data)
    slimgraph.save(result.model, dst)
    return dst, time.perf_counter() - start


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def run_each(path: Path, feeds: dict, batch: int, threads: int) -> np.ndarray:
    sess = ort.session(path, threads=threads)
    name = sess.get_outputs()[0].name
    n = len(next(iter(feeds.values())))
    return np.concatenate([ort.run(sess, {k: v[i:i + batch] for k, v in feeds.items()})[name]
                           for i in range(0, n, batch)])


# --- all-MiniLM-L6-v2 ---------------------------------------------------------------------------
def minilm(args, tmp: Path) -> tuple[str, list[str]]:
    src = zoo.minilm()
    sentences = zoo.minilm_sentences(args.sentences, seed=0)
    calib_sentences = [s for s in zoo.minilm_sentences(args.sentences + 64, seed=1) if s not in set(sentences)][:64]
    feeds, calib = zoo.minilm_inputs(sentences), zoo.minilm_inputs(calib_sentences)
    models: dict[str, tuple[Path, str]] = {"float": (src, "")}
    pre = ort_preprocess(src, tmp / "ort_pre.onnx")
    models["ORT quantize_dynamic (defaults)"] = (ort_dynamic(pre, tmp / "ort_dyn.onnx"), "")
    models["ORT quantize_dynamic (per_channel)"] = (ort_dynamic(pre, tmp / "ort_dyn_pc.onnx", per_channel=True), "")
    models["ORT MatMulNBitsQuantizer (int4)"] = (ort_int4(pre, tmp / "ort_int4.onnx"), "")
    for label, recipe, data in (("slimgraph int8-dynamic (64 sentences)", "int8-dynamic", calib),
                                ("slimgraph int8-dynamic (no data)", "int8-dynamic", None),
                                ("slimgraph int4-weights (64 sentences)", "int4-weights", calib)):
        path, seconds = slim(src, tmp / f"{recipe}-{'data' if data else 'free'}.onnx", recipe, data)
        models[label] = (path, f"{seconds:.0f} s")
    print("MiniLM: embedding", len(sentences), "sentences per model", flush=True)
    ref = run_each(src, feeds, 1, args.threads)
    cos = {name: zoo.minilm_fidelity(ref, run_each(path, feeds, 1, args.threads)) for name, (path, _) in models.items()}
    one = {k: v[:1] for k, v in feeds.items()}
    stats = ort.bench({name: path for name, (path, _) in models.items()}, one, runs=args.runs, warmup=5,
                      threads=args.threads)
    float_size = size(src)
    rows = []
    for name, (path, seconds) in models.items():
        speedup = 1 / stats[name].ratio_to(stats["float"])
        rows.append([name, f"{cos[name].mean():.4f}", f"{cos[name].min():.4f}", f"{stats[name].median:.1f}",
                     f"{speedup:.2f}x", f"{size(path) / 1e6:.1f}", f"{float_size / size(path):.2f}x", seconds])
    table = common.markdown_table(
        ["model", "mean cosine", "min cosine", "latency (ms)", "speed-up", "file (MB)", "smaller", "compile"], rows)

    misses = []
    speed = {name: 1 / stats[name].ratio_to(stats["float"]) for name in models}
    dyn, int4 = "slimgraph int8-dynamic (64 sentences)", "slimgraph int4-weights (64 sentences)"
    best_ort = max(speed["ORT quantize_dynamic (defaults)"], speed["ORT quantize_dynamic (per_channel)"])
    checks = [
        (cos[dyn].mean() >= 0.995, f"int8-dynamic mean cosine {cos[dyn].mean():.4f} >= 0.995"),
        (cos[dyn].min() >= 0.985, f"int8-dynamic min cosine {cos[dyn].min():.4f} >= 0.985"),
        (speed[dyn] >= best_ort, f"int8-dynamic speed-up {speed[dyn]:.2f}x >= ORT's best {best_ort:.2f}x"),
        (float_size / size(models[int4][0]) >= 5, f"int4-weights {float_size / size(models[int4][0]):.2f}x smaller >= 5x"),
        (cos[int4].mean() >= 0.975, f"int4-weights mean cosine {cos[int4].mean():.4f} >= 0.975"),
    ]
    lines = [f"- {'met' if ok else 'MISSED'}: {text}" for ok, text in checks]
    misses += [text for ok, text in checks if not ok]
    text = (f"## all-MiniLM-L6-v2 ({len(sentences)} sentences, batch 1, 128 tokens)\n\n{table}\n\n"
            f"Float: {stats['float'].median:.1f} ms per sentence. Targets:\n\n" + "\n".join(lines))
    return text, misses


# --- magika ---------------------------------------------------------------------------------------
def magika(args, tmp: Path) -> tuple[str, list[str]]:
    src = zoo.magika_model_path()
    feeds = zoo.magika_inputs(args.files, seed=0)
    models = {
        "float": src,
        "ORT quantize_dynamic (defaults)": ort_dynamic(src, tmp / "mg_ort.onnx"),
        "ORT quantize_dynamic (MatMul only)": ort_dynamic(src, tmp / "mg_ort_mm.onnx", op_types_to_quantize=["MatMul"]),
        "slimgraph int8-dynamic": slim(src, tmp / "mg_slim.onnx", "int8-dynamic")[0],
    }
    print("magika: classifying", args.files, "files per model and batch size", flush=True)
    top1 = {(name, b): run_each(path, feeds, b, args.threads).argmax(1) for name, path in models.items() for b in (1, 64)}
    agree = {key: float((value == top1[("float", 1)]).mean()) for key, value in top1.items()}
    speed, latency = {}, {}
    for batch, runs in ((1, args.runs), (64, max(8, args.runs // 6))):
        stats = ort.bench(models, {zoo.MAGIKA_INPUT: feeds[zoo.MAGIKA_INPUT][:batch]}, runs=runs, warmup=3,
                          threads=args.threads)
        for name in models:
            speed[(name, batch)] = 1 / stats[name].ratio_to(stats["float"])
            latency[(name, batch)] = stats[name].median
    rows = [[name, f"{100 * agree[(name, 1)]:.2f}%", f"{100 * agree[(name, 64)]:.2f}%",
             f"{latency[(name, 1)]:.2f}", f"{speed[(name, 1)]:.2f}x", f"{latency[(name, 64)]:.0f}",
             f"{speed[(name, 64)]:.2f}x", f"{size(path) / 1e6:.2f}"] for name, path in models.items()]
    table = common.markdown_table(["model", "top-1 agreement b1", "b64", "latency b1 (ms)", "speed-up b1",
                                   "latency b64 (ms)", "speed-up b64", "file (MB)"], rows)
    ours = "slimgraph int8-dynamic"
    checks = [(agree[(ours, b)] >= 0.995, f"agreement at batch {b}: {100 * agree[(ours, b)]:.2f}% >= 99.5%")
              for b in (1, 64)]
    checks += [(speed[(ours, b)] > 1.0, f"faster than float at batch {b}: {speed[(ours, b)]:.2f}x") for b in (1, 64)]
    lines = [f"- {'met' if ok else 'MISSED'}: {text}" for ok, text in checks]
    text = (f"## magika ({args.files} real files)\n\nAgreement = top-1 equal to the float model's at batch 1. "
            "slimgraph keeps the Conv out of ConvInteger: it runs as im2col + DynamicQuantizeMatMul "
            "(see quantize_dynamic.py).\n\n" + table + "\n\nTargets:\n\n" + "\n".join(lines))
    return text, [text for ok, text in checks if not ok]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true", help="skip MiniLM (its export needs torch)")
    args = parser.parse_args()
    sections, misses = [], []
    with tempfile.TemporaryDirectory(prefix="slimgraph-bench-") as tmp:
        for bench in ([magika] if args.no_torch else [minilm, magika]):
            text, missed = bench(args, Path(tmp))
            sections.append(text)
            misses += missed
    header = (f"# Dynamic int8 and weight-only int4 vs onnxruntime's quantizers\n\n"
              f"{common.machine()}; {args.threads} threads, ORT CPU, medians of {args.runs} interleaved runs, "
              "speed-up = 1 / median paired time ratio to float. Generated by "
              "`benchmarks/quantize_transformers.py`.\n")
    common.write_result("quantize_transformers", header + "\n" + "\n\n".join(sections))
    if misses:
        print("missed:", "; ".join(misses), file=sys.stderr)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
