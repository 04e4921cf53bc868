"""Property: random small Conv/MatMul/BatchNorm/Add/activation/LayerNorm graphs keep their
outputs and stay valid through lift_constants and every fusion pass, and each pass says
`modified` exactly when it changed the model."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import slimgraph
from slimgraph.ir.check import check
from slimgraph.passes import get_pass
from tests.helpers import assert_same_outputs, ops

PASSES = ["lift_constants", "fold_batchnorm", "fuse_conv_bias", "matmul_add_to_gemm",
          "fuse_activations", "fuse_layernorm"]
ACTIVATIONS = ["none", "relu", "silu", "hardswish", "hardsigmoid", "gelu", "gelu_tanh"]
#: Chains of up to ~40 float32 ops, GELU's tanh form among them, re-associated by fusion.
RTOL = 1e-4


def assume_well_conditioned(model, feeds: dict) -> None:
    """Skip drawn models whose float32 outputs are not themselves within RTOL / 10 of the
    float64 answer (outputs that are small differences of large terms): there, float32
    rounding alone moves them by more than the tolerance, whatever a pass does."""
    import torch

    from tests.helpers import ort_outputs

    with torch.no_grad():
        exact = slimgraph.to_torch(model.clone()).double()(torch.from_numpy(feeds["x"]).double())
    if not isinstance(exact, torch.Tensor):  # one output: a tensor, a tuple or a dict of one
        exact = next(iter(exact.values())) if isinstance(exact, dict) else exact[0]
    exact = exact.numpy()
    ours = next(iter(ort_outputs(model, feeds).values()))
    assume(np.max(np.abs(ours - exact)) <= RTOL / 10 * max(float(np.max(np.abs(exact))), 1e-12))


class Builder:
    """Appends nodes to a graph under construction; weights from a seeded generator."""

    def __init__(self, rng: np.random.Generator, opset: int, constant_nodes: bool):
        self.rng, self.opset, self.constant_nodes = rng, opset, constant_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}{self.count}"

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(oh.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, name: str = "c") -> str:
        array = np.asarray(value, dtype=np.float32 if np.asarray(value).dtype.kind == "f" else np.int64)
        out = self.name(name)
        if self.constant_nodes and array.ndim == 0:  # like old exporters: Constant nodes
            self.nodes.append(oh.make_node("Constant", [], [out], value=onh.from_array(array)))
        else:
            self.inits.append(onh.from_array(array, out))
        return out

    def weight(self, *shape: int, low: float = -1.0, high: float = 1.0) -> str:
        return self.const(self.rng.uniform(low, high, size=shape).astype(np.float32), "w")

    def binary(self, op_type: str, a: str, b: str) -> str:
        """A commutative op with its operands in random order."""
        return self.op(op_type, *((a, b) if self.rng.random() < 0.5 else (b, a)))

    def batchnorm(self, x: str, channels: int) -> str:
        params = [self.weight(channels, low=0.5, high=1.5), self.weight(channels),
                  self.weight(channels), self.weight(channels, low=0.5, high=2.0)]
        return self.op("BatchNormalization", x, *params, epsilon=1e-3)

    def activation(self, kind: str, x: str) -> str:
        c = self.const
        if kind == "relu":
            return self.op("Relu", x)
        if kind == "silu":
            return self.binary("Mul", x, self.op("Sigmoid", x))
        relu6 = self.op("Clip", self.binary("Add", x, c(3.0)), c(0.0), c(6.0))
        if kind == "hardsigmoid":
            return self.binary("Mul", relu6, c(1 / 6))
        if kind == "hardswish":
            return self.op("Div", self.binary("Mul", x, relu6), c(6.0))
        if kind == "gelu":
            erf = self.op("Erf", self.op("Div", x, c(math.sqrt(2))))
            return self.binary("Mul", self.binary("Mul", x, self.binary("Add", erf, c(1.0))), c(0.5))
        if kind == "gelu_tanh":
            cube = self.binary("Mul", self.binary("Mul", x, x), x)
            inner = self.binary("Add", x, self.binary("Mul", cube, c(0.044715)))
            tanh = self.op("Tanh", self.binary("Mul", inner, c(math.sqrt(2 / math.pi))))
            return self.binary("Mul", self.binary("Mul", x, c(0.5)), self.binary("Add", tanh, c(1.0)))
        return x

    def layernorm(self, x: str, width: int) -> str:
        def mean(v):
            if self.opset >= 18:
                return self.op("ReduceMean", v, self.const(np.array([-1]), "axes"))
            return self.op("ReduceMean", v, axes=[-1])

        d = self.op("Sub", x, mean(x))
        std = self.op("Sqrt", self.binary("Add", mean(self.op("Pow", d, self.const(2.0))), self.const(1e-5)))
        scaled = self.binary("Mul", self.op("Div", d, std), self.weight(width))
        return self.binary("Add", scaled, self.weight(width))


@st.composite
def models(draw):
    opset = draw(st.sampled_from([13, 17, 18, 20]))
    b = Builder(np.random.default_rng(draw(st.integers(0, 2**16))), opset, draw(st.booleans()))
    in_channels, size = draw(st.integers(2, 3)), 6
    channels, x = in_channels, "x"
    for _ in range(draw(st.integers(1, 2))):
        out_channels = draw(st.integers(2, 4))
        w = b.weight(out_channels, channels, 3, 3)
        conv_inputs = [x, w] + ([b.weight(out_channels)] if draw(st.booleans()) else [])
        y = b.op("Conv", *conv_inputs, pads=[1, 1, 1, 1])
        if draw(st.booleans()):  # a second Conv reading the same weight
            y = b.op("Add", y, b.op("Conv", x, w, pads=[1, 1, 1, 1]))
        if draw(st.booleans()):
            y = b.batchnorm(y, out_channels)
        bias_shape = draw(st.sampled_from([None, (out_channels, 1, 1), (1, out_channels, 1, 1), (size,)]))
        if bias_shape is not None:
            y = b.binary("Add", y, b.weight(*bias_shape))
        x, channels = b.activation(draw(st.sampled_from(ACTIVATIONS)), y), out_channels
    x = b.op("Flatten", x)
    width = channels * size * size
    for _ in range(draw(st.integers(0, 2))):
        out = draw(st.integers(3, 6))
        y = b.op("MatMul", x, b.weight(width, out))
        if draw(st.booleans()):
            y = b.binary("Add", y, b.weight(out))
        if draw(st.booleans()):
            y = b.batchnorm(y, out)
        if draw(st.booleans()):
            y = b.layernorm(y, out)
        x, width = b.activation(draw(st.sampled_from(ACTIVATIONS)), y), out
    shape = [2, in_channels, size, size]
    graph = oh.make_graph(b.nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                          [oh.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [2, width])], b.inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)
    return model, shape, draw(st.booleans())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_fusion_passes_keep_outputs_and_validity(case):
    proto, shape, infer_shapes_first = case
    model = slimgraph.load(proto)
    feeds = {"x": np.random.default_rng(1).normal(size=shape).astype(np.float32)}
    assume_well_conditioned(model, feeds)
    before = model.clone()
    if infer_shapes_first:
        get_pass("infer_shapes")()(model)
    for name in PASSES:
        snapshot = model.to_bytes()
        result = get_pass(name)()(model)
        assert result.modified == (model.to_bytes() != snapshot), name  # modified exactly when changed
    check(model)
    assert_same_outputs(before, model, feeds, rtol=RTOL)
    # Every BatchNormalization after a Conv whose weight nobody else reads is folded.
    for node in model.graph:
        if node.op_type == "BatchNormalization":
            producer = node.inputs[0].producer()
            assert producer is None or producer.op_type != "Conv" or len(producer.inputs[1].uses()) > 1, ops(model)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_optimize_recipe_keeps_outputs_and_terminates(case):
    # The whole cleanup+fusion pipeline, through the pass manager (fixed points included).
    proto, shape, _ = case
    model = slimgraph.load(proto)
    feeds = {"x": np.random.default_rng(2).normal(size=shape).astype(np.float32)}
    assume_well_conditioned(model, feeds)
    result = slimgraph.run(model, "optimize")
    check(result.model)
    assert_same_outputs(model, result.model, feeds, rtol=RTOL)
    again = slimgraph.run(result.model, "optimize")
    assert [n.op_type for n in again.model.graph] == [n.op_type for n in result.model.graph]
