"""Small test models for the quantization accuracy tools: ONNX text for the graph, numpy
arrays for the weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

import slimgraph
from slimgraph.ir import Model


def with_weights(text: str, **weights: np.ndarray) -> Model:
    """The model of `text` (onnx.parser syntax) with `weights` as initializers."""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(numpy_helper.from_array(np.asarray(a), name) for name, a in weights.items())
    onnx.checker.check_model(proto)
    return slimgraph.load(proto)


def spread_channels(rng: np.random.Generator, shape: tuple[int, ...], axis: int = 0, spread: float = 100.0) -> np.ndarray:
    """Random float32 weights whose channels along `axis` have ranges from 1/sqrt(spread)
    to sqrt(spread): what cross-layer equalization is for."""
    w = rng.standard_normal(shape)
    scales = np.geomspace(1 / np.sqrt(spread), np.sqrt(spread), shape[axis])
    rng.shuffle(scales)
    bshape = [1] * len(shape)
    bshape[axis] = -1
    return (w * scales.reshape(bshape)).astype(np.float32)
