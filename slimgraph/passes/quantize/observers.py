"""Calibration: observe tensors on sample data and choose the float range to quantize.

`calibrate(model, data, tensors, method=...)` runs the model with ONNX Runtime on a copy
whose graph outputs are the requested intermediate tensors (ORT's graph optimizations
off, so every name survives), feeds the samples one at a time (or, when every input's
first dim is dynamic, up to `BATCH_SIZE` at a time, as many as keep the observed tensors
of one run under `RUN_BYTES`), hands each observed array to one observer per tensor,
and returns `{name: (min, max)}`, each of shape `()` or `(C,)` per channel. Initializers
are observed once, from their value; graph inputs from the feeds. `stream` (the run loop)
is shared with the other accuracy tools.

Observers (`update(array)` any number of times, then `range()`):

1. `MinMaxObserver`: the observed minimum and maximum.
2. `PercentileObserver`: the `percentile`-th and (100 - `percentile`)-th percentiles
   (symmetric: the `percentile`-th percentile of |x|), linear inside a histogram bin.
3. `EntropyObserver`: TensorRT's KL-divergence calibration on the histogram of |x|:
   the clipping threshold t whose 2^(bits-1)-level quantization (2^bits when the data
   are one-sided and the range asymmetric) loses the least information. Asymmetric
   ranges of signed data are (max(min, -t), min(max, t)).
4. `MseObserver`: the range whose quantization minimizes the expected squared error:
   clipping error of the histogram's tails plus step^2 / 12 rounding error for every
   value inside the range (exact zeros excluded: 0 is always on the grid), searched over
   a grid of candidate (low, high) pairs (of high alone when symmetric).

Every observer works per tensor (`axis=None`) or per channel (`axis=k`), and gives
symmetric ranges (-m, m) with `symmetric=True`. Non-finite values (the -inf of an
attention mask) are counted and left out.

Memory does not grow with the number of samples: the histogram observers keep one
`StreamingHistogram` of 2 * `num_bins` bins per channel (`num_bins` for each sign), and
process each array in slices of `CHUNK` values. Its bins are anchored at zero (bin k
covers [k*w, (k+1)*w)), so when new data fall outside the window, the width w doubles by
adding pairs of bins (k -> floor(k/2)), which is exact, and the window moves over the
occupied bins; no value is ever stored. The histogram's range always includes 0, like
every quantization grid (`QParams.from_range`), so no resolution is spent outside what
the grid spans.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir

from slimgraph import data as sg_data
from slimgraph.errors import DataError, PipelineError
from slimgraph.ir.model import Model

logger = logging.getLogger("slimgraph.passes.quantize.observers")

METHODS = ("minmax", "percentile", "entropy", "mse")
#: Most samples per ORT run when every model input has a dynamic first dim ...
BATCH_SIZE = 16
#: ... and at most this many bytes of observed tensors per run (measured on the first sample).
RUN_BYTES = 64 * 2**20
#: Values an observer processes at a time (bounds its temporaries, ~8 bytes each).
CHUNK = 2**20
_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
#: Candidate clipping thresholds per side tried by the MSE search.
_MSE_CANDIDATES = 256


# --- streaming histogram ------------------------------------------------------------------------
class StreamingHistogram:
    """Per-channel histograms of a fixed number of zero-anchored bins (module docstring).

    Channel c holds `counts[c]` over bins `start[c] .. start[c] + num_bins - 1` of width
    `width[c]`; bin k covers [k*w, (k+1)*w). A channel that has seen only zeros has width 0
    and keeps them in `pending`.
    """

    def __init__(self, num_bins: int = 2048, *, count_zeros: bool = False):
        if num_bins < 16 or num_bins % 2:
            raise ValueError(f"num_bins must be even and >= 16, got {num_bins}")
        self.num_bins = num_bins
        self.count_zeros = count_zeros
        self.counts: np.ndarray | None = None  # (C, N) float64 (exact integers up to 2^53)
        self.width: np.ndarray | None = None  # (C,) float64
        self.start: np.ndarray | None = None  # (C,) int64
        self.pending: np.ndarray | None = None  # (C,) zeros seen before the channel started
        self.zeros: np.ndarray | None = None  # (C,) exact zeros seen

    def update(self, x: np.ndarray, finite: np.ndarray | None, lo: np.ndarray, hi: np.ndarray) -> None:
        """Add `x` [C, M] (float); `finite` masks the values to count (None: all);
        `lo`/`hi` are each channel's finite min and max in this update (float64)."""
        channels, n = x.shape[0], self.num_bins
        if self.counts is None:
            self.counts = np.zeros((channels, n))
            self.width = np.zeros(channels)
            self.start = np.zeros(channels, np.int64)
            self.pending = np.zeros(channels)
            self.zeros = np.zeros(channels)
        if self.count_zeros or not (self.width > 0).all():
            zeros = np.count_nonzero(x == 0, axis=1).astype(np.float64)  # NaN/inf are not 0
            self.zeros += zeros
        else:
            zeros = np.zeros(channels)  # only channels that have not started need them
        seen = np.isfinite(lo)  # a channel with no finite value in this update has lo = +inf
        lo, hi = np.where(seen, np.minimum(lo, 0.0), 0.0), np.where(seen, np.maximum(hi, 0.0), 0.0)
        for c in np.flatnonzero((self.width == 0) & (hi > lo)):
            self._begin(c, lo[c], hi[c])
        started = self.width > 0
        self.pending[~started] += zeros[~started]
        for c in np.flatnonzero(started & seen):
            k_lo, k_hi = math.floor(lo[c] / self.width[c]), math.floor(hi[c] / self.width[c])
            if k_lo < self.start[c] or k_hi >= self.start[c] + n:
                self._grow(c, k_lo, k_hi)
        if not started.any():
            return
        rows = np.flatnonzero(started)
        xs = x if len(rows) == len(x) else x[rows]
        if finite is not None:
            xs = np.where(finite[rows], xs, 0.0)
        # float64 division, as for k_lo / k_hi above, so every value lands inside the window
        scaled = xs / self.width[rows, None]
        np.floor(scaled, out=scaled)
        index = scaled.astype(np.int64)
        del scaled
        index -= self.start[rows, None] - np.arange(len(rows))[:, None] * n
        if finite is not None:
            index = index[finite[rows]]
        counts = np.bincount(index.ravel(), minlength=len(rows) * n).reshape(len(rows), n)
        self.counts[rows] += counts

    def _begin(self, c: int, lo: float, hi: float) -> None:
        """Start channel c on the range [lo, hi] (lo <= 0 <= hi, hi > lo)."""
        n = self.num_bins
        width = (hi - lo) / (n - 1)  # one bin of slack: any zero-anchored window of n bins fits
        start = math.floor(lo / width)
        while math.floor(hi / width) - start >= n:  # float rounding; at most once
            width *= 2
            start = math.floor(lo / width)
        self.width[c], self.start[c] = width, start
        if self.pending[c]:  # zeros seen earlier fall in bin 0
            self.counts[c, -start] += self.pending[c]
            self.pending[c] = 0

    def _grow(self, c: int, k_lo: int, k_hi: int) -> None:
        """Move / widen channel c's window so that it covers bins k_lo..k_hi and every
        occupied bin: double the width (merging bin pairs) until they fit."""
        n = self.num_bins
        occupied = np.flatnonzero(self.counts[c])
        counts = self.counts[c, occupied]
        index = self.start[c] + occupied
        if occupied.size:
            k_lo, k_hi = min(k_lo, int(index[0])), max(k_hi, int(index[-1]))
        width = self.width[c]
        while k_hi - k_lo + 1 > n:
            index //= 2  # numpy floor-divides negatives: bin k -> floor(k / 2)
            k_lo, k_hi, width = k_lo // 2, k_hi // 2, width * 2
        start = k_lo - (n - (k_hi - k_lo + 1)) // 2  # centre the occupied bins: room to grow
        self.counts[c] = np.bincount(index - start, weights=counts, minlength=n)
        self.width[c], self.start[c] = width, start

    # -- views of one channel ---------------------------------------------------------------
    def signed(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(counts [N], edges [N+1]) of channel c."""
        edges = (self.start[c] + np.arange(self.num_bins + 1)) * self.width[c]
        return self.counts[c], edges

    def absolute(self, c: int) -> tuple[np.ndarray, float]:
        """(counts of |x| over bins [j*w, (j+1)*w) for j = 0..M-1, w) of channel c: bin k
        of x and bin -k-1 fold onto bin k of |x| (exact: the bins are zero-anchored)."""
        start, n = int(self.start[c]), self.num_bins
        counts = self.counts[c]
        size = max(start + n, -start, 1)
        out = np.zeros(size)
        k = start + np.arange(n)
        pos = k >= 0
        np.add.at(out, k[pos], counts[pos])
        np.add.at(out, -k[~pos] - 1, counts[~pos])
        last = np.flatnonzero(out)
        return out[: last[-1] + 1] if last.size else out[:1], float(self.width[c])

    def bin_width(self) -> np.ndarray:
        """Each channel's current bin width (0 for a channel that saw only zeros)."""
        return np.zeros(0) if self.width is None else self.width.copy()


# --- observers ----------------------------------------------------------------------------------
class Observer:
    """Watches one tensor through `update(array)` calls; `range()` gives (min, max), shape
    () per tensor or (C,) per channel (`axis`). `symmetric` gives ranges (-m, m); `bits`
    is the integer width the range is chosen for (entropy and MSE use it)."""

    name: ClassVar[str] = ""

    def __init__(self, *, axis: int | None = None, symmetric: bool = False, bits: int = 8):
        if bits < 2 or bits > 16:
            raise ValueError(f"bits must be in 2..16, got {bits}")
        self.axis = axis
        self.symmetric = symmetric
        self.bits = bits
        self.count = 0  # finite values observed
        self.nonfinite = 0
        self._min: np.ndarray | None = None
        self._max: np.ndarray | None = None

    def _rows(self, array: np.ndarray) -> np.ndarray:
        """`array` as [C, M]: one row per channel (one row per tensor); no copy when it can."""
        x = np.asarray(array)
        if not np.issubdtype(x.dtype, np.floating):
            raise DataError(f"{type(self).__name__} observes float tensors, got {x.dtype}")
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        if self.axis is None:
            return x.reshape(1, -1)
        if not -x.ndim <= self.axis < x.ndim:
            raise DataError(f"per-channel axis {self.axis} is out of range for a tensor of shape {list(x.shape)}")
        rows = np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1)
        if self._min is not None and len(rows) != len(self._min):
            raise DataError(
                f"per-channel axis {self.axis} has {len(rows)} channels now, {len(self._min)} before "
                f"(shape {list(x.shape)})"
            )
        return rows

    def update(self, array: np.ndarray) -> None:
        """Observe `array`, in slices of at most `CHUNK` values so that temporaries stay small."""
        x = self._rows(array)
        if x.size == 0:
            return
        if self._min is None:
            self._min, self._max = np.full(len(x), np.inf), np.full(len(x), -np.inf)
        step = max(1, CHUNK // len(x))
        for start in range(0, x.shape[1], step):
            self._update_rows(x[:, start:start + step])

    def _update_rows(self, x: np.ndarray) -> None:
        lo, hi = x.min(axis=1).astype(np.float64), x.max(axis=1).astype(np.float64)
        if np.isfinite(lo).all() and np.isfinite(hi).all():  # NaN would propagate into min
            finite_mask = None
            self.count += x.size
        else:
            finite_mask = np.isfinite(x)
            lo = np.where(finite_mask, x, np.inf).min(axis=1).astype(np.float64)
            hi = np.where(finite_mask, x, -np.inf).max(axis=1).astype(np.float64)
            kept = int(finite_mask.sum())
            self.count += kept
            self.nonfinite += x.size - kept
        self._min, self._max = np.minimum(self._min, lo), np.maximum(self._max, hi)
        self._observe(x, finite_mask, lo, hi)

    def _observe(self, x: np.ndarray, finite: np.ndarray | None, lo: np.ndarray, hi: np.ndarray) -> None:
        """Subclasses: record what `range` needs."""

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if self._min is None or self.count == 0:
            raise DataError(f"{type(self).__name__}: no finite value observed; nothing to calibrate")
        # A channel that saw no finite value gets the range [0, 0].
        seen = np.isfinite(self._min)
        mins, maxs = np.where(seen, self._min, 0.0), np.where(seen, self._max, 0.0)
        lo, hi = self._range(mins, maxs)
        if self.symmetric:
            bound = np.maximum(np.abs(lo), np.abs(hi))
            lo, hi = -bound, bound
        lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
        if self.axis is None:
            return lo.reshape(()), hi.reshape(())
        return lo, hi

    def _range(self, mins: np.ndarray, maxs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return mins, maxs


class MinMaxObserver(Observer):
    """The observed minimum and maximum (symmetric: +-max|x|)."""

    name = "minmax"


class HistogramObserver(Observer, abc.ABC):
    """Base of the observers that choose a range from a streaming histogram."""

    def __init__(self, *, axis: int | None = None, symmetric: bool = False, bits: int = 8,
                 num_bins: int = 2048):
        super().__init__(axis=axis, symmetric=symmetric, bits=bits)
        # num_bins is the resolution of |x| (TensorRT's 2048): the signed window holds
        # twice as many bins, so each sign of symmetric data gets num_bins of them.
        self.histogram = StreamingHistogram(2 * num_bins)

    def _observe(self, x, finite, lo, hi) -> None:
        self.histogram.update(x, finite, lo, hi)

    def _range(self, mins, maxs):
        los, his = mins.copy(), maxs.copy()
        for c in range(len(mins)):
            if self.histogram.width[c] > 0:
                los[c], his[c] = self._channel_range(c, float(mins[c]), float(maxs[c]))
        return los, his

    @abc.abstractmethod
    def _channel_range(self, c: int, lo: float, hi: float) -> tuple[float, float]:
        """The range of channel c (observed finite min `lo`, max `hi`) from its histogram."""

    @property
    def bin_width(self) -> np.ndarray:
        return self.histogram.bin_width()


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The value below which a fraction q of the histogram lies, linear inside a bin."""
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    target = q * cum[-1]
    i = int(np.searchsorted(cum, target, side="left"))
    if i == 0:  # q == 0: the lower edge of the first occupied bin
        return float(edges[np.flatnonzero(counts)[0]])
    i = min(i, len(counts))
    within = counts[i - 1]
    frac = (target - cum[i - 1]) / within if within > 0 else 1.0
    return float(edges[i - 1] + frac * (edges[i] - edges[i - 1]))


class PercentileObserver(HistogramObserver):
    """Percentile range: [P(100 - p), P(p)] of x (symmetric: +-P(p) of |x|)."""

    name = "percentile"

    def __init__(self, *, percentile: float = 99.99, **kwargs):
        super().__init__(**kwargs)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _channel_range(self, c, lo, hi):
        q = self.percentile / 100.0
        if self.symmetric:
            counts, w = self.histogram.absolute(c)
            t = min(_quantile(counts, np.arange(len(counts) + 1) * w, q), max(-lo, hi))
            return -t, t
        counts, edges = self.histogram.signed(c)
        return max(_quantile(counts, edges, 1.0 - q), lo), min(_quantile(counts, edges, q), hi)


def kl_threshold(hist: np.ndarray, levels: int) -> int:
    """TensorRT's entropy calibration on a histogram of |x| (bins of equal width, from 0):
    the number of bins i >= `levels` to keep so that quantizing the first i bins (the rest
    clipped into bin i-1) to `levels` levels minimizes KL(reference || quantized).

    For each candidate i: the reference p is the first i bins with the clipped tail T added
    to bin i-1; the candidate q merges the first i bins (without T) into `levels` groups of
    i // levels bins (the last group takes the remainder) and spreads each group's mass
    evenly over the group's bins that are non-empty in p. Every candidate is tried, in
    closed form from prefix sums (O(levels) per candidate):

        KL = (sum p log p - sum_g P_g log(Q_g / n_g)) / P - log P + log S

    with P = sum p, S = sum q, Q_g / P_g the group's mass in q / p and n_g its non-empty
    bins. This is the exact divergence; TensorRT's implementations add 1e-4 to empty bins
    instead ("smoothing"), which only matters for a q that misses mass p has: here such a
    candidate is rejected (infinite divergence).
    """
    size = len(hist)
    if size <= levels:
        return size
    h = np.asarray(hist, np.float64)
    cum = np.concatenate([[0.0], np.cumsum(h)])
    cum_nonzero = np.concatenate([[0.0], np.cumsum(h > 0)])
    hlogh = np.concatenate([[0.0], np.cumsum(np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0))])
    total = cum[-1]
    group = np.arange(levels)
    best, best_i = np.inf, size
    for block in np.array_split(np.arange(levels, size + 1), max(1, (size - levels) // 256)):
        i = block[:, None]
        starts = group[None, :] * (i // levels)
        ends = np.concatenate([starts[:, 1:], i], axis=1)
        q_mass = cum[ends] - cum[starts]
        nonzero = cum_nonzero[ends] - cum_nonzero[starts]
        tail = total - cum[block]
        last = h[block - 1] + tail
        nonzero[:, -1] += (tail > 0) & (h[block - 1] == 0)
        p_mass = q_mass.copy()
        p_mass[:, -1] += tail
        with np.errstate(divide="ignore", invalid="ignore"):
            log_q = np.log(q_mass / nonzero)
            cross = np.where(p_mass > 0, p_mass * log_q, 0.0).sum(axis=1)
            missing = ((p_mass > 0) & (q_mass <= 0)).any(axis=1)
            plogp = hlogh[block - 1] + np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
            divergence = (plogp - cross) / total - np.log(total) + np.log(cum[block])
        divergence = np.where(missing | ~np.isfinite(divergence), np.inf, divergence)
        j = int(np.argmin(divergence))
        if divergence[j] < best:
            best, best_i = float(divergence[j]), int(block[j])
    return best_i


class EntropyObserver(HistogramObserver):
    """KL-divergence (TensorRT) clipping threshold on the histogram of |x|; see module
    docstring for one-sided data and asymmetric ranges."""

    name = "entropy"

    def _channel_range(self, c, lo, hi):
        counts, w = self.histogram.absolute(c)
        one_sided = lo >= 0 or hi <= 0
        levels = 2 ** self.bits if one_sided and not self.symmetric else 2 ** (self.bits - 1)
        t = kl_threshold(counts, levels) * w
        if self.symmetric:
            return -min(t, max(-lo, hi)), min(t, max(-lo, hi))
        return max(lo, -t), min(hi, t)


class MseObserver(HistogramObserver):
    """The range minimizing the expected squared quantization error (module docstring)."""

    name = "mse"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.histogram.count_zeros = True

    def _channel_range(self, c, lo, hi):
        counts, edges = self.histogram.signed(c)
        centers = (edges[:-1] + edges[1:]) / 2
        # Exact zeros quantize exactly: they sit in the bin [0, w); leave them out of the
        # rounding term (they are never clipped: every range holds 0).
        rounding_mass = counts.copy()
        zero_bin = int(-self.histogram.start[c])
        if 0 <= zero_bin < len(counts):
            rounding_mass[zero_bin] = max(rounding_mass[zero_bin] - self.histogram.zeros[c], 0.0)
        tails = _ClipError(counts, centers)
        inside_cum = np.concatenate([[0.0], np.cumsum(rounding_mass)])

        def inside(low, high):  # rounding mass of the bins whose centre is in [low, high]
            return (inside_cum[np.searchsorted(centers, high, side="right")]
                    - inside_cum[np.searchsorted(centers, low, side="left")])

        if self.symmetric:
            t = _candidates(max(-lo, hi))
            step = 2 * t / (2**self.bits - 2)
            total = tails.above(t) + tails.below(-t) + inside(-t, t) * step**2 / 12
            best = int(np.argmin(total))
            return -float(t[best]), float(t[best])
        his = _candidates(max(hi, 0.0))
        los = -_candidates(max(-lo, 0.0))
        step = (his[None, :] - los[:, None]) / (2**self.bits - 1)
        rounding = inside(los[:, None], his[None, :]) * step**2 / 12  # [K_lo, K_hi]
        total = tails.below(los)[:, None] + tails.above(his)[None, :] + rounding
        i, j = np.unravel_index(int(np.argmin(total)), total.shape)
        return float(los[i]), float(his[j])


class _ClipError:
    """Squared clipping error of a histogram (mass `counts` at `centers`) for clipping
    thresholds, in O(1) each from prefix sums of n, n*c and n*c^2:
    sum over c > h of n (c - h)^2 = S2 - 2 h S1 + h^2 S0 (and the mirror for c < l)."""

    def __init__(self, counts: np.ndarray, centers: np.ndarray):
        self.centers = centers
        moments = np.stack([counts, counts * centers, counts * centers**2])
        self.prefix = np.concatenate([np.zeros((3, 1)), np.cumsum(moments, axis=1)], axis=1)

    def above(self, h: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.centers, h, side="right")
        s0, s1, s2 = (self.prefix[:, -1:] - self.prefix[:, i])
        return np.maximum(s2 - 2 * h * s1 + h**2 * s0, 0.0)

    def below(self, l: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.centers, l, side="left")
        p0, p1, p2 = self.prefix[:, i]
        return np.maximum(l**2 * p0 - 2 * l * p1 + p2, 0.0)


def _candidates(bound: float) -> np.ndarray:
    """Clipping thresholds tried for one side: `_MSE_CANDIDATES` evenly spaced up to `bound`
    (just 0 when that side holds no data)."""
    if bound <= 0:
        return np.zeros(1)
    return np.linspace(bound / _MSE_CANDIDATES, bound, _MSE_CANDIDATES)


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls for cls in (MinMaxObserver, PercentileObserver, EntropyObserver, MseObserver)
}


def make_observer(method: str, *, axis: int | None = None, symmetric: bool = False, bits: int = 8,
                  percentile: float = 99.99, num_bins: int = 2048) -> Observer:
    """The observer for a calibration `method` (one of `METHODS`)."""
    if method not in OBSERVERS:
        raise PipelineError(f"unknown calibration method {method!r}; choose one of {list(METHODS)}")
    cls = OBSERVERS[method]
    if cls is MinMaxObserver:
        return cls(axis=axis, symmetric=symmetric, bits=bits)
    if cls is PercentileObserver:
        return cls(axis=axis, symmetric=symmetric, bits=bits, num_bins=num_bins, percentile=percentile)
    return cls(axis=axis, symmetric=symmetric, bits=bits, num_bins=num_bins)


# --- running the model ------------------------------------------------------------------------
def _locate(model: Model, tensors: Sequence[str]) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """Sort the requested names into (node outputs, graph inputs, constants); unknown names,
    subgraph values and non-float tensors are errors naming them."""
    produced: dict[str, ir.Value] = {}
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                produced[out.name] = out
    inputs = {v.name: v for v in model.graph.inputs}
    constants = {name: v for name, v in model.graph.initializers.items() if name not in inputs}
    nested = {
        out.name: node for node in model.nodes(recursive=True) if node.graph is not model.graph
        for out in node.outputs
    }
    activations, feeds, fixed = [], [], {}
    unknown = []
    for name in dict.fromkeys(tensors):
        value = produced.get(name) or inputs.get(name) or constants.get(name)
        if value is None:
            if name in nested:
                raise PipelineError(
                    f"calibrate: tensor {name!r} lives in a subgraph (of node {nested[name].name!r}, "
                    f"{nested[name].op_type}); only main-graph tensors can be observed"
                )
            unknown.append(name)
            continue
        if value.dtype is not None and value.dtype not in _FLOAT_TYPES:
            raise PipelineError(f"calibrate: tensor {name!r} is {value.dtype}, not a float tensor")
        if name in constants:
            fixed[name] = constants[name].const_value.numpy()
        elif name in inputs:
            feeds.append(name)
        else:
            activations.append(name)
    if unknown:
        import difflib

        known = [*produced, *inputs, *constants]
        hints = {n: difflib.get_close_matches(n, known, n=1) for n in unknown}
        described = ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items())
        raise PipelineError(f"calibrate: no tensor named {described} in the model")
    return activations, feeds, fixed


def _observing_session(model: Model | onnx.ModelProto, names: list[str]):
    """An ORT session (optimizations off) whose outputs are exactly `names`."""
    from slimgraph.backends import ort

    proto = ort.self_contained_proto(model) if isinstance(model, Model) else onnx.ModelProto.FromString(
        model.SerializeToString())
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return ort.session(proto, optimization="disable")


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over `total` samples; yields `advance(n)` (a no-op when off)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
        TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, advance=n)


def calibrate(
    model: Model,
    data: Mapping[str, np.ndarray],
    tensors: Sequence[str],
    *,
    method: str = "minmax",
    per_channel_axis: dict[str, int] | None = None,
    percentile: float = 99.99,
    num_bins: int = 2048,
    progress: bool = True,
    symmetric: bool = False,
    bits: int = 8,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Observe `tensors` while running `model` on `data` and return {name: (min, max)}.

    `data` is `{input name: array[N, ...]}` in a layout of `slimgraph.data`. `method` is one
    of `METHODS`; `per_channel_axis` maps a tensor name to its channel axis (a range per
    channel); `symmetric` asks for (-m, m) ranges; `bits` is the integer width the ranges
    are for (entropy and MSE depend on it). Peak memory does not depend on N.

    Raises `DataError` when `data` lacks a model input or does not fit it, and
    `PipelineError` for a tensor name the model does not have.
    """
    per_channel_axis = dict(per_channel_axis or {})
    if method not in OBSERVERS:
        raise PipelineError(f"unknown calibration method {method!r}; choose one of {list(METHODS)}")
    extra_axes = sorted(set(per_channel_axis) - set(tensors))
    if extra_axes:
        raise PipelineError(f"calibrate: per_channel_axis names tensors that are not requested: {extra_axes}")
    activations, fed, constants = _locate(model, tensors)
    observers = {
        name: make_observer(method, axis=per_channel_axis.get(name), symmetric=symmetric, bits=bits,
                            percentile=percentile, num_bins=num_bins)
        for name in dict.fromkeys(tensors)
    }
    for name, value in constants.items():
        observers[name].update(value)

    if activations or fed:
        _run_and_observe(model, data, activations, fed, observers, method, progress)

    out = {}
    for name, observer in observers.items():
        if observer.nonfinite:
            logger.warning("calibrate: %d non-finite values of %r were left out of its range",
                           observer.nonfinite, name)
        try:
            out[name] = observer.range()
        except DataError as e:
            raise DataError(f"calibrate: tensor {name!r}: {e}") from None
    return out


def _is_axis_zero(model: Model, name: str, axis: int | None) -> bool:
    if axis is None:
        return False
    if axis >= 0:
        return axis == 0
    shape = next((o.shape for n in model.graph for o in n.outputs if o.name == name), None)
    return shape is None or len(shape) + axis == 0


def check_data(model: Model, data: Mapping[str, np.ndarray] | None, where: str) -> tuple[dict, int]:
    """({input: array} for the model's inputs, sample count N); `DataError` naming `where`
    when data are missing or inconsistent. Keys the model does not take (labels) are left out."""
    if not data:
        raise DataError(f"{where}: no calibration data; pass {{input name: array[N, ...]}} (--data D.npz)")
    ranks = sg_data.input_ranks(model)
    missing = sorted(set(ranks) - set(data))
    if missing:
        raise DataError(f"{where}: data {sorted(data)} lacks the model input(s) {missing}")
    arrays = {k: np.asarray(data[k]) for k in ranks}
    counts = {k: len(a) for k, a in arrays.items() if a.ndim}
    if not counts:
        raise DataError(f"{where}: data {sorted(arrays)} holds no [N, ...] arrays")
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: data arrays have different sample counts {counts}; all must be [N, ...]")
    n = next(iter(counts.values()))
    if n == 0:
        raise DataError(f"{where}: the data hold 0 samples")
    return arrays, n


def stream(
    model: Model | onnx.ModelProto, data: Mapping[str, np.ndarray], names: Sequence[str], *,
    batching: bool = True, progress: bool = False, description: str = "running", where: str = "calibrate",
    inputs_of: Model | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Run `model` over the samples of `data` with its outputs replaced by `names` (main-graph
    values; ORT optimizations off); yields (sample count, feeds, {name: array}) per run.
    Samples go one at a time or, with `batching` and a dynamic first dim on every input, in
    batches sized so that one run's outputs stay under `RUN_BYTES` (at most `BATCH_SIZE`).
    With no `names`, nothing runs and the outputs are empty. `inputs_of` is the model whose
    declared inputs tell the data layout when `model` is a proto."""
    from slimgraph.backends import ort

    arrays, n = check_data(inputs_of or model, data, where)
    ranks = sg_data.input_ranks(inputs_of or model)
    sess = _observing_session(model, list(names)) if names else None
    step, dynamic = 1, False
    if sess is not None:
        dynamic = batching and all(len(i.shape) > 0 and not isinstance(i.shape[0], int) for i in sess.get_inputs())
    with _progress_bar(progress, n, description) as advance:
        start = 0
        while start < n:
            count = min(step, n - start)
            feeds = sg_data.sample(arrays, ranks, start, count)
            outputs = ort.run(sess, feeds) if sess is not None else {}
            if start == 0 and dynamic:  # the first sample alone sizes the batches
                observed = sum(v.nbytes for v in outputs.values())
                step = int(max(1, min(BATCH_SIZE, RUN_BYTES // max(observed, 1))))
            yield count, feeds, outputs
            del outputs
            start += count
            advance(count)
    logger.debug("%s: %d samples, %d per run", where, n, step)


def _run_and_observe(model, data, activations, fed, observers, method, progress) -> None:
    # A channel axis that is the batch axis must see one sample per run.
    batching = not any(_is_axis_zero(model, a, observers[a].axis) for a in activations)
    description = f"calibrating {len(observers)} tensors ({method})"
    for _, feeds, outputs in stream(model, data, activations, batching=batching, progress=progress,
                                    description=description):
        for name in fed:
            observers[name].update(feeds[name])
        for name in list(outputs):
            value = outputs.pop(name)
            if not np.issubdtype(value.dtype, np.floating):
                raise PipelineError(f"calibrate: tensor {name!r} is {value.dtype}, not a float tensor")
            observers[name].update(value)
            del value
