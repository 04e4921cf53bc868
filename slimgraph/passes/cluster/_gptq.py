"""GPTQ onto k-means codebooks: each output channel keeps its codebook (from k-means), and
the input rows of `x @ w` are rounded to their channel's nearest centroid one at a time,
each rounding error pushed onto the rows not yet rounded through the inverse Hessian
H = E[x x^T] (Frantar et al., 2022, with a non-uniform grid instead of int4 steps). What
is minimised is the layer's output error on the data, not the weight error, which is
what lets 16 values per channel keep a transformer's embeddings close to float."""

from __future__ import annotations

import numpy as np

from slimgraph.passes.quantize.weight_only import inverse_hessian_factor


def nearest(values: np.ndarray, books: np.ndarray) -> np.ndarray:
    """For values [N] and per-row sorted codebooks [N, K]: the nearest codebook entry per row."""
    idx = np.argmin(np.abs(books - values[:, None]), axis=1)
    return books[np.arange(len(books)), idx]


def gptq_codebook(w: np.ndarray, hessian: np.ndarray, books: np.ndarray, *, damp: float = 0.01,
                  keep_zeros: bool = True) -> np.ndarray:
    """w [K, N] (layer x @ w), hessian [K, K], books [N, Kc] per output channel.
    Returns w' [K, N] whose column n takes only values of books[n] (zeros of w stay zero
    when `keep_zeros`; they are never moved by the error feedback either)."""
    k, n = w.shape
    W = w.T.astype(np.float64).copy()  # [N, K]
    zero = (W == 0) if keep_zeros else np.zeros_like(W, bool)
    U, dead = inverse_hessian_factor(hessian, damp)
    W[:, dead] = 0.0
    Q = np.zeros_like(W)
    block = 128
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, E1, U1 = W[:, i1:i2].copy(), np.zeros((n, i2 - i1)), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            q = np.where(zero[:, i1 + i], 0.0, nearest(col, books))
            Q[:, i1 + i] = q
            err = (col - q) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            W1[:, i:] = np.where(zero[:, i1 + i:i2], 0.0, W1[:, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
        W[:, i2:] = np.where(zero[:, i2:], 0.0, W[:, i2:])
    return Q.T.astype(w.dtype)
