"""Is a factorized layer faster on ORT CPU? Time it alone, dense and as its pair.

Each layer becomes two one-layer models with random weights of the real shapes (values do
not change dense kernels' speed): the dense op, and the factorized ops, fed at batch 1 at
the layer's real input shape. Both run interleaved in one `ort.bench` call (2 threads,
spinning off, `RUNS` rounds) and the paired median ratio decides. Results are cached per
(ops, shapes, attributes) for the life of the process: the transformer blocks of a model
repeat the same few shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx.helper as oh

RUNS = 20
WARMUP = 3
THREADS = 2
#: A layer is factorized only when the pair takes at most this fraction of the dense time:
#: the margin keeps run-to-run noise (a few percent on a shared machine) from deciding.
MAX_RATIO = 0.95

_CACHE: dict[tuple, float] = {}

#: One op of a one-layer model: (op_type, [weight shapes], attributes).
Op = tuple[str, Sequence[tuple[int, ...]], dict]


def _key(ops: Sequence[Op]) -> tuple:
    return tuple((op, tuple(map(tuple, shapes)), tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                               for k, v in attrs.items())))
                 for op, shapes, attrs in ops)


def _model(input_shape: Sequence[int], ops: Sequence[Op], opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i, (op, shapes, attrs) in enumerate(ops):
        names = []
        for j, shape in enumerate(shapes):
            name = f"w{i}_{j}"
            inits.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.05, name))
            names.append(name)
        nodes.append(oh.make_node(op, [prev, *names], [f"y{i}"], **attrs))
        prev = f"y{i}"
    graph = oh.make_graph(nodes, "layer", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(input_shape))],
                          [oh.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, None)], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


def time_ratio(input_shape: Sequence[int], dense: Sequence[Op], pair: Sequence[Op], opset: int = 17) -> float:
    """Median over rounds of the pair's time / the dense layer's time (cached per shape)."""
    from slimgraph.backends import ort

    key = (tuple(input_shape), _key(dense), _key(pair), opset)
    if key not in _CACHE:
        x = np.random.default_rng(1).standard_normal(input_shape).astype(np.float32)
        stats = ort.bench({"dense": _model(input_shape, dense, opset), "pair": _model(input_shape, pair, opset)},
                          {"x": x}, runs=RUNS, warmup=WARMUP, threads=THREADS)
        _CACHE[key] = stats["pair"].ratio_to(stats["dense"])
    return _CACHE[key]
