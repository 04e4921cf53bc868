"""quantize.fp8: float8 E4M3 (FLOAT8E4M3FN) QDQ weights for GPU runtimes (lossy).

Each constant float32 weight of a MatMul, Gemm or Conv is stored as float8 e4m3fn with
a float32 scale per output channel (or per tensor) and read through one
`DequantizeLinear(w_fp8, scale[, zero_point], axis)` (opset 19+; float8 zero points
are 0 of the same float8 type, so none is written):

    w ≈ float(fp8(w / s)) * s,   s = max|w| / 448   (448: E4M3FN's largest finite value)

fp8 rounding is to nearest even after clipping to [-448, 448] (saturating, as
QuantizeLinear does with saturate=1). E4M3 keeps 3 mantissa bits: every weight is within
2^-4 of its value relative to its binade (plus subnormals near 0).

With `activations=True` and sample data, each quantized op's float input also gets a
`QuantizeLinear -> DequantizeLinear` pair in float8 e4m3fn with a per-tensor scale
(calibrated max |x| / 448): the QDQ form TensorRT and other FP8 engines fuse into FP8
GEMMs/convolutions.

On ORT's CPU provider (measured with onnxruntime 1.32 on magika) there is no fp8 compute,
but the model loads and runs, with the dequantized weights' outputs: ORT's constant
folding leaves DequantizeLinear nodes alone (it keeps QDQ groups for its QDQ fusions),
so every run dequantizes the weights again and the layers lose weight pre-packing
(magika: 1.5x slower than float). With the session option
`session.disable_quant_qdq=1`, ORT folds each DequantizeLinear of a constant into a
float32 initializer at session start: float speed, and the file stays ~4x smaller.
Activation QDQ pairs run as QuantizeLinear/DequantizeLinear (float8) on CPU: correct,
slower. Needs opset >= 19 (`upgrade_opset` first: the fp8-weights recipe does).
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_ir as ir
import pydantic

from slimgraph.errors import PassError
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, int_range, register_pass
from slimgraph.passes.quantize._weights import GraphEditor, matches
from slimgraph.passes.rewrite import constant

logger = logging.getLogger("slimgraph.passes.quantize.fp8")

#: E4M3FN's largest finite magnitude.
E4M3_MAX = 448.0
OP_TYPES = ("MatMul", "Gemm", "Conv")
MIN_OPSET = 19


def to_e4m3(x: np.ndarray) -> np.ndarray:
    """float -> float8 e4m3fn (ml_dtypes), saturated to +-448, rounded to nearest even."""
    import ml_dtypes

    return np.clip(np.asarray(x, np.float32), -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def quantize_e4m3(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(float8 weight, float32 scale per channel along `axis`, or per tensor)."""
    if axis is None:
        bound = np.abs(w).max(initial=0.0)
    else:
        bound = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)
    scale = np.where(bound > 0, bound / E4M3_MAX, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    return to_e4m3(w / scale.reshape(shape)), scale


def dequantize_e4m3(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    shape = [1] * q.ndim
    if axis is not None:
        shape[axis] = -1
    return q.astype(np.float32) * scale.reshape(shape)


def _channel_axis(node: ir.Node, w: np.ndarray) -> int | str:
    """The output-channel axis of the node's weight, or why there is none."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return w.ndim - 1 if w.ndim >= 2 else "weight is 1-D"


@register_pass
class QuantizeFp8(Pass):
    """FP8 (E4M3FN) QDQ weights, per output channel, for GPU runtimes (lossy)."""

    name = "quantize.fp8"
    exact = False
    version = 1
    after = ("cleanup", "fuse", "optimize", "fold_*", "fuse_*", "matmul_add_to_gemm", "upgrade_opset",
             "quantize.smoothquant", "quantize.equalize")

    class Config(PassConfig):
        op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
        per_channel: bool = choice(True, False, default=True)
        #: also QDQ the inputs of the quantized ops (float8, per tensor; needs sample data)
        activations: bool = choice(False, True, default=False)
        exclude: tuple[str, ...] = ()
        min_weight_elements: int = int_range(0, 1 << 20, default=1024, log=True)

        @pydantic.field_validator("op_types")
        @classmethod
        def _known_ops(cls, v):
            unknown = sorted(set(v) - set(OP_TYPES))
            if unknown:
                raise ValueError(f"unknown op types {unknown}; quantize.fp8 handles {list(OP_TYPES)}")
            return tuple(v)

    def run(self, model, ctx) -> PassResult:
        cfg = self.config
        if model.opset < MIN_OPSET:
            raise PassError(self.name, f"float8 DequantizeLinear needs opset >= {MIN_OPSET}; the model has opset "
                                       f"{model.opset}: run upgrade_opset first (the fp8-weights recipe does)")
        if cfg.activations and not ctx.data:
            raise PassError(self.name, "activations=true needs sample data (--data D.npz) to choose the "
                                       "activation scales; or set activations=false (weights only)")
        editor = GraphEditor(model, self.name)
        stats: dict = {"weights": 0, "activations": 0, "skipped": collections.Counter()}
        done: dict[ir.Value, ir.Value] = {}
        targets: list[ir.Node] = []
        for node in list(model.graph):
            if node.domain not in ("", "ai.onnx") or node.op_type not in cfg.op_types:
                continue
            reason = self._weight(editor, node, done)
            if reason is None:
                stats["weights"] += 1
                targets.append(node)
            else:
                stats["skipped"][reason] += 1
        if cfg.activations and targets:
            stats["activations"] = self._activations(model, editor, targets, ctx)
        stats["weights_dropped"] = editor.drop_unused_weights()
        stats["skipped"] = dict(stats["skipped"])
        modified = stats["weights"] > 0
        if not modified:
            logger.warning("quantize.fp8 found nothing to quantize (%s)", stats["skipped"] or "no candidates")
        return PassResult(model, modified=modified, stats=stats)

    def _weight(self, editor: GraphEditor, node: ir.Node, done: dict) -> str | None:
        cfg = self.config
        value = node.inputs[1]
        if matches(node, cfg.exclude, value):
            return "excluded by pattern"
        w = constant(value)
        if w is None:
            return "weight is computed" if value is not None and value.producer() is not None else "weight is not a constant"
        if w.dtype != np.float32:
            return f"weight is {w.dtype}, not float32"
        if w.size < cfg.min_weight_elements:
            return "weight smaller than min_weight_elements"
        axis = _channel_axis(node, w) if cfg.per_channel else None
        if isinstance(axis, str):
            return axis
        if value not in done:
            q, scale = quantize_e4m3(w, axis)
            base = value.name or node.name
            wq = editor.initializer(ir.Tensor(q, dtype=ir.DataType.FLOAT8E4M3FN), f"{base}_e4m3")
            sv = editor.initializer(scale if axis is not None else scale.reshape(()), f"{base}_scale")
            attrs = {"axis": axis} if axis is not None else {}
            dq = editor.node("", "DequantizeLinear", [wq, sv], source=node, **attrs)
            dq.outputs[0].shape, dq.outputs[0].type = value.shape, value.type
            editor.graph.insert_before(node, dq)
            done[value] = dq.outputs[0]
        node.replace_input_with(1, done[value])
        editor.mark_replaced(value)
        return None

    def _activations(self, model, editor: GraphEditor, targets: list[ir.Node], ctx) -> int:
        from slimgraph.passes.quantize.observers import calibrate

        inputs = list(dict.fromkeys(n.inputs[0] for n in targets if n.inputs[0] is not None and n.inputs[0].name))
        ranges = calibrate(model, ctx.data, [v.name for v in inputs], progress=ctx.progress)
        for value in inputs:
            lo, hi = ranges[value.name]
            bound = float(max(abs(float(lo)), abs(float(hi))))
            scale = editor.initializer(np.float32(bound / E4M3_MAX if bound > 0 else 1.0), f"{value.name}_fp8_scale")
            zero = editor.initializer(ir.Tensor(to_e4m3(np.zeros((), np.float32)), dtype=ir.DataType.FLOAT8E4M3FN),
                                      f"{value.name}_fp8_zero")
            readers = [n for n in targets if n.inputs[0] is value]
            q = editor.node("", "QuantizeLinear", [value, scale, zero], source=readers[0])
            dq = editor.node("", "DequantizeLinear", [q.outputs[0], scale, zero], source=readers[0])
            dq.outputs[0].shape, dq.outputs[0].type = value.shape, value.type
            editor.graph.insert_before(readers[0], [q, dq])
            for reader in readers:
                reader.replace_input_with(0, dq.outputs[0])
        return len(inputs)
