"""Eval functions the search tests pass as `--eval tests.search.evals:NAME`: each gets a
candidate's ONNX path and returns its accuracy (or fails on purpose)."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def _test_split() -> dict:
    from slimgraph import zoo

    return zoo.digits_test_data()


def digits_accuracy(path: str) -> dict:
    """Top-1 accuracy of a digits model on the cached test split (360 real images)."""
    from slimgraph.backends import ort

    d = _test_split()
    logits = next(iter(ort.run_batched(path, {"input": d["input"]}).values()))
    return {"accuracy": float((logits.argmax(-1) == d["labels"]).mean()), "samples": len(d["labels"])}


def _ops(path: str) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(path).graph.node}


def raises_for_quantized(path: str) -> float:
    """Raises for integer models (deliberately), the accuracy otherwise."""
    if any(op.startswith("QLinear") or op.endswith("Integer") for op in _ops(path)):
        raise RuntimeError(f"deliberate failure for the quantized candidate {path}")
    return digits_accuracy(path)["accuracy"]


def nan_for_pruned(path: str) -> float:
    """NaN for models with many zero weights (pruned), the accuracy otherwise."""
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer]
    if any(w.dtype == np.float32 and w.size > 64 and (w == 0).mean() > 0.3 for w in weights):
        return float("nan")
    return digits_accuracy(path)["accuracy"]
