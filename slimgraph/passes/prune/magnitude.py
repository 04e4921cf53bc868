"""prune.magnitude: unstructured magnitude pruning (lossy).

The selected weights (see `_targets`: Conv / ConvTranspose / Gemm / MatMul constants,
Gather tables with `embeddings`, at least `min_size` elements, minus `exclude` and, by
default, the first and last compute layers) get their smallest-magnitude elements set to
zero:

1. `scope="layer"`: each weight loses exactly round(sparsity * size) elements, the
   smallest |w| (zeros already there count towards the target).
2. `scope="global"`: one threshold over all selected weights, each weight's magnitudes
   first divided by its RMS, so layers with larger weights (embeddings, a badly scaled
   stem) are not spared and layers with small weights are not emptied; the model-wide
   fraction of zeros is then `sparsity` while each layer's own fraction follows its
   distribution.
3. `per_layer` maps fnmatch patterns (node name, output name, torch module path or weight
   name) to a sparsity that overrides the target for matching layers (pruned per layer,
   left out of the global ranking). A pattern that matches no prunable layer is an error.

The model stays a dense float model (every runtime reads it); `pack.sparse` then stores
the zeros compactly (recipe `sparse-80`). A "sparsity" contract records the number of zero
elements of the compute weights (`sparsity.count_zeros`), so the PassManager fails any
later pass (fusion, quantization, clustering) that fills them.
"""

from __future__ import annotations

import numpy as np
import pydantic

from slimgraph.ir.model import Model
from slimgraph.passes import contracts
from slimgraph.passes.base import Pass, PassConfig, PassContext, PassResult, choice, register_pass
from slimgraph.passes.prune import _targets
from slimgraph.passes.prune.sparsity import SPARSITY, count_zeros


def _fraction(default: float):
    return pydantic.Field(default=default, ge=0.0, lt=1.0,
                          json_schema_extra={"domain": {"float": [0.0, 0.95], "log": False}})


def prune_mask(magnitude: np.ndarray, sparsity: float) -> np.ndarray:
    """True for the elements kept: all but the round(sparsity * n) smallest magnitudes."""
    n = magnitude.size
    k = int(round(sparsity * n))
    keep = np.ones(n, dtype=bool)
    if k > 0:
        keep[np.argpartition(magnitude.ravel(), k - 1)[:k]] = False
    return keep.reshape(magnitude.shape)


@register_pass
class PruneMagnitude(Pass):
    """Unstructured magnitude pruning, per layer or global, to a target sparsity (lossy)."""

    name = "prune.magnitude"
    exact = False
    # fusion may run before (magnitudes of the folded weights) or after (it keeps zeros: the
    # contract checks it); quantized, clustered or packed weights are no longer float
    before = ("quantize.*", "cluster.*", "pack.*")

    class Config(PassConfig):
        #: fraction of zeros in each selected weight (layer) or over all of them (global)
        sparsity: float = _fraction(0.5)
        #: one target per layer, or one magnitude ranking over the model (RMS-normalised)
        scope: str = choice("layer", "global", default="layer")
        #: fnmatch pattern -> sparsity, overriding the target for matching layers
        per_layer: dict[str, float] = {}
        #: weights with fewer elements stay dense
        min_size: int = 1024
        #: fnmatch patterns of node names, op types, torch module paths or weight names left dense
        exclude: tuple[str, ...] = ()
        #: leave the first and last compute layers dense
        keep_first_last: bool = True
        #: also prune Gather tables (embeddings)
        embeddings: bool = False

        @pydantic.field_validator("per_layer")
        @classmethod
        def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
            bad = {k: v for k, v in value.items() if not 0.0 <= v < 1.0}
            if bad:
                raise ValueError(f"sparsities must be in [0, 1), got {bad}")
            return value

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        targets, skipped = _targets.select(model, min_size=cfg.min_size, exclude=cfg.exclude,
                                           embeddings=cfg.embeddings, keep_first_last=cfg.keep_first_last,
                                           where=self.name)
        overrides = _targets.layer_patterns(targets, cfg.per_layer, self.name, "per_layer")
        if not targets:
            return PassResult(model, False, {"layers": 0, "skipped": skipped})
        goals = {id(t): cfg.per_layer[overrides[id(t)]] if id(t) in overrides else cfg.sparsity for t in targets}
        masks = {id(t): prune_mask(np.abs(t.array), goals[id(t)]) for t in targets
                 if cfg.scope == "layer" or id(t) in overrides}
        pooled = [t for t in targets if id(t) not in masks]
        if pooled:
            masks.update(self._global(pooled, cfg.sparsity))
        table, kept, total, changed = [], 0, 0, False
        for t in targets:
            new = np.where(masks[id(t)], t.array, np.zeros((), t.array.dtype))
            before = float((t.array == 0).mean())
            if not np.array_equal(new, t.array):
                _targets.set_weight(t, new)
                changed = True
            kept, total = kept + int(masks[id(t)].sum()), total + new.size
            table.append({"layer": t.layer, "op": t.op, "shape": t.shape, "target": round(goals[id(t)], 4),
                          "sparsity": f"{before:.3f} -> {float((new == 0).mean()):.3f}"})
        zeros = count_zeros(model)
        recorded = contracts.records(model)
        contracts.add(model, SPARSITY, {"id": "prune.magnitude", "zeros": zeros, "by": self.name})
        changed = changed or contracts.records(model) != recorded
        stats = {"layers": len(targets), "sparsity": round(1 - kept / total, 4), "weights_pruned": total - kept,
                 "zeros_in_model": zeros, "skipped": skipped, "table": table}
        return PassResult(model, changed, stats)

    @staticmethod
    def _global(targets: list[_targets.Target], sparsity: float) -> dict[int, np.ndarray]:
        def rms(a: np.ndarray) -> float:
            return max(float(np.sqrt(np.mean(np.square(a, dtype=np.float64)))), 1e-30)

        scores = [np.abs(t.array.astype(np.float64)) / rms(t.array) for t in targets]
        flat = np.concatenate([s.ravel() for s in scores])
        keep = prune_mask(flat, sparsity)
        out, start = {}, 0
        for t, s in zip(targets, scores):
            out[id(t)] = keep[start:start + s.size].reshape(s.shape)
            start += s.size
        return out
