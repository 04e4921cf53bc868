"""Vectorised 1-D k-means over many rows at once (one codebook per row).

Weight clustering is k-means on scalars, so it does not need a general k-means: with the
centroids of a row sorted, the nearest centroid of a value is found by binary search
among the midpoints, and the update is a weighted bincount. Rows (output channels, or one
row for a per-tensor codebook) are handled together by shifting row r's values and
boundaries into [r, r + 1) after scaling, so one `searchsorted` serves all rows: O(n log K)
per iteration and no Python loop over channels. A 100 M-parameter model clusters in
seconds per iteration.

`fit(rows, k, init, rng, iterations)` -> (centroids [R, K] sorted, labels like rows).
Rows may carry NaN for "not clustered" (the zeros of a sparsity-preserving run); their
labels are -1. A row with fewer distinct values than K gets duplicate centroids at those
values (exact), never an empty cluster left at a stale place.
"""

from __future__ import annotations

import numpy as np

INITS = ("kmeans++", "linear", "density")
#: rows longer than this are first clustered on a random subsample of their columns
SUBSAMPLE = 1 << 16


def _scaled(rows: np.ndarray, lo: np.ndarray, span: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Map each row's values into [r, r + 1): r + (x - lo) / span * 0.999."""
    r = np.arange(len(rows), dtype=np.float64)[:, None]
    return r + (x - lo) / span * 0.999


def assign(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every value (centroids sorted per row); -1 for NaN."""
    R, K = centroids.shape
    lo = np.nanmin(np.where(np.isnan(rows), np.inf, rows), axis=1, keepdims=True)
    lo = np.minimum(lo, centroids[:, :1])
    hi = np.maximum(np.nanmax(np.where(np.isnan(rows), -np.inf, rows), axis=1, keepdims=True), centroids[:, -1:])
    lo = np.where(np.isfinite(lo), lo, 0.0)
    span = np.where(np.isfinite(hi) & (hi > lo), hi - lo, 1.0)
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2  # [R, K-1]
    flat_mids = _scaled(rows, lo, span, mids).ravel()
    x = _scaled(rows, lo, span, np.nan_to_num(rows, nan=0.0))
    pos = np.searchsorted(flat_mids, x.ravel(), side="left").reshape(rows.shape)
    labels = pos - np.arange(R)[:, None] * (K - 1)
    labels = np.clip(labels, 0, K - 1)
    return np.where(np.isnan(rows), -1, labels)


def _init(rows: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    R = len(rows)
    finite = ~np.isnan(rows)
    lo = np.nanmin(np.where(finite, rows, np.inf), axis=1)
    hi = np.nanmax(np.where(finite, rows, -np.inf), axis=1)
    lo, hi = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)
    if init == "linear":
        return lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, k)[None, :]
    if init == "density":  # equal-mass quantiles of each row's values
        q = (np.arange(k) + 0.5) / k
        return np.nanquantile(np.where(finite, rows, np.nan), q, axis=1).T
    # k-means++ on a subsample of each row (D^2 sampling), vectorised over rows
    n = rows.shape[1]
    take = min(n, 4096)
    cols = rng.choice(n, size=take, replace=False) if take < n else np.arange(n)
    sample = rows[:, cols].astype(np.float64)
    valid = ~np.isnan(sample)
    counts = valid.sum(1)
    fill = np.where(valid, sample, 0.0).sum(1) / np.maximum(counts, 1)  # mean of each row's valid values
    sample = np.where(valid, sample, fill[:, None])
    centroids = np.empty((R, k))
    first = rng.integers(0, take, size=R)
    centroids[:, 0] = sample[np.arange(R), first]
    d2 = (sample - centroids[:, :1]) ** 2
    for j in range(1, k):
        total = d2.sum(1, keepdims=True)
        p = np.where(total > 0, d2 / np.where(total > 0, total, 1), 1.0 / take)
        u = rng.random((R, 1))
        idx = np.minimum((np.cumsum(p, axis=1) < u).sum(1), take - 1)
        centroids[:, j] = sample[np.arange(R), idx]
        d2 = np.minimum(d2, (sample - centroids[:, j:j + 1]) ** 2)
    return centroids


def fit(rows: np.ndarray, k: int, *, init: str = "kmeans++", rng: np.random.Generator | None = None,
        iterations: int = 25, tol: float = 1e-7, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster each row of `rows` [R, n] (float; NaN = skip) into `k` values, minimising the
    squared error weighted by `weights` (broadcastable to rows; e.g. the mean square of the
    input each weight multiplies: errors on weights that see large inputs cost more).

    Returns (centroids [R, k] sorted ascending, float64; labels [R, n] int, -1 for NaN)."""
    if init not in INITS:
        raise ValueError(f"init {init!r} is not one of {INITS}")
    rng = rng or np.random.default_rng(0)
    rows = np.asarray(rows, dtype=np.float64)
    R, n = rows.shape
    centroids = np.sort(_init(rows, k, init, rng), axis=1)
    w = np.ones_like(rows) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), rows.shape)
    if n > SUBSAMPLE:  # Lloyd on a column subsample first, then a few passes over everything
        cols = np.sort(rng.choice(n, size=SUBSAMPLE, replace=False))
        centroids = _lloyd(rows[:, cols], w[:, cols], centroids, iterations, tol)
        iterations = 3
    centroids = _lloyd(rows, w, centroids, iterations, tol)
    return centroids, assign(rows, centroids)


def _lloyd(rows: np.ndarray, w: np.ndarray, centroids: np.ndarray, iterations: int, tol: float) -> np.ndarray:
    R, k = centroids.shape
    valid = ~np.isnan(rows)
    x = np.where(valid, rows, 0.0)
    wx, w = (w * x).ravel(), w.ravel()
    offsets = (np.arange(R) * k)[:, None]
    for _ in range(iterations):
        labels = assign(rows, centroids)
        flat = np.where(valid, labels + offsets, R * k).ravel()
        sums = np.bincount(flat, weights=wx, minlength=R * k + 1)[:-1].reshape(R, k)
        counts = np.bincount(flat, weights=w, minlength=R * k + 1)[:-1].reshape(R, k)
        updated = np.where(counts > 0, sums / np.where(counts > 0, counts, 1.0), np.nan)
        updated = _refill_empty(updated, rows, counts)
        updated = np.sort(updated, axis=1)
        shift = np.nanmax(np.abs(updated - centroids))
        centroids = updated
        if shift <= tol * (np.nanmax(np.abs(x)) + 1e-30):
            break
    return centroids


def _refill_empty(centroids: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """An empty cluster takes a value of its row far from every centroid (or, when the row
    has no more distinct values, a duplicate of an existing centroid: exact and harmless)."""
    empty_rows = np.nonzero(np.isnan(centroids).any(1))[0]
    for r in empty_rows:  # rare after a good init; loops only over affected rows
        row = rows[r][~np.isnan(rows[r])]
        good = centroids[r][~np.isnan(centroids[r])]
        for j in np.nonzero(np.isnan(centroids[r]))[0]:
            if row.size == 0:
                centroids[r, j] = 0.0
                continue
            dist = np.min(np.abs(row[:, None] - good[None, :]), axis=1) if good.size else np.ones(row.size)
            far = int(np.argmax(dist))
            centroids[r, j] = row[far] if dist[far] > 0 else (good[0] if good.size else row[far])
            good = np.append(good, centroids[r, j])
    return centroids
