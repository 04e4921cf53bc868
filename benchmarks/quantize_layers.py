"""Where int8 time goes: ORT's per-kernel profile of the float, ORT-quantized and
slimgraph int8 ResNet-18 / MobileNetV2 (the models of benchmarks/quantize.py), grouped by
convolution kind.

Why this exists: the issue asks for MobileNetV2 >= 1.6x. This table shows what ORT's CPU
kernels allow on this machine: each Conv of the float model is matched with the
QLinearConv that replaces it (same order in ORT's optimized graphs) and their kernel times
are summed per kind (stem, depthwise, 1x1 pointwise, other dense k x k). "conv-only
ceiling" is float Conv time / int8 QLinearConv time: the speed-up a graph would reach if
everything but the convolutions were free.

Timing: ORT CPU, 2 threads, spinning off, ORT's own profiler (per-kernel durations);
the sessions are profiled in turn, `--rounds` times, each round `--runs` runs after 10
warm-ups; per node the median over rounds of its mean time.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import common
import numpy as np
import onnx
import onnxruntime as rt
import quantize as qbench

KINDS = ("stem", "depthwise", "pointwise 1x1", "dense kxk")


def _profile(path: Path, feeds, runs: int, threads: int, tmp: Path, tag: str) -> tuple[dict[str, float], onnx.ModelProto]:
    so = rt.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / f"prof_{tag}")
    so.optimized_model_filepath = str(tmp / f"opt_{tag}.onnx")
    sess = rt.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(10):
        sess.run(None, feeds)
    for _ in range(runs):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"][: -len("_kernel_time")]] += e["dur"] / (runs + 10)
    return per_node, onnx.load(str(tmp / f"opt_{tag}.onnx"), load_external_data=False)


def _kind(node: onnx.NodeProto, first: bool) -> str:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if first:
        return "stem"
    if attrs.get("group", 1) > 1:
        return "depthwise"
    return "pointwise 1x1" if list(attrs.get("kernel_shape", [])) == [1, 1] else "dense kxk"


def breakdown(times: dict[str, float], graph: onnx.ModelProto, conv_ops: set[str]) -> tuple[list[tuple[str, float]], dict[str, float]]:
    convs = [n for n in graph.graph.node if n.op_type in conv_ops]
    per_conv = [(_kind(n, i == 0), times.get(n.name, 0.0)) for i, n in enumerate(convs)]
    other: dict[str, float] = collections.defaultdict(float)
    for n in graph.graph.node:
        if n.op_type not in conv_ops:
            other[n.op_type] += times.get(n.name, 0.0)
    return per_conv, dict(other)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    variants = {"float": ({"Conv"}, None), "ORT QOperator U8S8": ({"QLinearConv"}, qbench.ORT_QOP),
                "slimgraph int8": ({"QLinearConv"}, qbench.SLIM["int8"])}
    out = [f"# Where int8 time goes: per-kernel profile by convolution kind\n\nMachine: {common.machine()}. "
           f"{args.threads} threads, spinning off, ORT profiler, median over {args.rounds} rounds of "
           f"{args.runs} runs. Times in microseconds per inference (kernel time only).\n"]
    for subject in qbench.torch_subjects():
        paths = {label: (subject.path if tool is None else qbench.build(subject, tool).path)
                 for label, (_, tool) in variants.items()}
        feeds = subject.feeds[1]
        samples: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
        graphs: dict[str, onnx.ModelProto] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for label, path in paths.items():
                    times, graphs[label] = _profile(path, feeds, args.runs, args.threads, Path(tmp), f"{label}{r}")
                    samples[label].append(times)
        medians = {label: {k: float(np.median([s.get(k, 0.0) for s in runs])) for k in runs[0]}
                   for label, runs in samples.items()}
        parts = {label: breakdown(medians[label], graphs[label], variants[label][0]) for label in variants}
        n_convs = {label: len(p[0]) for label, p in parts.items()}
        if len(set(n_convs.values())) != 1:
            print(f"{subject.name}: conv counts differ {n_convs}", file=sys.stderr)
            return 1
        rows = []
        for kind in KINDS:
            f = sum(t for k, t in parts["float"][0] if k == kind)
            if not f:
                continue
            cells = [kind, sum(1 for k, _ in parts["float"][0] if k == kind), f]
            for label in list(variants)[1:]:
                q = sum(t for k, t in parts[label][0] if k == kind)
                cells += [q, f"{f / q:.2f}x"]
            rows.append(cells)
        totals = {label: sum(t for _, t in p[0]) for label, p in parts.items()}
        others = {label: sum(p[1].values()) for label, p in parts.items()}
        row_conv = ["all convolutions", sum(n_convs.values()) // 3, totals["float"]]
        row_other = ["everything else", "", others["float"]]
        row_all = ["whole graph", "", totals["float"] + others["float"]]
        for label in list(variants)[1:]:
            row_conv += [totals[label], f"{totals['float'] / totals[label]:.2f}x (conv-only ceiling)"]
            row_other += [others[label], ", ".join(f"{k} {v:.0f}" for k, v in sorted(parts[label][1].items(), key=lambda kv: -kv[1])[:4])]
            whole = totals[label] + others[label]
            row_all += [whole, f"{(totals['float'] + others['float']) / whole:.2f}x"]
        rows += [row_conv, row_other, row_all]
        headers = ["layers", "count", "float us"]
        for label in list(variants)[1:]:
            headers += [f"{label} us", f"{label} speed-up"]
        out.append(f"## {subject.name}\n\n" + common.markdown_table(headers, rows) + "\n")
    common.write_result("quantize_layers", "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
