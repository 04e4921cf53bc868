"""`make demo`: the main job end to end on a bundled example.

A small CNN (Conv+BatchNorm+ReLU blocks) trained on sklearn's digits at first run (cached
under ~/.cache/slimgraph) goes through slimgraph's exact `optimize` recipe (cleanup then
fusion) with verification after every pass; the demo prints the per-pass report and a
before/after table: nodes, file bytes, ORT latency, test top-1, max output error.
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
    console.print(f"model: {path}  ({len(labels)} held-out test images)")

    model = slimgraph.load(path)
    calib = {k: v[:16] for k, v in test.items()}
    result = slimgraph.run(model, "optimize", data=calib, verify=True, progress=True)
    console.print(result.report.to_rich(changed_only=True))

    out = Path(out_dir) / "digits.slim.onnx"
    slimgraph.save(result.model, out)

    with console.status("evaluating both models on the test split"):
        ref = ort.run_batched(model, test)
        new = ort.run_batched(result.model, test)
    diffs = diff_all(ref, new)
    name = next(iter(ref))
    top1 = {k: float(np.mean(o[name].argmax(-1) == labels)) for k, o in (("before", ref), ("after", new))}

    feeds = {k: v[:1] for k, v in test.items()}
    stats = {}
    for level in ("disable", "all"):
        runs = ort.bench({"before": model, "after": result.model}, feeds, runs=300, warmup=30,
                         threads=1, optimization=level)
        stats[level] = runs

    sizes = {"before": Path(path).stat().st_size, "after": out.stat().st_size}
    nodes = {"before": len(model.graph), "after": len(result.model.graph)}
    t = Table(title="digits CNN: before vs after `slimgraph run -p optimize`")
    for col in ("", "before", "after", "change"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("nodes", str(nodes["before"]), str(nodes["after"]), f"{nodes['after'] - nodes['before']:+d}")
    t.add_row("ops", _ops(model), _ops(result.model), "")
    t.add_row("file bytes", f"{sizes['before']:,}", f"{sizes['after']:,}", f"{sizes['after'] / sizes['before']:.2f}x")
    for level, label in (("disable", "ORT latency, ORT graph opts off (ms)"), ("all", "ORT latency, ORT graph opts on (ms)")):
        b, a = stats[level]["before"].median, stats[level]["after"].median
        t.add_row(label, f"{b:.4f}", f"{a:.4f}", f"{b / a:.2f}x faster")
    t.add_row("test top-1", f"{top1['before']:.2%}", f"{top1['after']:.2%}", f"{(top1['after'] - top1['before']) * 100:+.2f} pt")
    d = diffs[name]
    t.add_row("max output error", "", f"{d.max_abs:.2e} abs, {d.max_rel:.2e} rel", "")
    console.print(t)
    console.print(f"wrote {out}; median of 300 interleaved runs, 1 thread, batch 1, "
                  f"spinning off; demo took {time.perf_counter() - t0:.1f} s")
    return 0


def _ops(model) -> str:
    from collections import Counter

    return " ".join(f"{op}×{n}" for op, n in Counter(n.op_type for n in model.graph).most_common())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="slimgraph-demo-")))
