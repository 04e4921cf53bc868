"""`make demo`: the main job end to end on a bundled example.

A small CNN (Conv+BatchNorm+ReLU blocks) trained on sklearn's digits at first run (cached
under ~/.cache/slimgraph) goes through two slimgraph recipes:

- `optimize` (exact: cleanup then fusion), verified against the original after every pass;
- `int8` (optimize, then static int8 quantization lowered to ORT's integer kernels),
  calibrated on 128 training images.

It prints the per-pass report and a table: nodes, file bytes, ORT latency, test top-1
and output error for the float model and both results.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.compare import diff_all

console = Console(highlight=False)


def main(out_dir: str = "out") -> int:
    t0 = time.perf_counter()
    with console.status("digits CNN: loading from cache (trained with torch on first run, ~20 s)"):
        path = zoo.digits_cnn()
    test = zoo.digits_test_data()
    labels = test.pop("labels")
    calib = {"input": zoo.digits_data().x_train[:128]}
    console.print(f"model: {path}  ({len(labels)} held-out test images, 128 training images to calibrate)")

    model = slimgraph.load(path)
    optimized = slimgraph.run(model, "optimize", data=calib, verify=True, progress=True)
    console.print(optimized.report.to_rich(changed_only=True))
    quantized = slimgraph.run(model, "int8", data=calib, progress=True)
    models = {"float (original)": model, "optimize (exact)": optimized.model, "int8": quantized.model}

    files = {"float (original)": Path(path)}
    for label, name in (("optimize (exact)", "digits.optimized.onnx"), ("int8", "digits.int8.onnx")):
        files[label] = slimgraph.save(models[label], Path(out_dir) / name)

    with console.status("evaluating on the test split and timing (300 interleaved runs each)"):
        outputs = {label: ort.run_batched(m, test) for label, m in models.items()}
        stats = ort.bench(models, {k: v[:1] for k, v in test.items()}, runs=300, warmup=30, threads=1)
    name = next(iter(outputs["float (original)"]))
    base = stats["float (original)"]

    t = Table(title="digits CNN: float vs `slimgraph run -p optimize` vs `-p int8`")
    t.add_column("")
    for label in models:
        t.add_column(label, justify="right")
    t.add_row("nodes", *(str(len(m.graph)) for m in models.values()))
    t.add_row("ops", *(_ops(m) for m in models.values()))
    t.add_row("file bytes", *(f"{f.stat().st_size:,}" for f in files.values()))
    t.add_row("ORT latency (ms)", *(f"{s.median:.4f}" for s in stats.values()))
    t.add_row("speed-up vs float", *(f"{1 / s.ratio_to(base):.2f}x" for s in stats.values()))
    t.add_row("test top-1", *(f"{np.mean(o[name].argmax(-1) == labels):.2%}" for o in outputs.values()))
    ref = outputs["float (original)"]
    t.add_row("max output error (rel)", *(f"{diff_all(ref, o)[name].max_rel:.1e}" for o in outputs.values()))
    console.print(t)
    console.print(f"wrote {files['optimize (exact)']} and {files['int8']}; ORT CPU with its graph "
                  f"optimizations on, 1 thread, batch 1, spinning off, speed-up = median of paired "
                  f"ratios; demo took {time.perf_counter() - t0:.1f} s")
    return 0


def _ops(model) -> str:
    from collections import Counter

    return " ".join(f"{op}×{n}" for op, n in Counter(n.op_type for n in model.graph).most_common())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="slimgraph-demo-")))
