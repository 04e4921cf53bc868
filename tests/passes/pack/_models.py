"""Real models the pack tests share: the digits models pruned, clustered and int8
quantized (no training: seconds), cached per process."""

from __future__ import annotations

import functools

import numpy as np

import slimgraph
from slimgraph import zoo


@functools.lru_cache(maxsize=None)
def quantized_digits(which: str = "cnn", sparsity: float = 0.85, k: int = 8) -> slimgraph.Model:
    """The digits CNN or MLP after prune.magnitude (all layers of >= 64 weights), k-means
    with `k` values per tensor and static int8 with per-tensor weights. Callers must not
    modify it (slimgraph.run clones its input)."""
    src = zoo.digits_cnn() if which == "cnn" else zoo.digits_mlp()
    data = {"input": zoo.digits_data().x_train[:128]}
    return slimgraph.run(src, f"optimize, strip_metadata, prune.magnitude(sparsity={sparsity}, keep_first_last=false, "
                         f"min_size=200), cluster.kmeans(k={k}, granularity=tensor, min_size=64), "
                         "upgrade_opset(target=21), quantize.static(per_channel=false)", data=data, progress=False).model


def logits(model) -> np.ndarray:
    """ORT's logits for the 360 test images (ORT's optimizations on: it folds the decoders)."""
    from slimgraph.backends import ort

    return ort.run(ort.session(model), {"input": zoo.digits_test_data()["input"]})["logits"]


def initializer_bytes(model) -> list[bytes]:
    """Every initializer's bytes, sorted: equal lists = the same tensors whatever their names."""
    return sorted(v.const_value.numpy().tobytes() for v in model.graph.initializers.values())


def optimized_graph(model, path) -> tuple[list[str], list[tuple]]:
    """(op types, sorted (dims, dtype, bytes) of the initializers) of the graph ORT runs after
    its optimizations: equal for a packed model and its dense original when ORT folded every
    decode back into the very same weights."""
    import onnx

    from slimgraph.backends import ort

    ort.session(model, optimized_model_path=path)
    graph = onnx.load(str(path)).graph
    inits = sorted((tuple(t.dims), t.data_type, onnx.numpy_helper.to_array(t).tobytes()) for t in graph.initializer)
    return [n.op_type for n in graph.node], inits
