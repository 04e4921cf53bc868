"""Unstructured 80% pruning + compact storage (`sparse-80`: cleanup, prune.magnitude,
pack.sparse) on the digits CNN and all-MiniLM-L6-v2, in one run (writes
results/prune_sparse.md).

For each model: the dense float file as shipped (`zoo`), the pruned model saved dense
("masked", zeros stored as floats) and the pruned model packed (bitmask + non-zero
values, decoded by a constant subgraph ORT folds at session creation). Reported:

- file bytes, and the same files deflated (zipfile, ZIP_DEFLATED level 6) beside them;
- outputs of packed vs masked on ORT (default optimizations) on the evaluation inputs:
  max abs difference (must be 0) and whether ORT's optimized graphs have the same op counts;
- ORT latency, 2 threads, batch 1, interleaved (`ort.bench`), as 1 / the median paired
  time ratio to the masked model, with a control row (a second copy of the masked file:
  the noise floor); session creation time (median of 5);
- quality without fine-tuning: digits top-1 on the test split; MiniLM cosine of each
  sentence's embedding with the dense float model's on `--sentences` (500) real sentences.

Variants: digits after `cleanup` only (stem conv and classifier dense; the stem's 144
weights are under min_size anyway), then after `optimize,strip_metadata` (BatchNorm folded,
the exporter's per-node debug strings dropped: a third of this small file), without and
with the classifier (the latter is what the `sparse-80` recipe runs); MiniLM with the embedding tables pruned, per layer and with the
global (RMS-normalised) ranking, and at 50% for scale. A second reference row is the dense
model after `optimize,strip_metadata` (exact), so the gain of pruning + packing alone shows.
Targets (issue 4): at 80%, file >= 3x smaller than the dense float file (as shipped); every
variant's outputs identical to the masked model. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx

import common
import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort


def size(path: Path) -> int:
    return path.stat().st_size


def zipped(path: Path, tmp: Path) -> int:
    out = tmp / (path.name + ".zip")
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        z.write(path, path.name)
    return size(out)


def optimized_ops(path: Path, tmp: Path) -> collections.Counter:
    target = tmp / (path.stem + ".ort-opt.onnx")
    ort.session(path, optimized_model_path=target)
    return collections.Counter(n.op_type for n in onnx.load(str(target)).graph.node)


def session_seconds(path: Path, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        ort.session(path, threads=2)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def run_all(path: Path, feeds: dict[str, np.ndarray], output: str, batch: int) -> np.ndarray:
    sess = ort.session(path, threads=2)
    n = len(next(iter(feeds.values())))
    return np.concatenate([ort.run(sess, {k: v[i:i + batch] for k, v in feeds.items()})[output]
                           for i in range(0, n, batch)])


def variant(src: Path, pipeline: str, tmp: Path, tag: str) -> tuple[Path, Path, str, float]:
    """(masked path, packed path, pass stats line, seconds) for `pipeline` (+ pack.sparse)."""
    t = time.perf_counter()
    masked = slimgraph.run(slimgraph.load(src), pipeline).model
    packed_result = slimgraph.run(masked, "pack.sparse")
    seconds = time.perf_counter() - t
    stats = packed_result.report.rows[-1].stats
    m, p = tmp / f"{tag}-masked.onnx", tmp / f"{tag}-packed.onnx"
    slimgraph.save(masked, m)
    slimgraph.save(packed_result.model, p)
    return m, p, f"{stats.get('packed', 0)} tensors packed, {stats.get('bytes', '')} bytes", seconds


def measure(name: str, src: Path, variants: dict[str, str], feeds, one, output: str, quality, args, tmp: Path):
    rows, notes, misses = [], [], []
    dense_size, dense_zip = size(src), zipped(src, tmp)
    rows.append([f"{name} dense float (as shipped)", f"{dense_size / 1e6:.3f}", "1.00x", "", f"{dense_zip / 1e6:.3f}",
                 "", "", "", f"{session_seconds(src) * 1e3:.0f}", quality(src)])
    optimized = tmp / f"{name}-optimized.onnx"
    slimgraph.save(slimgraph.run(slimgraph.load(src), "optimize,strip_metadata").model, optimized)
    opt_size = size(optimized)
    rows.append([f"{name} dense float, `optimize,strip_metadata` (exact)", f"{opt_size / 1e6:.3f}",
                 f"{dense_size / opt_size:.2f}x", "1.00x", f"{zipped(optimized, tmp) / 1e6:.3f}", "", "", "",
                 f"{session_seconds(optimized) * 1e3:.0f}", quality(optimized)])
    for label, pipeline in variants.items():
        tag = label.replace(" ", "_").replace(",", "")
        masked, packed, packed_stats, seconds = variant(src, pipeline, tmp, f"{name}-{tag}")
        control = tmp / f"{name}-{tag}-control.onnx"
        control.write_bytes(masked.read_bytes())
        a, b = run_all(masked, feeds, output, args.batch), run_all(packed, feeds, output, args.batch)
        diff = float(np.abs(a.astype(np.float64) - b).max())
        same_graph = optimized_ops(masked, tmp) == optimized_ops(packed, tmp)
        stats = ort.bench({"masked": masked, "packed": packed, "control": control}, one, runs=args.runs, warmup=5,
                          threads=2)
        speed = {k: 1 / stats[k].ratio_to(stats["masked"]) for k in stats}
        q_masked = quality(masked)
        for kind, path in (("pruned, dense storage", masked), ("pruned + pack.sparse", packed)):
            rows.append([f"{name} {label}: {kind}", f"{size(path) / 1e6:.3f}", f"{dense_size / size(path):.2f}x",
                         f"{opt_size / size(path):.2f}x", f"{zipped(path, tmp) / 1e6:.3f}",
                         "" if path == masked else f"{diff:g}", "" if path == masked else ("yes" if same_graph else "NO"),
                         f"{stats['masked' if path == masked else 'packed'].median:.3f} ms"
                         + ("" if path == masked else f" ({speed['packed']:.2f}x; control {speed['control']:.2f}x)"),
                         f"{session_seconds(path) * 1e3:.0f}", q_masked])
        notes.append(f"- {name} {label}: `{pipeline},pack.sparse` in {seconds:.1f} s; {packed_stats}")
        ratio = dense_size / size(packed)
        checks = [(diff == 0.0, f"{name} {label}: packed outputs identical to the masked model (max abs diff {diff:g})"),
                  (same_graph, f"{name} {label}: ORT's optimized graph is the masked model's")]
        if args.target_label in label:
            checks.append((ratio >= 3.0, f"{name} {label}: file {ratio:.2f}x smaller than the dense float file >= 3x"))
        notes += [f"  - {'met' if ok else 'MISSED'}: {text}" for ok, text in checks]
        misses += [text for ok, text in checks if not ok]
    return rows, notes, misses


def digits(args, tmp: Path):
    src = zoo.digits_cnn()
    test = zoo.digits_test_data()
    feeds = {"input": test["input"]}

    def top1(path: Path) -> str:
        logits = run_all(path, feeds, "logits", 360)
        return f"top-1 {float((logits.argmax(1) == test['labels']).mean()):.4f}"

    variants = {
        "80% after cleanup only, stem and classifier dense": "cleanup,prune.magnitude(sparsity=0.8)",
        "80%, BN folded, metadata stripped": "optimize,strip_metadata,prune.magnitude(sparsity=0.8)",
        "sparse-80 recipe (BN folded, metadata stripped, classifier pruned too)":
            "optimize,strip_metadata,prune.magnitude(sparsity=0.8, keep_first_last=false)",
    }
    return measure("digits CNN", src, variants, feeds, {"input": test["input"][:1]}, "logits", top1, args, tmp)


def minilm(args, tmp: Path):
    src = zoo.minilm()
    feeds = zoo.minilm_inputs(zoo.minilm_sentences(args.sentences, seed=0))
    reference = run_all(src, feeds, zoo.MINILM_OUTPUT, args.batch)

    def cosine(path: Path) -> str:
        if path == src:
            return "cosine 1 (reference)"
        cos = zoo.minilm_fidelity(reference, run_all(path, feeds, zoo.MINILM_OUTPUT, args.batch))
        return f"cosine mean {cos.mean():.4f}, min {cos.min():.4f}"

    variants = {
        "80% + embeddings, per layer": "cleanup,prune.magnitude(sparsity=0.8, embeddings=true)",
        "80% + embeddings, global": "cleanup,prune.magnitude(sparsity=0.8, embeddings=true, scope=global)",
        "50% + embeddings, per layer": "cleanup,prune.magnitude(sparsity=0.5, embeddings=true)",
    }
    return measure("MiniLM", src, variants, feeds, {k: v[:1] for k, v in feeds.items()}, zoo.MINILM_OUTPUT,
                   cosine, args, tmp)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32, help="batch for the quality / identity runs")
    parser.add_argument("--target-label", default="80%", help="variants whose label contains this get the 3x target")
    parser.add_argument("--no-torch", action="store_true", help="skip MiniLM (its export needs torch)")
    args = parser.parse_args()
    rows, notes, misses = [], [], []
    with tempfile.TemporaryDirectory(prefix="slimgraph-bench-") as tmp:
        for bench in ([digits] if args.no_torch else [digits, minilm]):
            r, n, m = bench(args, Path(tmp))
            rows += r
            notes += n
            misses += m
    table = common.markdown_table(
        ["model", "file (MB)", "smaller than shipped", "than optimized dense", "deflated (MB)", "max abs diff vs masked", "same ORT graph",
         "latency b1 (vs masked)", "session (ms)", "quality (no fine-tuning)"], rows)
    text = (f"# Unstructured 80% pruning, stored compactly (pack.sparse)\n\n{common.machine()}; ORT CPU, 2 threads, "
            f"batch 1, medians of {args.runs} interleaved runs; speed-up = 1 / median paired time ratio to the "
            "masked (pruned, dense-stored) model; control = a byte-identical copy of the masked file. "
            "Generated by `benchmarks/prune_sparse.py`.\n\n" + table + "\n\n" + "\n".join(notes) + "\n")
    common.write_result("prune_sparse", text)
    if misses:
        print("missed:", "; ".join(misses), file=sys.stderr)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
