"""Small models and checks shared by the static quantization tests."""

from __future__ import annotations

import collections

import numpy as np
import onnx

import slimgraph
from slimgraph.backends import ort
from slimgraph.backends.op_kinds import OpKind
from slimgraph.ir.model import Model

#: Runtime ops that multiply-accumulate: none may run on float data in a quantized model.
MAC_RUNTIME_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose"}


def with_weights(text: str, **arrays: np.ndarray) -> Model:
    """Parse a model written as text whose weights are declared as graph inputs, and turn
    those inputs into initializers holding `arrays` (text cannot hold big constants)."""
    proto = onnx.parser.parse_model(text)
    keep = [v for v in proto.graph.input if v.name not in arrays]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    proto.graph.initializer.extend(
        onnx.numpy_helper.from_array(np.asarray(a, np.float32), name) for name, a in arrays.items())
    return slimgraph.load(proto)


def quantize(model: Model, data: dict, **config) -> tuple[Model, dict]:
    """quantize.static through the pass manager; returns (model, the pass's stats)."""
    args = ",".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in config.items())
    result = slimgraph.run(model, f"quantize.static({args})" if args else "quantize.static", data=data)
    return result.model, result.report.rows[-1].stats


def ops(model: Model) -> collections.Counter:
    return collections.Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in model.graph)


def outputs(model: Model, feeds: dict) -> dict[str, np.ndarray]:
    return ort.run(ort.session(model, threads=1), feeds)  # one thread: deterministic sums


def assert_integer_only(model: Model, feeds: dict) -> ort.RuntimeReport:
    """What ORT executes after its own optimizations: no float island, no MAC on float
    data, one QuantizeLinear per float input, at most one DequantizeLinear per output."""
    report = ort.runtime_report(model, feeds=feeds)
    assert report.float_islands() == [], report.float_islands()
    float_macs = [n.name for n in report.nodes if n.op_type in MAC_RUNTIME_OPS and n.kind == OpKind.FLOAT]
    assert float_macs == []
    counts = report.op_counts()
    float_inputs = [v for v in model.graph.inputs if v.dtype == onnx.TensorProto.FLOAT]
    assert counts["QuantizeLinear"] == len(float_inputs)
    assert counts["DequantizeLinear"] <= len(model.graph.outputs)
    return report


def error_in_steps(reference: np.ndarray, quantized: np.ndarray, levels: int = 255) -> float:
    """Largest |difference| in steps of an 8-bit quantization of the reference's range (the
    step of the output's own qparams, up to float rounding: compare with `STEP_SLACK`)."""
    step = (max(float(reference.max()), 0.0) - min(float(reference.min()), 0.0)) / levels
    return float(np.abs(reference.astype(np.float64) - quantized).max() / step)


#: the step is estimated from the reference's range, which can fall short of the calibrated one:
#: "n steps" means at most n + STEP_SLACK
STEP_SLACK = 0.02


def assert_within_steps(reference: np.ndarray, quantized: np.ndarray, steps: float, what: str = "") -> None:
    error = error_in_steps(reference, quantized)
    assert error <= steps + STEP_SLACK, f"{what}: {error:.3f} steps > {steps}"


def fake_quant_outputs(model: Model, data: dict, feeds: dict, **config) -> dict[str, np.ndarray]:
    """The float reference of a quantized model: the QDQ form, run by ORT with its graph
    optimizations off (so nothing is fused into integer kernels). It rounds every tensor as
    the integer model does; only accumulation order and requantization rounding differ,
    so an integer model should match it within about one output step."""
    qdq, _ = quantize(model, data, format="qdq", **config)
    return ort.run(ort.session(qdq, optimization="disable", threads=1), feeds)
