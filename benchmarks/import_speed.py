"""How fast slimgraph imports, cleans, fuses and saves a model, per node, and how much
memory it takes.

Models: a synthetic 10,000-node graph (`synthetic_model`: blocks of MatMul/Add/Relu with a
duplicated subexpression, a Constant bias, an Identity, a dead node and a foldable
constant product, so every cleanup pass has work) and the real models of `common`.

Stages: import (`slimgraph.load` from a file), each pipeline item run on its own
(`slimgraph.run(model, "cleanup")`, then `"fuse"`, no verification), save (`slimgraph.save`).
Memory: the process's resident set size (RSS, psutil) sampled every 2 ms in a background
thread; a stage's figure is its peak RSS minus the RSS when it started (so it counts
protobuf and numpy buffers, which tracemalloc would miss, and can miss spikes shorter than
2 ms). Freed heap is returned to the OS between stages (glibc `malloc_trim`) so a stage is
not credited with memory an earlier one left behind.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
import time
from pathlib import Path

import common
from common import PeakRSS
import numpy as np
import onnx
import psutil
from onnx import helper, numpy_helper

import slimgraph
from slimgraph.backends import ort
from slimgraph.compare import diff_all, worst_rel

BLOCK_NODES = 12


def synthetic_model(nodes: int = 10_000, width: int = 16, seed: int = 0) -> onnx.ModelProto:
    """A chain of `nodes // 12` blocks on a [1, width] activation; see the module docstring."""
    rng = np.random.default_rng(seed)
    graph_nodes, weights, h = [], [], "x"
    for i in range(nodes // BLOCK_NODES):
        w, bias = f"w{i}", rng.standard_normal(width).astype(np.float32) * 0.1
        weights.append(numpy_helper.from_array((rng.standard_normal((width, width)) * 2 / np.sqrt(width)).astype(np.float32), w))
        graph_nodes += [
            helper.make_node("Constant", [], [f"b{i}"], value=numpy_helper.from_array(bias)),
            helper.make_node("MatMul", [h, w], [f"m{i}"]),
            helper.make_node("MatMul", [h, w], [f"m{i}_dup"]),  # CSE merges it
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Add", [f"m{i}_dup", f"b{i}"], [f"a{i}_dup"]),
            helper.make_node("Add", [f"a{i}", f"a{i}_dup"], [f"s{i}"]),
            helper.make_node("Relu", [f"s{i}"], [f"r{i}"]),
            helper.make_node("Identity", [f"r{i}"], [f"id{i}"]),
            helper.make_node("Neg", [f"r{i}"], [f"dead{i}"]),  # unused: dead code
            helper.make_node("Constant", [], [f"k{i}"], value_float=0.5),
            helper.make_node("Mul", [f"k{i}", f"k{i}"], [f"kk{i}"]),  # folds to 0.25
            helper.make_node("Mul", [f"id{i}", f"kk{i}"], [f"h{i}"]),
        ]
        h = f"h{i}"
    graph = helper.make_graph(
        graph_nodes, "synthetic",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(h, onnx.TensorProto.FLOAT, [1, width])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory stays in the process
        pass


def measure(name: str, path: Path, stages: list[str], out: Path) -> dict:
    _release_memory()
    row = {"model": name, "stages": {}}
    timings, model, base = {}, None, psutil.Process().memory_info().rss
    steps = [("import", lambda _: slimgraph.load(path))]
    steps += [(stage, lambda m, s=stage: slimgraph.run(m, s, verify=False).model) for stage in stages]
    steps += [("save", lambda m: (slimgraph.save(m, out), m)[1])]
    for stage, step in steps:
        _release_memory()
        with PeakRSS() as rss:
            start = time.perf_counter()
            model = step(model)
            timings[stage] = time.perf_counter() - start
        row["stages"][stage] = (timings[stage], rss.delta_mb)
        row["peak_mb"] = max(row.get("peak_mb", 0.0), (rss.peak - base) / 2**20)
        if stage == "import":
            row["nodes_in"] = sum(1 for _ in model.nodes(recursive=True))
    row["nodes_out"] = sum(1 for _ in model.nodes(recursive=True))
    row["us_per_node"] = sum(timings.values()) / row["nodes_in"] * 1e6
    return row


def check_synthetic(original: Path, processed: Path) -> float:
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)}
    a = ort.run(ort.session(original, optimization="disable", threads=1), feeds)
    b = ort.run(ort.session(processed, optimization="disable", threads=1), feeds)
    return worst_rel(diff_all(a, b))


def table(rows: list[dict], stages: list[str], synthetic_err: float) -> str:
    names = ["import", *stages, "save"]
    headers = ["model", "nodes in", "nodes out", *(f"{s} ms" for s in names), "total µs/node",
               *(f"{s} ΔRSS MB" for s in names), "peak RSS above start MB"]
    body = [
        [r["model"], r["nodes_in"], r["nodes_out"], *(f"{r['stages'][s][0] * 1e3:.0f}" for s in names),
         f"{r['us_per_node']:.0f}", *(f"{r['stages'][s][1]:.1f}" for s in names), f"{r['peak_mb']:.1f}"]
        for r in rows
    ]
    return "\n".join([
        "# slimgraph import -> cleanup -> fuse -> save: time per node and memory\n",
        f"Machine: {common.machine()}. Each pipeline item runs as its own `slimgraph.run` "
        "(verification off). Memory: RSS sampled every 2 ms (psutil); a stage's ΔRSS is its peak "
        "minus the RSS at its start; the last column is the peak over all stages minus the RSS "
        "before import.\n",
        f"The synthetic model's output after the pipeline matches the original within "
        f"{synthetic_err:.1e} relative.\n",
        common.markdown_table(headers, body),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="cleanup,fuse", help="items timed one by one")
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--no-torch", action="store_true", help="skip the torch-defined models")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.pipeline.split(",") if s.strip()]

    with tempfile.TemporaryDirectory(prefix="slimgraph-import-") as tmp:
        tmp = Path(tmp)
        synthetic = tmp / "synthetic.onnx"
        onnx.save(synthetic_model(args.nodes), synthetic)
        rows = [measure("synthetic", synthetic, stages, tmp / "synthetic.out.onnx")]
        synthetic_err = check_synthetic(synthetic, tmp / "synthetic.out.onnx")
        for case in common.all_cases(torch_models=not args.no_torch):
            print(f"{case.name} ...", file=sys.stderr, flush=True)
            rows.append(measure(case.name, case.path, stages, tmp / f"{case.path.stem}.out.onnx"))
    common.write_result("import_speed", table(rows, stages, synthetic_err))
    return 0 if synthetic_err <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
