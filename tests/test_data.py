import numpy as np
import pytest

from slimgraph import data as sgdata
from slimgraph.errors import DataError
from tests.helpers import parse

MODEL = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[N,3,8,8] x, int64 sr) => (float[N,3,8,8] y) {
    y = Relu (x)
}
"""


def test_generate_uses_declared_shapes_with_dynamic_dims_as_one():
    data = sgdata.generate(parse(MODEL), 4)
    assert data["x"].shape == (4, 1, 3, 8, 8) and data["x"].dtype == np.float32  # stacked
    assert data["sr"].shape == (4,) and data["sr"].dtype == np.int64
    feeds = sgdata.sample(data, sgdata.input_ranks(parse(MODEL)), 3)
    assert feeds["x"].shape == (1, 3, 8, 8) and feeds["sr"].shape == ()


def test_shape_override():
    data = sgdata.generate(parse(MODEL), 2, overrides=sgdata.parse_shape_overrides(["x=2x3x8x8"]))
    assert data["x"].shape == (2, 2, 3, 8, 8)


def test_state_like_input_uses_the_stacked_layout(tmp_path):
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2,N,4] state) => (float[2,N,4] y) { y = Relu (state) }
    """)
    path = tmp_path / "d.npz"
    np.savez(path, state=np.zeros((5, 2, 1, 4), np.float32))
    data, _ = sgdata.load_npz(path, model)
    assert sgdata.sample(data, sgdata.input_ranks(model), 4)["state"].shape == (2, 1, 4)
    np.savez(path, state=np.zeros((5, 3, 1, 4), np.float32))
    with pytest.raises(DataError, match="axis 1 must be 2"):
        sgdata.load_npz(path, model)


@pytest.mark.parametrize("items, message", [(["x=1x3xfoo"], "expected name=DIM"), (["x"], "expected name=DIM")])
def test_bad_shape_override(items, message):
    with pytest.raises(DataError, match=message):
        sgdata.parse_shape_overrides(items)


def test_unknown_shape_override_name():
    with pytest.raises(DataError, match=r"unknown input\(s\) \['z'\]"):
        sgdata.input_spec(parse(MODEL), {"z": [1]})


def test_npz_round_trip_with_labels(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 3, 8, 8), np.float64), sr=np.full(5, 16000), labels=np.arange(5))
    data, labels = sgdata.load_npz(path, parse(MODEL))
    assert data["x"].dtype == np.float32  # safely cast to the model's dtype
    assert list(labels) == [0, 1, 2, 3, 4]
    feeds = sgdata.sample(data, sgdata.input_ranks(parse(MODEL)), 2)
    assert feeds["x"].shape == (1, 3, 8, 8) and feeds["sr"].shape == ()


def test_npz_with_different_sample_counts(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 3, 8, 8), np.float32), sr=np.full(4, 16000))
    with pytest.raises(DataError, match="different sample counts"):
        sgdata.load_npz(path, parse(MODEL))


def test_not_an_npz(tmp_path):
    path = tmp_path / "d.npz"
    path.write_text("hello")
    with pytest.raises(DataError, match="not a readable .npz"):
        sgdata.load_npz(path, parse(MODEL))


def test_wrong_dtype_is_refused(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 3, 8, 8), np.float32), sr=np.full(5, 1.5))
    with pytest.raises(DataError, match="'sr' has dtype float64"):
        sgdata.load_npz(path, parse(MODEL))
