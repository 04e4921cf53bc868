"""Compare two sets of model outputs: max abs / relative error, cosine, top-1 agreement."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np


@dataclasses.dataclass
class OutputDiff:
    max_abs: float
    #: max |a - b| / max |reference|: error relative to the output's scale.
    max_rel: float
    cosine: float
    #: fraction of samples whose argmax over the last axis agrees (None if not a score).
    top1: float | None
    shape: tuple
    dtype: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def diff(reference: np.ndarray, other: np.ndarray) -> OutputDiff:
    ref = np.asarray(reference)
    out = np.asarray(other)
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {out.shape}")
    a = ref.astype(np.float64).ravel()
    b = out.astype(np.float64).ravel()
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cosine = float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    top1 = None
    if ref.ndim >= 2 and ref.shape[-1] > 1 and np.issubdtype(ref.dtype, np.floating):
        top1 = float(np.mean(ref.reshape(-1, ref.shape[-1]).argmax(-1) == out.reshape(-1, out.shape[-1]).argmax(-1)))
    return OutputDiff(max_abs, max_rel, cosine, top1, tuple(ref.shape), str(ref.dtype))


def diff_all(reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> dict[str, OutputDiff]:
    missing = sorted(set(reference) - set(other))
    if missing:
        raise ValueError(f"outputs missing from the second model: {missing}")
    return {name: diff(reference[name], other[name]) for name in reference}


def worst_rel(diffs: Mapping[str, OutputDiff]) -> float:
    return max((d.max_rel for d in diffs.values()), default=0.0)
