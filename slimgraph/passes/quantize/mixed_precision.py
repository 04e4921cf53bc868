"""quantize.mixed_precision: keep the fewest, most sensitive layers in float so that the
quantized model meets an accuracy budget.

1. Rank the layers by sensitivity (`sensitivity.layer_sensitivity`: each layer quantized
   alone, simulated in float).
2. Simulate the model with every layer quantized except the k most sensitive ones
   (`sensitivity.simulate`: rounded int8 per-channel weights, uint8 QuantizeLinear ->
   DequantizeLinear on the quantized layers' inputs) and find the smallest k that meets
   the budget, by binary search over k (0 first: when everything quantized meets it,
   nothing stays float). The budget is either
   - `max_error`: relative RMS error of the outputs, ||y_q - y|| / ||y|| over every float
     output and sample (SQNR >= -20 log10(max_error) dB), or
   - `max_drop`: the drop of a metric, higher is better: `ctx.options["metric"]`, a function
     `(outputs: {name: array[N, ...]}, labels: array[N] | None) -> float`, or, without one,
     top-1 accuracy of the first output against `ctx.labels`. The float model's value is
     the baseline.
3. Record the decision on the layer nodes (persistent annotations): `quantize.skip` =
   True on the layers kept in float (quantize.static leaves those in float),
   `quantize.precision` = "float" / "int8" on every layer, and the sensitivity's
   `quantize.sqnr` and `quantize.sensitivity_rank`.

The binary search assumes the error falls as more sensitive layers stay in float (it
does, up to noise); the k it returns was evaluated and meets the budget. The simulation
quantizes weights and the quantized layers' inputs, not every activation as integer-only
lowering does: leave margin in the budget for the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from slimgraph.errors import PipelineError
from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, float_range, int_range, register_pass
from slimgraph.passes.quantize._layers import BITS_CHOICES, Layer, find_layers
from slimgraph.passes.quantize.observers import METHODS
from slimgraph.passes.quantize.sensitivity import (
    OutputError, activation_ranges, annotate_sensitivity, layer_sensitivity, simulate,
)

logger = logging.getLogger("slimgraph.passes.quantize.mixed_precision")

SKIP_KEY = "quantize.skip"
PRECISION_KEY = "quantize.precision"
#: ctx.options key of a user metric: (outputs, labels) -> float, higher is better
METRIC_OPTION = "metric"

Metric = Callable[[dict[str, np.ndarray], "np.ndarray | None"], float]


def top1(outputs: dict[str, np.ndarray], labels: np.ndarray | None) -> float:
    """Top-1 accuracy of the first output's argmax over its last axis."""
    scores = next(iter(outputs.values()))
    return float(np.mean(scores.reshape(len(labels), -1).argmax(-1) == labels))


@register_pass
class MixedPrecision(Pass):
    """Keep the fewest most sensitive layers in float to meet an error or metric budget (annotates)."""

    name = "quantize.mixed_precision"
    exact = True
    requires = ("data",)
    after = ("fold_batchnorm", "fuse_*", "quantize.equalize", "quantize.smoothquant", "quantize.bias_correction",
             "quantize.sensitivity")
    before = ("quantize.static", "quantize.dynamic")

    class Config(PassConfig):
        #: budget: relative RMS output error (used when max_drop is not set)
        max_error: float = float_range(1e-6, 10.0, default=0.02, log=True)
        #: budget: largest drop of the metric (ctx.options["metric"], else top-1 vs labels)
        max_drop: float | None = None
        #: calibration method for the activation ranges
        method: str = choice(*METHODS, default="minmax")
        #: samples used (the first ones of the data)
        samples: int = int_range(1, 100_000, default=64, log=True)
        #: weight bits, as quantize.static's weight_bits ("auto": 7 on x86 without VNNI, else 8)
        bits: str | int = choice(*BITS_CHOICES, default="auto")

    def run(self, model: Model, ctx) -> PassResult:
        cfg = self.config
        layers, skipped = find_layers(model)
        if not layers:
            return PassResult(model, modified=False, stats={"layers": 0, "skipped": dict(skipped)})
        data = {k: v[: cfg.samples] for k, v in ctx.data.items()}
        reference = OutputError(model, data, progress=ctx.progress)
        score, budget, what = self._budget(reference, ctx)
        ranking = layer_sensitivity(model, data, method=cfg.method, samples=cfg.samples, bits=cfg.bits,
                                    target=ctx.target, progress=ctx.progress, layers=layers,
                                    reference=reference)
        by_name = {layer.name: layer for layer in layers}
        order = [by_name[s.name] for s in ranking]  # most sensitive first
        qparams = activation_ranges(model, layers, data, method=cfg.method, progress=ctx.progress)
        results: dict[int, float] = {}

        def meets(k: int) -> bool:
            if k not in results:
                kept = {id(layer) for layer in order[:k]}
                quantized = [layer for layer in layers if id(layer) not in kept]
                results[k] = score(simulate(model, quantized, qparams, bits=cfg.bits, target=ctx.target))
                logger.info("%d layer(s) in float: %s = %.4g (budget %.4g)", k, what, results[k], budget)
            return results[k] <= budget

        k = 0
        if not meets(0):
            lo, hi = 1, len(layers)  # meets(len) holds: nothing quantized
            results.setdefault(len(layers), 0.0)
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if meets(mid) else (mid + 1, hi)
            k = lo
        float_layers = order[:k]
        changed = annotate_sensitivity(model, layers, ranking)
        changed |= _annotate_decision(layers, float_layers)
        stats = {
            "layers": len(layers), "float_layers": [layer.name for layer in float_layers],
            what: round(results[k], 6), f"{what}_all_int8": round(results[0], 6), "budget": budget,
            "evaluations": len(results), "skipped": dict(skipped),
        }
        return PassResult(model, modified=changed, stats=stats)

    def _budget(self, reference: OutputError, ctx) -> tuple[Callable[[Model], float], float, str]:
        """(model -> value to keep <= budget, budget, name of the value)."""
        if self.config.max_drop is None:
            return reference.error, self.config.max_error, "error"
        metric: Metric | None = ctx.options.get(METRIC_OPTION)
        labels = ctx.labels[: self.config.samples] if ctx.labels is not None else None
        if metric is None:
            if labels is None:
                raise PipelineError(
                    "quantize.mixed_precision: max_drop needs a metric (context option 'metric': "
                    "(outputs, labels) -> float) or labels for top-1 accuracy"
                )
            metric = top1
        baseline = float(metric(reference.outputs(), labels))
        logger.info("metric of the float model: %.4g", baseline)
        return (lambda m: baseline - float(metric(reference.outputs(m), labels))), self.config.max_drop, "drop"


def _annotate_decision(layers: list[Layer], float_layers: list[Layer]) -> bool:
    changed = False
    keep = set(id(layer) for layer in float_layers)
    for layer in layers:
        in_float = id(layer) in keep
        precision = "float" if in_float else "int8"
        if Model.annotation(layer.node, PRECISION_KEY) != precision:
            Model.annotate(layer.node, PRECISION_KEY, precision)
            changed = True
        if in_float and Model.annotation(layer.node, SKIP_KEY) is not True:
            Model.annotate(layer.node, SKIP_KEY, True)
            changed = True
        elif not in_float and Model.annotation(layer.node, SKIP_KEY) is not None:
            _drop(layer, SKIP_KEY)
            changed = True
    return changed


def _drop(layer: Layer, key: str) -> None:
    from slimgraph.ir.model import ANNOTATION_PREFIX

    full = ANNOTATION_PREFIX + key
    layer.node.metadata_props.pop(full, None)
    layer.node.meta.pop(full, None)
