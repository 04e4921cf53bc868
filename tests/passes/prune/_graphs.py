"""Small graphs with chosen weights for the unstructured-pruning and packing tests."""

from __future__ import annotations

import numpy as np

import slimgraph
from slimgraph.backends import ort

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, 64] x) => (float[B, 16] y) {
  h1 = MatMul(x, w1)
  a1 = Relu(h1)
  h2 = MatMul(a1, w2)
  a2 = Relu(h2)
  h3 = Gemm <transB = 1> (a2, w3)
  a3 = Relu(h3)
  y = MatMul(a3, w4)
}
"""


def mlp(seed: int = 0, scales=(1.0, 1.0, 1.0, 1.0)) -> slimgraph.Model:
    """x [B, 64] -> MatMul w1 [64, 64] -> MatMul w2 [64, 128] -> Gemm(transB) w3 [64, 128]
    -> MatMul w4 [64, 16]; w1 is the first layer, w4 the last."""
    from tests.passes.prune.conftest import build

    rng = np.random.default_rng(seed)
    shapes = {"w1": (64, 64), "w2": (64, 128), "w3": (64, 128), "w4": (64, 16)}
    weights = {k: (rng.standard_normal(s) * sc).astype(np.float32) for (k, s), sc in zip(shapes.items(), scales)}
    text = MLP.replace("g (float[B, 64] x)", "g (float[B, 64] x, " + ", ".join(
        f"float[{s[0]}, {s[1]}] {k}" for k, s in shapes.items()) + ")")
    return build(text, **weights)


def weight(model: slimgraph.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def digits_top1(model) -> float:
    from slimgraph import zoo

    data = zoo.digits_test_data()
    logits = ort.run(ort.session(model), {"input": data["input"]})["logits"]
    return float((logits.argmax(1) == data["labels"]).mean())
