import numpy as np
import pytest

from slimgraph.passes.quantize.qparams import QParams, qrange


def test_ranges():
    assert qrange("int8") == (-128, 127)
    assert qrange("int8", symmetric=True) == (-127, 127)
    assert qrange("int8", bits=7) == (-64, 63)
    assert qrange("uint8", bits=7) == (64, 191)
    assert qrange("int4") == (-8, 7)


def test_zero_is_exact_and_round_trip_error_is_half_a_step():
    x = np.linspace(0.3, 5.0, 101, dtype=np.float32)
    q = QParams.from_range(x.min(), x.max(), dtype="uint8")
    assert q.dequantize(q.quantize(np.zeros(1, np.float32)))[0] == 0.0
    err = np.abs(q.dequantize(q.quantize(x)) - x).max()
    assert err <= q.scale / 2 + 1e-7


def test_symmetric_per_channel():
    w = np.array([[1.0, -2.0], [0.5, 0.25]], np.float32)
    q = QParams.from_range(w.min(axis=1), w.max(axis=1), dtype="int8", symmetric=True, axis=0)
    assert q.zero_point.tolist() == [0, 0]
    np.testing.assert_allclose(q.scale, [2.0 / 127, 0.5 / 127], rtol=1e-6)
    np.testing.assert_allclose(q.dequantize(q.quantize(w)), w, atol=float(q.scale.max()) / 2)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_json_round_trip(dtype):
    q = QParams.from_range(-1.0, 3.0, dtype=dtype, bits=7)
    again = QParams.from_json(q.to_json())
    assert again.dtype == dtype and again.bits == 7
    np.testing.assert_array_equal(again.scale, q.scale)
    np.testing.assert_array_equal(again.zero_point, q.zero_point)
