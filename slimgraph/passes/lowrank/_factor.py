"""The algebra of `lowrank.svd`: one weight, its SVD, its two factors, and their errors.

Every layer is seen as a matrix M [D_in, D_out] acting on inputs from the left, taken
apart as M = U S Vt (float64). The first factor is U_r (orthonormal columns, the input
side), the second S_r Vt_r, so a rank-r pair computes x U_r S_r Vt_r.

1. linear (MatMul / Gemm, W oriented [K, N]): M = W; factors W1 = U_r [K, r], W2 = S_r Vt_r [r, N].
2. channel (Conv W [Cout, Cin, k...], group 1): M = W.reshape(Cout, -1).T, whose rows are
   the im2col patch entries in (c, k...) order; first a k... Conv Cin -> r with weight
   U_r.T reshaped [r, Cin, k...], then a 1x..x1 Conv r -> Cout with weight (S_r Vt_r).T.
3. spatial (Jaderberg et al. 2014; 2-D Conv): M[(c, i), (o, j)] = W[o, c, i, j], shape
   [Cin*kh, Cout*kw]; first a kh x 1 Conv Cin -> r with weight [r, Cin, kh, 1] from U_r,
   then a 1 x kw Conv r -> Cout with weight [Cout, r, 1, kw] from S_r Vt_r. The output of
   the pair at (o, y, x) is sum over (c, i, j) of (U_r S_r Vt_r)[(c, i), (o, j)] x[c, y+i, x+j].

The relative weight error of rank r is sqrt(sum_{i>r} s_i^2 / sum s_i^2) for a plain SVD
(the rearrangements are permutations of W's entries). The output error on data uses the
Gram matrix G = sum of p p^T over the layer's input rows / im2col patches p (see `_gram`):
||P (W - W_r)||^2 = trace(E^T G E) with E the error in the [D_patch, D_out] layout.

Whitened (data-aware) SVD, for linear and channel, where M's input side is the patch side:
with G = L L^T (Cholesky, a small ridge keeps it definite), the SVD of L^T M = U S Vt gives
first = L^-T U_r, second = S_r Vt_r, which minimises the output error ||P (M - first second)||
over all rank-r pairs (it equals sqrt(sum_{i>r} s_i^2) up to the ridge), instead of the
weight error. Spatial SVD's input side (c, i) is not the patch side (c, i, j): never whitened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np

#: Ridge added to G's diagonal before whitening, relative to its mean diagonal.
RIDGE = 1e-6


def single_threaded_blas():
    """BLAS limited to one thread when threadpoolctl is installed: on a loaded machine its
    threads fight over the cores (a 384x1536 SVD took 1.4 s with them, 0.25 s with one)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)

KINDS = ("linear", "channel", "spatial")


@dataclasses.dataclass
class Factorization:
    """The SVD of one layer's weight in the layout of its `kind`."""

    kind: str
    #: the original weight: [K, N] for linear, [Cout, Cin, k...] for Conv
    weight: np.ndarray
    #: input-side basis: the first factor is u[:, :r] (U, or L^-T U when whitened)
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    whitened: bool = False

    @classmethod
    def of(cls, kind: str, weight: np.ndarray, gram: np.ndarray | None = None) -> Factorization:
        """The SVD of `weight`; whitened by the input Gram `gram` when given (linear, channel)."""
        m = matrix(kind, weight.astype(np.float64))
        with single_threaded_blas():
            if gram is None:
                u, s, vt = np.linalg.svd(m, full_matrices=False)
                return cls(kind, weight, u, s, vt)
            if kind == "spatial":
                raise ValueError("spatial SVD cannot be whitened: its input side is not the patch side")
            ridge = RIDGE * max(float(np.trace(gram)) / len(gram), 1e-30)
            chol = np.linalg.cholesky(gram + ridge * np.eye(len(gram)))
            u, s, vt = np.linalg.svd(chol.T @ m, full_matrices=False)
            return cls(kind, weight, np.linalg.solve(chol.T, u), s, vt, whitened=True)

    @property
    def full_rank(self) -> int:
        return len(self.s)

    @property
    def params_before(self) -> int:
        return int(self.weight.size)

    def params_after(self, r: int) -> int:
        """Weights stored by the rank-r pair (biases, unchanged, are not counted)."""
        m, n = self.u.shape[0], self.vt.shape[1]
        return int(r * (m + n))

    def weight_error(self, r: int) -> float:
        """||W - W_r||_F / ||W||_F."""
        if self.whitened:
            w = self.weight.astype(np.float64)
            return float(np.linalg.norm(w - self.reconstruct(r)) / max(np.linalg.norm(w), 1e-30))
        total = float(np.sum(self.s ** 2))
        return math.sqrt(float(np.sum(self.s[r:] ** 2)) / total) if total > 0 else 0.0

    def energy_rank(self, energy: float) -> int:
        """The smallest r whose singular values keep `energy` of ||W||_F^2 (at least 1)."""
        power = self.s ** 2
        total = float(power.sum())
        if total == 0:
            return 1
        kept = np.cumsum(power) / total
        return int(min(np.searchsorted(kept, energy - 1e-12) + 1, self.full_rank))

    def factors(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(first, second) weights of the rank-r pair, float32, in the ops' layouts."""
        first = self.u[:, :r]
        second = self.s[:r, None] * self.vt[:r]
        w = self.weight
        if self.kind == "linear":
            out = first, second
        elif self.kind == "channel":
            cout, cin, kernel = w.shape[0], w.shape[1], w.shape[2:]
            out = (first.T.reshape(r, cin, *kernel),
                   second.T.reshape(cout, r, *(1,) * len(kernel)))
        else:  # spatial
            cout, cin, kh, kw = w.shape
            out = (first.reshape(cin, kh, r).transpose(2, 0, 1)[..., None],
                   second.reshape(r, cout, kw).transpose(1, 0, 2)[:, :, None, :])
        return tuple(np.ascontiguousarray(a, dtype=np.float32) for a in out)

    def reconstruct(self, r: int) -> np.ndarray:
        """W_r in the original weight's layout (float64)."""
        m = (self.u[:, :r] * self.s[:r]) @ self.vt[:r]
        return unmatrix(self.kind, m, self.weight.shape)

    def output_errors(self, gram: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """||P (W - W_r)|| / ||P W|| for each r in `ranks`, P the inputs whose Gram is `gram`."""
        w_patch = patch_matrix(self.kind, self.weight.astype(np.float64))
        reference = float(np.sum(w_patch * (gram @ w_patch)))
        if reference <= 0:
            return np.zeros(len(ranks))
        if self.kind in ("linear", "channel"):
            # the input side of M is the patch side and Vt's rows are orthonormal, so the
            # errors of the dropped pairs add up: sum_{i>r} s_i^2 u_i^T G u_i
            per_pair = self.s ** 2 * np.einsum("ki,kl,li->i", self.u, gram, self.u)
            tail = np.concatenate([np.cumsum(per_pair[::-1])[::-1], [0.0]])
            noise = np.maximum(tail[np.asarray(ranks)], 0.0)
        else:
            noise = np.array([_quadratic(patch_matrix(self.kind, self.weight - self.reconstruct(r)), gram)
                              for r in ranks])
        return np.sqrt(noise / reference)


def _quadratic(e: np.ndarray, gram: np.ndarray) -> float:
    return max(float(np.sum(e * (gram @ e))), 0.0)


def matrix(kind: str, w: np.ndarray) -> np.ndarray:
    """The matrix M [D_in, D_out] whose SVD gives the factors of `kind`."""
    if kind == "linear":
        return w
    if kind == "channel":
        return w.reshape(w.shape[0], -1).T
    if kind == "spatial":
        cout, cin, kh, kw = w.shape
        return w.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)
    raise ValueError(f"unknown factorization kind {kind!r}; one of {KINDS}")


def unmatrix(kind: str, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `matrix`."""
    if kind == "linear":
        return m
    if kind == "channel":
        return m.T.reshape(shape)
    cout, cin, kh, kw = shape
    return m.reshape(cin, kh, cout, kw).transpose(2, 0, 1, 3)


def patch_matrix(kind: str, w: np.ndarray) -> np.ndarray:
    """W as [D_patch, D_out]: the layer's output is patches @ this (see `_gram`)."""
    return w if kind == "linear" else w.reshape(w.shape[0], -1).T


def round_rank(r: int, multiple: int, full: int) -> int:
    """r rounded up to a multiple of `multiple`, at most `full`."""
    return int(min(full, math.ceil(max(r, 1) / multiple) * multiple))
