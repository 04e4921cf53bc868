"""Input Gram matrices of the layers `lowrank.svd` factorizes, from calibration data.

A layer's output is P @ W_patch, with P its input rows (a linear layer: the activation
reshaped [-1, K]) or its im2col patches (a Conv: one row per output position, entries in
(channel, kernel...) order, stride / pads / dilations applied). Output errors of any
approximation of W then need only G = P^T P (see `_factor.Factorization.output_errors`),
which is accumulated while the model runs over the samples, so nothing is kept per sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from slimgraph.ir.model import Model

#: Bound on one im2col block (float64) while accumulating a Conv's Gram.
PATCH_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a Conv reads its input: kernel, strides, pads (begins then ends), dilations."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]


def patches(x: np.ndarray, g: Geometry) -> np.ndarray:
    """im2col of x [B, C, spatial...]: [B * positions, C * prod(kernel)], (c, k...) order."""
    nd = len(g.kernel)
    x = np.pad(x, [(0, 0), (0, 0), *[(g.pads[i], g.pads[i + nd]) for i in range(nd)]])
    span = [d * (k - 1) + 1 for k, d in zip(g.kernel, g.dilations)]
    win = sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))  # [B, C, out..., span...]
    win = win[(slice(None), slice(None), *[slice(None, None, s) for s in g.strides],
               *[slice(None, None, d) for d in g.dilations])]
    order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return win.transpose(order).reshape(-1, x.shape[1] * int(np.prod(g.kernel)))


def rows(x: np.ndarray, geometry: Geometry | None) -> np.ndarray:
    """The layer's input rows P for one run's activation x."""
    if geometry is None:
        return x.reshape(-1, x.shape[-1])
    return patches(x, geometry)


def input_grams(model: Model, layers: Sequence[tuple[str, Geometry | None]], data: Mapping[str, np.ndarray],
                samples: int, *, progress: bool = False, where: str = "lowrank.svd"
                ) -> dict[tuple[str, Geometry | None], np.ndarray]:
    """{(input name, geometry): G} over the first `samples` samples of `data` (float64).
    Layers reading the same activation the same way (Q/K/V projections) share one G."""
    from slimgraph.passes.quantize.observers import stream

    keys = list(dict.fromkeys(layers))
    graph_inputs = {v.name for v in model.graph.inputs}
    observed = sorted({name for name, _ in keys if name not in graph_inputs})
    subset = {k: np.asarray(v)[:samples] for k, v in data.items()}
    grams: dict[tuple[str, Geometry | None], np.ndarray] = {}
    for _, feeds, outputs in stream(model, subset, observed, progress=progress,
                                    description=f"{where}: layer inputs", where=where):
        for name, geometry in keys:
            x = np.asarray(outputs[name] if name in outputs else feeds[name], np.float32)
            for part in _chunks(x, geometry):
                p = rows(part, geometry).astype(np.float64)
                grams[(name, geometry)] = grams.get((name, geometry), 0.0) + p.T @ p
    return grams


def _chunks(x: np.ndarray, geometry: Geometry | None) -> list[np.ndarray]:
    """x split along the batch so that one chunk's im2col stays under PATCH_BYTES."""
    if geometry is None or x.ndim < 2 or len(x) < 2:
        return [x]
    per_sample = x[0].size * int(np.prod(geometry.kernel)) * 8 / int(np.prod(geometry.strides))
    step = max(1, int(PATCH_BYTES // max(per_sample, 1)))
    return [x[i:i + step] for i in range(0, len(x), step)]
