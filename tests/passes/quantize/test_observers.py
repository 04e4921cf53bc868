import tracemalloc

import numpy as np
import pytest

from slimgraph.errors import DataError, PipelineError
from slimgraph.passes.quantize.observers import (
    OBSERVERS,
    EntropyObserver,
    MinMaxObserver,
    MseObserver,
    PercentileObserver,
    StreamingHistogram,
    calibrate,
    kl_threshold,
)
from slimgraph.passes.quantize.qparams import QParams
from tests.helpers import parse

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y)
<float[4, 3] w = {1.0, -2.0, 0.5, 0.25, 1.0, -1.0, -0.5, 0.75, 2.0, 1.5, -0.25, 1.0}> {
  h = MatMul(x, w)
  r = Relu(h)
  y = Neg(r)
}
"""
W = np.array([1.0, -2.0, 0.5, 0.25, 1.0, -1.0, -0.5, 0.75, 2.0, 1.5, -0.25, 1.0], np.float32).reshape(4, 3)


def chunks(x, n):
    return np.array_split(x, n)


def quant_mse(x, lo, hi):
    q = QParams.from_range(lo, hi, dtype="uint8")
    return float(np.mean((q.dequantize(q.quantize(x)) - x) ** 2))


# --- observers against numpy ---------------------------------------------------------------------
def test_minmax_streaming_equals_one_shot(rng):
    x = rng.standard_normal((40, 8, 5)).astype(np.float32)
    for axis in (None, 1):
        stream, once = MinMaxObserver(axis=axis), MinMaxObserver(axis=axis)
        for part in chunks(x, 7):
            stream.update(part)
        once.update(x)
        np.testing.assert_array_equal(stream.range()[0], once.range()[0])
        np.testing.assert_array_equal(stream.range()[1], once.range()[1])
    lo, hi = MinMaxObserver(axis=1).__class__(axis=1), None
    lo.update(x)
    np.testing.assert_array_equal(lo.range()[0], x.min(axis=(0, 2)))


def test_streaming_histogram_regrowth_is_exact(rng):
    """Growing the range merges zero-anchored bins: the counts equal a one-shot binning of
    all the data at the final width, value for value."""
    h = StreamingHistogram(64)
    parts = [rng.standard_normal(500) * scale + shift for scale, shift in ((0.1, 0), (1, 3), (10, -5), (50, 0))]
    for p in parts:
        p = p.reshape(1, -1)
        h.update(p, None, p.min(axis=1), p.max(axis=1))
    allx = np.concatenate(parts)
    w, start = h.width[0], h.start[0]
    expected = np.bincount((np.floor(allx / w).astype(np.int64) - start), minlength=64)
    np.testing.assert_array_equal(h.counts[0], expected)
    assert h.counts.sum() == allx.size


def test_percentile_within_one_bin_of_numpy(rng):
    parts = [rng.standard_normal(20_000) * (1 + i) + i for i in range(10)]  # the range keeps growing
    obs = PercentileObserver(percentile=99.0)
    for p in parts:
        obs.update(p)
    allx = np.concatenate(parts)
    width = float(obs.bin_width[0])
    lo, hi = obs.range()
    ref_lo, ref_hi = np.percentile(allx, [1.0, 99.0])
    assert abs(lo - ref_lo) <= width and abs(hi - ref_hi) <= width

    sym = PercentileObserver(percentile=99.9, symmetric=True)
    for p in parts:
        sym.update(p)
    lo, hi = sym.range()
    assert lo == -hi
    assert abs(hi - np.percentile(np.abs(allx), 99.9)) <= float(sym.bin_width[0])


def test_entropy_clips_heavy_tail_tighter_than_minmax(rng):
    x = rng.standard_t(df=2, size=100_000)  # heavy tails
    ent, mm = EntropyObserver(symmetric=True), MinMaxObserver(symmetric=True)
    for p in chunks(x, 10):
        ent.update(p)
        mm.update(p)
    t = float(ent.range()[1])
    assert t < 0.3 * float(mm.range()[1])
    assert t > np.percentile(np.abs(x), 90)  # it clips outliers, not the bulk


def test_entropy_one_sided_uses_all_uint8_levels(rng):
    x = np.maximum(rng.laplace(size=50_000), 0)  # ReLU output
    obs = EntropyObserver()
    obs.update(x)
    lo, hi = obs.range()
    assert lo == 0.0 and 0 < hi < x.max()


def test_kl_threshold_keeps_uniform_data_whole():
    assert kl_threshold(np.ones(1024), 128) == 1024


def _tensorrt_loop(hist, levels):
    """TensorRT's calibration written as the loop of its slides (and ORT/MXNet), with their
    1e-4 smoothing of empty bins: the reference for the closed form."""
    def smooth(p):
        zero = p == 0
        return p + np.where(zero, 1e-4, -1e-4 * zero.sum() / (p.size - zero.sum()))

    best, best_i = np.inf, len(hist)
    for i in range(levels, len(hist) + 1):
        sliced = hist[:i].astype(float)
        p = sliced.copy()
        p[-1] += hist[i:].sum()
        nonzero = (p != 0).astype(float)
        starts = np.arange(levels) * (i // levels)
        q_sums, counts = np.add.reduceat(sliced, starts), np.add.reduceat(nonzero, starts)
        per_bin = np.divide(q_sums, counts, out=np.zeros(levels), where=counts > 0)
        q = np.repeat(per_bin, np.diff(np.append(starts, i))) * nonzero
        ps, qs = smooth(p), smooth(q)
        ps, qs = ps / ps.sum(), qs / qs.sum()
        d = np.sum(ps[ps > 0] * np.log(ps[ps > 0] / qs[ps > 0]))
        if d < best:
            best, best_i = d, i
    return best_i


@pytest.mark.parametrize("levels", [128, 256])
def test_kl_threshold_equals_tensorrt_loop(levels, rng):
    for x in (np.abs(rng.standard_t(2, 20_000)), np.maximum(rng.standard_normal(20_000), 0),
              np.abs(rng.standard_t(3, 200))):
        hist, _ = np.histogram(x, bins=700, range=(0, x.max()))
        assert kl_threshold(hist, levels) == _tensorrt_loop(hist, levels)


def test_mse_range_minimizes_quantization_error_on_laplace(rng):
    x = rng.laplace(size=200_000).astype(np.float32)
    mse, mm = MseObserver(), MinMaxObserver()
    for p in chunks(x, 20):
        mse.update(p)
        mm.update(p)
    err_mse, err_mm = quant_mse(x, *mse.range()), quant_mse(x, *mm.range())
    assert err_mse < 0.85 * err_mm
    pct = PercentileObserver(percentile=99.0)
    pct.update(x)
    assert err_mse < quant_mse(x, *pct.range())


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_per_channel_shapes_and_scales(method, rng):
    scales = np.array([0.5, 1.0, 4.0, 16.0])
    x = rng.standard_normal((16, 4, 6, 6)) * scales[None, :, None, None]
    obs = OBSERVERS[method](axis=1)
    for p in chunks(x, 4):
        obs.update(p)
    lo, hi = obs.range()
    assert lo.shape == hi.shape == (4,) and lo.dtype == np.float32
    assert np.all(np.diff(hi) > 0) and np.all(np.diff(lo) < 0)  # ranges follow channel scales
    neg = OBSERVERS[method](axis=-3)
    neg.update(x)
    assert neg.range()[0].shape == (4,)
    tensor = OBSERVERS[method]()
    tensor.update(x)
    assert tensor.range()[0].shape == ()


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_symmetric_ranges(method, rng):
    obs = OBSERVERS[method](symmetric=True)
    obs.update(rng.standard_normal(10_000) + 2)
    lo, hi = obs.range()
    assert lo == -hi and hi > 0


def test_non_finite_values_are_left_out():
    obs = PercentileObserver(percentile=100.0)
    obs.update(np.array([-np.inf, -1.0, 0.5, np.nan, 2.0]))
    lo, hi = obs.range()
    assert (float(lo), float(hi)) == pytest.approx((-1.0, 2.0), abs=1e-3)
    assert obs.nonfinite == 2


def test_all_zero_channel_and_late_start():
    obs = MseObserver(axis=0)
    obs.update(np.zeros((2, 10)))
    obs.update(np.array([[0.0] * 10, np.linspace(-1, 3, 10)]))
    lo, hi = obs.range()
    assert (lo[0], hi[0]) == (0.0, 0.0)
    assert hi[1] > 2.5 and lo[1] < -0.5
    assert obs.histogram.counts[1].sum() == 20  # the 10 zeros before it started are kept


def test_observer_errors():
    with pytest.raises(DataError, match="no finite value"):
        MinMaxObserver().range()
    obs = MinMaxObserver(axis=1)
    obs.update(np.zeros((2, 3)))
    with pytest.raises(DataError, match="3 before"):
        obs.update(np.zeros((2, 4)))
    with pytest.raises(DataError, match="float tensors"):
        MinMaxObserver().update(np.zeros(3, np.int64))


# --- calibrate on a model ---------------------------------------------------------------------------
def test_calibrate_matches_numpy(rng):
    model = parse(MODEL)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    h = x @ W
    ranges = calibrate(model, {"x": x}, ["h", "r", "x", "w"], per_channel_axis={"h": 1}, progress=False)
    np.testing.assert_allclose(ranges["h"][0], h.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(ranges["h"][1], h.max(axis=0), rtol=1e-6)
    assert ranges["r"][0].shape == () and float(ranges["r"][1]) == pytest.approx(h.max(), rel=1e-6)
    assert float(ranges["x"][0]) == x.min()
    assert float(ranges["w"][1]) == 2.0


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_calibrate_batched_equals_one_at_a_time(method, rng):
    """The model has a dynamic batch dim: samples go in batches, with the result of
    observing them one by one (min-max: identical; histograms: the bins depend on how the
    range grew, so within a few of the final bins)."""
    model = parse(MODEL)
    x = rng.standard_normal((40, 4)).astype(np.float32)
    got = calibrate(model, {"x": x}, ["h"], method=method, progress=True)["h"]
    obs = OBSERVERS[method]()
    for i in range(len(x)):
        obs.update(x[i:i + 1] @ W)
    tol = 0.0 if method == "minmax" else 4 * float(obs.bin_width[0])
    assert abs(float(got[0]) - float(obs.range()[0])) <= tol + 1e-6
    assert abs(float(got[1]) - float(obs.range()[1])) <= tol + 1e-6


def test_calibrate_errors(rng):
    model = parse(MODEL)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    with pytest.raises(DataError, match="no calibration data"):
        calibrate(model, {}, ["h"], progress=False)
    with pytest.raises(DataError, match="lacks the model input"):
        calibrate(model, {"z": x}, ["h"], progress=False)
    with pytest.raises(PipelineError, match="'hh'.*did you mean 'h'"):
        calibrate(model, {"x": x}, ["h", "hh"], progress=False)
    with pytest.raises(PipelineError, match="unknown calibration method"):
        calibrate(model, {"x": x}, ["h"], method="kl", progress=False)
    with pytest.raises(DataError):
        calibrate(model, {"x": x[:, :3]}, ["h"], progress=False)


def _peak(model, data, method):
    tracemalloc.start()
    try:
        calibrate(model, data, ["h", "r"], method=method, progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_memory_does_not_grow_with_samples(method, rng):
    model = parse(MODEL)
    small = {"x": rng.standard_normal((100, 4)).astype(np.float32) * 3}
    large = {"x": rng.standard_normal((1000, 4)).astype(np.float32) * 3}
    _peak(model, small, method)  # warm-up: one-time imports and caches
    assert _peak(model, large, method) <= 1.2 * _peak(model, small, method)
