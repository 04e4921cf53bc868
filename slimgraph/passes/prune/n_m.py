"""prune.n_m: N:M semi-structured sparsity (2:4 by default) for sparse tensor cores (lossy).

In every group of M consecutive weights along the reduction axis (Conv [Cout, Cin/g, k...]:
axis 1; MatMul [.., K, N]: axis -2; Gemm: axis 1 with transB else 0; ConvTranspose: axis
0) the N largest magnitudes are kept and the others set to zero, which is the pattern
NVIDIA's sparse tensor cores (2:4) and other N:M kernels run at up to 2x.

Weights are chosen like `prune.magnitude`'s (`_targets`: constant weights of at least
`min_size` elements, minus `exclude`, first and last compute layers dense by default;
Gather tables never). A layer whose reduction size is not a multiple of M cannot hold the
pattern: it is skipped and listed in a warning and in `stats["skipped"]`; when no layer can
take it, that is a PassError. Each pruned node is annotated `n_m = {n, m, axis, weight}`
(saved with the model) and an "n_m" contract records how many weights of each shape are
N:M, checked by content after every later pass (see `sparsity`), so fusion and
quantization must keep the pattern.
"""

from __future__ import annotations

import logging

import numpy as np
import pydantic

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes import contracts
from slimgraph.passes.base import Pass, PassConfig, PassContext, PassResult, choice, int_range, register_pass
from slimgraph.passes.prune import _targets
from slimgraph.passes.prune.sparsity import N_M, SPARSITY, count_zeros, nm_shapes

logger = logging.getLogger(__name__)


def nm_mask(weight: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """True for the kept elements: the n largest |w| of every m consecutive along `axis`."""
    moved = np.moveaxis(np.abs(weight), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    keep = np.ones(groups.shape, dtype=bool)
    drop = np.argpartition(groups, m - n - 1, axis=-1)[..., :m - n]
    np.put_along_axis(keep, drop, False, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


@register_pass
class PruneNM(Pass):
    """N:M semi-structured pruning (2:4 by default) along each weight's reduction axis (lossy)."""

    name = "prune.n_m"
    exact = False
    # fusion may run before (magnitudes of the folded weights) or after (it keeps zeros: the
    # contract checks it); quantized, clustered or packed weights are no longer float
    before = ("quantize.*", "cluster.*", "pack.*")

    class Config(PassConfig):
        #: weights kept in every group
        n: int = int_range(1, 15, default=2)
        #: group size along the reduction axis
        m: int = choice(2, 4, 8, 16, default=4)
        #: weights with fewer elements stay dense
        min_size: int = 1024
        #: fnmatch patterns of node names, op types, torch module paths or weight names left dense
        exclude: tuple[str, ...] = ()
        #: leave the first and last compute layers dense
        keep_first_last: bool = True

        @pydantic.model_validator(mode="after")
        def _n_below_m(self):
            if self.n >= self.m:
                raise ValueError(f"n must be smaller than m (n={self.n}, m={self.m}): {self.n}:{self.m} prunes nothing")
            return self

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        targets, skipped = _targets.select(model, min_size=cfg.min_size, exclude=cfg.exclude, embeddings=False,
                                           keep_first_last=cfg.keep_first_last, where=self.name,
                                           ops=_targets.COMPUTE)
        fits = [t for t in targets if t.array.shape[t.reduction_axis] % cfg.m == 0]
        misfits = [t for t in targets if t not in fits]
        if misfits:
            names = ", ".join(f"{t.layer} (reduction size {t.array.shape[t.reduction_axis]})" for t in misfits)
            logger.warning("prune.n_m: %d layer(s) left dense, reduction size not a multiple of %d: %s",
                           len(misfits), cfg.m, names)
            skipped += [{"layer": t.layer, "reason": f"reduction size {t.array.shape[t.reduction_axis]} "
                         f"is not a multiple of m={cfg.m}"} for t in misfits]
        if targets and not fits:
            raise PassError(self.name, f"no layer has a reduction size divisible by m={cfg.m} ({names}); "
                            "choose a smaller m")
        if not fits:
            return PassResult(model, False, {"layers": 0, "skipped": skipped})
        table = []
        for t in fits:
            keep = nm_mask(t.array, t.reduction_axis, cfg.n, cfg.m)
            before = float((t.array == 0).mean())
            new = np.where(keep, t.array, np.zeros((), t.array.dtype))
            _targets.set_weight(t, new)
            for node in t.nodes:
                Model.annotate(node, "n_m", {"n": cfg.n, "m": cfg.m, "axis": t.reduction_axis, "weight": t.value.name})
            table.append({"layer": t.layer, "op": t.op, "shape": t.shape, "axis": t.reduction_axis,
                          "sparsity": f"{before:.3f} -> {float((new == 0).mean()):.3f}"})
        counts = nm_shapes(model, cfg.n, cfg.m)
        wanted = {tuple(np.moveaxis(np.empty(t.array.shape, np.uint8), t.reduction_axis, -1).shape) for t in fits}
        tensors = [{"shape": list(s), "count": counts[s]} for s in sorted(wanted)]
        contracts.add(model, N_M, {"id": f"{cfg.n}:{cfg.m}", "n": cfg.n, "m": cfg.m, "tensors": tensors, "by": self.name})
        contracts.add(model, SPARSITY, {"id": self.name, "zeros": count_zeros(model), "by": self.name})
        return PassResult(model, True, {"layers": len(fits), "pattern": f"{cfg.n}:{cfg.m}", "skipped": skipped,
                                        "table": table})
