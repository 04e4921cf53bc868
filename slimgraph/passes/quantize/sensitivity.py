"""quantize.sensitivity: how much each layer alone hurts the outputs when quantized.

For every layer with a constant weight (Conv, Gemm, MatMul; `_layers.find_layers`), a
copy of the model is quantized at that layer only, simulated in float (fake quantization):

- its weight is rounded as quantize.static rounds it (int8, symmetric, per output
  channel, `bits` wide as static's `weight_bits`: "auto" = 7 on x86 without VNNI) and
  stored as the dequantized float values;
- its input activation goes through QuantizeLinear -> DequantizeLinear (uint8,
  asymmetric, per tensor) with the range calibration gives it (`method`); the other
  readers of that activation still see the float tensor.

The copy runs on the first `samples` samples of the data and its outputs are compared
with the float model's: error = ||y_q - y|| / ||y|| over every float output and sample,
SQNR = -20 log10(error) dB. Rank 1 is the lowest SQNR, the most sensitive layer.

The pass only annotates (`quantize.sqnr` in dB, `quantize.sensitivity_rank`, on each
layer node, persistent) and reports the ranking in its statistics; it is `modified` when
an annotation was written or changed. `simulate` and `OutputError` are shared with
quantize.mixed_precision; `layer_report` reads the annotations back (SQNR, rank, the
precision mixed precision chose) for a per-layer table.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, int_range, register_pass
from slimgraph.passes.quantize._layers import (
    BITS_CHOICES, LAYER_OPS, Layer, fake_quantize_weight, find_layers, fresh_name, new_initializer, set_weight,
    weight_bits,
)
from slimgraph.passes.quantize.observers import METHODS, calibrate, stream
from slimgraph.passes.quantize.qparams import QParams

logger = logging.getLogger("slimgraph.passes.quantize.sensitivity")

SQNR_KEY = "quantize.sqnr"
RANK_KEY = "quantize.sensitivity_rank"
#: SQNR reported for an output left exactly as it was
EXACT_SQNR = 300.0


@dataclasses.dataclass
class LayerSensitivity:
    name: str
    op_type: str
    #: relative RMS output error with only this layer quantized
    error: float
    sqnr: float
    rank: int = 0


def sqnr_db(error: float) -> float:
    return EXACT_SQNR if error <= 10 ** (-EXACT_SQNR / 20) else float(-20 * np.log10(error))


# --- simulation ----------------------------------------------------------------------------------
def activation_ranges(model: Model, layers: Sequence[Layer], data, *, method: str,
                      progress: bool) -> dict[str, QParams]:
    """uint8 qparams of each layer's input activation, from calibration."""
    names = sorted({layer.activation.name for layer in layers})
    ranges = calibrate(model, data, names, method=method, progress=progress)
    return {name: QParams.from_range(lo, hi, dtype="uint8") for name, (lo, hi) in ranges.items()}


def simulate(model: Model, quantized: Sequence[Layer], qparams: Mapping[str, QParams], *,
             bits: str | int = "auto", target: str = "cpu") -> Model:
    """A copy of `model` with the layers `quantized` (layers of `model`) fake-quantized:
    rounded weights (`bits` as quantize.static's `weight_bits`, see `_layers.weight_bits`),
    and QuantizeLinear/DequantizeLinear on their input activations."""
    copy = model.clone()
    position = {node: i for i, node in enumerate(model.graph)}
    nodes = list(copy.graph)
    dequantized: dict[str, ir.Value] = {}  # one Q/DQ pair per activation, shared by its layers
    for layer in quantized:
        twin = LAYER_OPS[layer.node.op_type](nodes[position[layer.node]])
        set_weight(copy, twin, fake_quantize_weight(twin, weight_bits(twin, bits, target)))
        x = twin.activation
        if x.name not in dequantized:
            dequantized[x.name] = _qdq(copy, x, qparams[x.name], before=twin.node)
        twin.node.replace_input_with(0, dequantized[x.name])
    return copy


def _qdq(model: Model, x: ir.Value, q: QParams, before: ir.Node) -> ir.Value:
    scale = new_initializer(model, q.scale.reshape(()), f"{x.name}_sim_scale")
    zero = new_initializer(model, q.zero_point.reshape(()), f"{x.name}_sim_zero_point")
    quant = ir.node("QuantizeLinear", [x, scale, zero], name=fresh_name(model, f"{x.name}_sim_q"))
    dequant = ir.node("DequantizeLinear", [quant.outputs[0], scale, zero], name=fresh_name(model, f"{x.name}_sim_dq"))
    quant.outputs[0].name = fresh_name(model, f"{x.name}_sim_quantized")
    dequant.outputs[0].name = fresh_name(model, f"{x.name}_sim_dequantized")
    dequant.outputs[0].type, dequant.outputs[0].shape = x.type, x.shape
    producer = x.producer()
    if producer is not None and producer.graph is model.graph:
        model.graph.insert_after(producer, [quant, dequant])
    else:
        model.graph.insert_before(before, [quant, dequant])
    return dequant.outputs[0]


class OutputError:
    """The float model's outputs on the data, kept to score copies of it against them.

    `error(copy)`: ||y_q - y|| / ||y|| over all float outputs and samples;
    `outputs(copy)`: the copy's outputs, concatenated over the samples (for a user metric).
    """

    def __init__(self, model: Model, data: Mapping[str, np.ndarray], *, progress: bool = False):
        self.data = data
        self.progress = progress
        self.names = [v.name for v in model.graph.outputs]
        self.reference = self._run(model, "float reference")
        self.float_names = [n for n in self.names if np.issubdtype(self.reference[0][n].dtype, np.floating)]
        if not self.float_names:
            raise PassError("quantize.sensitivity", f"the model has no float output (outputs {self.names})")
        self.signal = sum(float(np.sum(r[n].astype(np.float64) ** 2)) for r in self.reference for n in self.float_names)

    def _run(self, model: Model, description: str) -> list[dict[str, np.ndarray]]:
        return [dict(out) for _, _, out in stream(model, self.data, self.names, progress=self.progress,
                                                  description=description, where="quantize.sensitivity")]

    def error(self, model: Model, description: str = "simulating") -> float:
        runs = self._run(model, description)
        noise = sum(float(np.sum((run[n].astype(np.float64) - ref[n]) ** 2))
                    for run, ref in zip(runs, self.reference, strict=True) for n in self.float_names)
        return float(np.sqrt(noise / self.signal)) if self.signal > 0 else float(np.sqrt(noise))

    def outputs(self, model: Model | None = None) -> dict[str, np.ndarray]:
        runs = self.reference if model is None else self._run(model, "simulating")
        return {n: np.concatenate([r[n] for r in runs]) if runs[0][n].ndim else np.stack([r[n] for r in runs])
                for n in self.names}


# --- analysis ------------------------------------------------------------------------------------
def layer_sensitivity(model: Model, data: Mapping[str, np.ndarray], *, method: str = "minmax",
                      samples: int = 64, bits: str | int = "auto", target: str = "cpu", progress: bool = False,
                      layers: Sequence[Layer] | None = None,
                      reference: OutputError | None = None) -> list[LayerSensitivity]:
    """Each layer's sensitivity (module docstring), most sensitive first."""
    layers = list(layers) if layers is not None else find_layers(model)[0]
    data = {k: v[:samples] for k, v in data.items()}
    reference = reference or OutputError(model, data, progress=progress)
    qparams = activation_ranges(model, layers, data, method=method, progress=progress)
    found = []
    for i, layer in enumerate(layers):
        err = reference.error(simulate(model, [layer], qparams, bits=bits, target=target),
                              f"sensitivity {i + 1}/{len(layers)}: {layer.name}")
        found.append(LayerSensitivity(layer.name, layer.node.op_type, err, sqnr_db(err)))
    ranked = sorted(found, key=lambda s: -s.error)
    for rank, s in enumerate(ranked, start=1):
        s.rank = rank
    return ranked


def annotate_sensitivity(model: Model, layers: Sequence[Layer], ranking: Sequence[LayerSensitivity]) -> bool:
    """Write `quantize.sqnr` and `quantize.sensitivity_rank` on the layer nodes; True when
    any annotation changed."""
    by_name = {s.name: s for s in ranking}
    changed = False
    for layer in layers:
        s = by_name[layer.name]
        for key, value in ((SQNR_KEY, round(s.sqnr, 3)), (RANK_KEY, s.rank)):
            if Model.annotation(layer.node, key) != value:
                Model.annotate(layer.node, key, value)
                changed = True
    return changed


def layer_report(model: Model) -> list[dict]:
    """One row per node annotated by quantize.sensitivity / quantize.mixed_precision, most
    sensitive first: {"node", "op", "sqnr_db", "rank", "precision"} (None where absent);
    what `slimgraph run --report` shows per layer."""
    rows = []
    for node in model.nodes():
        row = {"node": node.name, "op": node.op_type, "sqnr_db": Model.annotation(node, SQNR_KEY),
               "rank": Model.annotation(node, RANK_KEY), "precision": Model.annotation(node, "quantize.precision")}
        if any(row[k] is not None for k in ("sqnr_db", "rank", "precision")):
            rows.append(row)
    return sorted(rows, key=lambda r: (r["rank"] is None, r["rank"] or 0))


def layer_report_markdown(rows: Sequence[dict]) -> str:
    lines = ["| rank | node | op | SQNR (dB) | precision |", "|---:|---|---|---:|---|"]
    for r in rows:
        sqnr = "" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        lines.append(f"| {r['rank'] or ''} | {r['node']} | {r['op']} | {sqnr} | {r['precision'] or ''} |")
    return "\n".join(lines) + "\n"


@register_pass
class Sensitivity(Pass):
    """Per-layer quantization sensitivity (SQNR of the outputs with one layer quantized); annotates only."""

    name = "quantize.sensitivity"
    exact = True
    requires = ("data",)
    after = ("fold_batchnorm", "fuse_*", "quantize.equalize", "quantize.smoothquant", "quantize.bias_correction")
    before = ("quantize.static", "quantize.dynamic")

    class Config(PassConfig):
        #: calibration method for the activation ranges
        method: str = choice(*METHODS, default="minmax")
        #: samples used (the first ones of the data)
        samples: int = int_range(1, 100_000, default=64, log=True)
        #: weight bits, as quantize.static's weight_bits ("auto": 7 on x86 without VNNI, else 8)
        bits: str | int = choice(*BITS_CHOICES, default="auto")

    def run(self, model: Model, ctx) -> PassResult:
        layers, skipped = find_layers(model)
        if not layers:
            return PassResult(model, modified=False, stats={"layers": 0, "skipped": dict(skipped)})
        ranking = layer_sensitivity(model, ctx.data, method=self.config.method, samples=self.config.samples,
                                    bits=self.config.bits, target=ctx.target, progress=ctx.progress,
                                    layers=layers)
        changed = annotate_sensitivity(model, layers, ranking)
        table = [{"rank": s.rank, "layer": s.name, "op": s.op_type, "sqnr_db": round(s.sqnr, 2)} for s in ranking]
        logger.info("most sensitive layers: %s", ", ".join(f"{s.name} ({s.sqnr:.1f} dB)" for s in ranking[:5]))
        return PassResult(model, modified=changed, stats={"layers": len(layers), "ranking": table,
                                                          "skipped": dict(skipped)})

