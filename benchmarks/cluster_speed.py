"""How long `cluster.kmeans` takes on a 100 M-parameter model (25 MatMul weights of
2000 x 2000, random), per-channel and per-tensor codebooks, K = 16. Writes
benchmarks/results/cluster_speed.md."""

from __future__ import annotations

import sys
import time

import common
import numpy as np
import onnx
import onnx.helper as oh

import slimgraph


def big_model(layers: int = 25, width: int = 2000) -> slimgraph.Model:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        nodes.append(oh.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = oh.make_graph(nodes, "big", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, width])],
                          [oh.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, [1, width])], inits)
    return slimgraph.load(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))


def main() -> int:
    model = big_model()
    params = model.analysis("params")["params"]
    rows = []
    for granularity in ("channel", "tensor"):
        start = time.perf_counter()
        slimgraph.run(model, f"cluster.kmeans(k=16, granularity={granularity})", macs=False)
        rows.append([f"{params / 1e6:.0f} M", granularity, 16, f"{time.perf_counter() - start:.0f}"])
        print(rows[-1], flush=True)
    common.write_result("cluster_speed", "# cluster.kmeans on 100 M parameters\n\nMachine: " + common.machine()
                        + ". One run, wall time of the whole pass (the model is copied once by the pass manager).\n\n"
                        + common.markdown_table(["parameters", "codebooks", "K", "seconds"], rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
