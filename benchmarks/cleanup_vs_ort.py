"""slimgraph's cleanup+fusion pipeline against ONNX Runtime's own offline optimizer.

For each model (magika, every silero-vad variant, ResNet-18 and MobileNetV2 shapes):

1. slimgraph: load -> `cleanup,fuse` -> save; ORT: a session at `ORT_ENABLE_BASIC` that
   writes its optimized graph (`optimized_model_filepath`). Wall time of each.
2. Node counts (main graph / including `If` subgraphs). Target: slimgraph <= ORT.
3. Outputs of both against the original on the same inputs, all three run with ORT's
   optimizations disabled (so the graphs are compared, not ORT's runtime fusions).
   Target: slimgraph within 1e-5 relative (max |a-b| / max |a| per output).
4. Latency, ORT at optimization `all` and `disable`, `--threads` threads (2), spinning
   off, the four sessions interleaved round-robin, medians of `--runs` runs, and each
   model's paired ratio to the original (`BenchStats.ratio_to`); "control" is the original
   timed against itself: its distance from 1.00 is the noise floor of the table.

Exit status 1 when a target is missed, so `make bench` shows it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

import slimgraph  # noqa: E402
from slimgraph.backends import ort  # noqa: E402
from slimgraph.compare import diff_all, worst_rel  # noqa: E402

RTOL = 1e-5


def node_counts(path: Path) -> tuple[int, int]:
    model = slimgraph.load(path)
    return len(model.graph), sum(1 for _ in model.nodes(recursive=True))


def max_rel_error(reference: Path, other: Path, samples: list[dict]) -> float:
    # One thread: the comparison must not depend on how work is split between threads.
    a = ort.session(reference, optimization="disable", threads=1)
    b = ort.session(other, optimization="disable", threads=1)
    return max(worst_rel(diff_all(ort.run(a, f), ort.run(b, f))) for f in samples)


def measure(case: common.Case, pipeline: str, samples: int, runs: int, threads: int, tmp: Path) -> dict:
    slim_path, ort_path = tmp / f"{case.path.stem}.slim.onnx", tmp / f"{case.path.stem}.ort.onnx"
    start = time.perf_counter()
    result = slimgraph.run(case.path, pipeline, verify=False)
    slimgraph.save(result.model, slim_path)
    slim_s = time.perf_counter() - start
    start = time.perf_counter()
    ort.session(case.path, optimization="basic", optimized_model_path=ort_path)
    ort_s = time.perf_counter() - start

    feeds = case.samples(samples)
    row = {
        "model": case.name, "before": node_counts(case.path), "slim": node_counts(slim_path),
        "ort": node_counts(ort_path), "slim_s": slim_s, "ort_s": ort_s,
        "slim_err": max_rel_error(case.path, slim_path, feeds),
        "ort_err": max_rel_error(case.path, ort_path, feeds),
    }
    models = {"original": case.path, "control": case.path, "slimgraph": slim_path, "ORT basic": ort_path}
    for level in ("all", "disable"):
        row[level] = ort.bench(models, feeds[0], runs=runs, warmup=5, threads=threads, optimization=level)
    return row


def tables(rows: list[dict], pipeline: str, runs: int, threads: int) -> str:
    def fmt(counts: tuple[int, int]) -> str:
        return f"{counts[0]}" if counts[0] == counts[1] else f"{counts[0]} / {counts[1]}"

    structure = common.markdown_table(
        ["model", "nodes before", "slimgraph", "ORT basic", "slimgraph <= ORT", "max rel err slimgraph",
         "max rel err ORT basic", "slimgraph s (load+run+save)", "ORT s (load+optimize+save)"],
        [[r["model"], fmt(r["before"]), fmt(r["slim"]), fmt(r["ort"]),
          "yes" if r["slim"][1] <= r["ort"][1] else "**NO**", f"{r['slim_err']:.1e}", f"{r['ort_err']:.1e}",
          f"{r['slim_s']:.2f}", f"{r['ort_s']:.2f}"] for r in rows],
    )
    latency = []
    for level in ("all", "disable"):
        latency.append(f"\n### ORT latency at optimization `{level}`: median ms (paired ratio to original)\n")
        latency.append(common.markdown_table(
            ["model", "original", "control", "slimgraph", "ORT basic"],
            [[r["model"], f"{r[level]['original'].median:.3f}",
              *(f"{r[level][k].median:.3f} ({r[level][k].ratio_to(r[level]['original']):.2f})"
                for k in ("control", "slimgraph", "ORT basic"))] for r in rows],
        ))
    wins = sum(r["slim"][1] <= r["ort"][1] for r in rows)
    exact = sum(r["slim_err"] <= RTOL for r in rows)
    return "\n".join([
        f"# slimgraph `{pipeline}` vs ORT's offline optimizer (ORT_ENABLE_BASIC)\n",
        f"Machine: {common.machine()}. Latency: {threads} threads, spinning off, sessions interleaved "
        f"round-robin, median of {runs} runs after 5 warm-up runs; the ratio is the median over rounds "
        "of time / the original's time in the same round. Node counts: main graph / including "
        "subgraphs (one number when equal). Errors: max |a-b| / max |a| over outputs and samples, "
        "all models run with ORT optimizations off.\n",
        f"**slimgraph <= ORT on {wins}/{len(rows)} models; "
        f"outputs within {RTOL:g} on {exact}/{len(rows)}.**\n",
        "## Node counts, output equality, optimization time\n",
        structure, *latency,
    ])


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(rows)))
    names = [r["model"] for r in rows]
    for i, (key, label) in enumerate((("before", "original"), ("ort", "ORT basic"), ("slim", "slimgraph"))):
        ax.barh([y + (i - 1) * 0.27 for y in range(len(rows))], [r[key][1] for r in rows], 0.27, label=label)
    ax.set_yticks(range(len(rows)), names)
    ax.set_xscale("log")
    counts = [r[key][1] for r in rows for key in ("before", "ort", "slim")]
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
             if min(counts) / 2 <= t <= 2 * max(counts)]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("nodes, including subgraphs (log scale)")
    ax.invert_yaxis()
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="cleanup,fuse")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16, help="inputs per model for the equality check")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch-defined models")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="slimgraph-bench-") as tmp:
        for case in common.all_cases(torch_models=not args.no_torch):
            print(f"{case.name} ...", file=sys.stderr, flush=True)
            rows.append(measure(case, args.pipeline, args.samples, args.runs, args.threads, Path(tmp)))
    common.write_result("cleanup_vs_ort", tables(rows, args.pipeline, args.runs, args.threads))
    plot(rows, common.RESULTS / "cleanup_vs_ort.png")
    missed = [r["model"] for r in rows if r["slim"][1] > r["ort"][1] or r["slim_err"] > RTOL]
    if missed:
        print(f"targets missed on: {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
