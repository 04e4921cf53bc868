"""zoo.magika_views: augmentation for distilling magika (random byte ranges of real files)."""

import numpy as np
import pytest

from slimgraph import zoo
from slimgraph.backends import ort
from slimgraph.errors import DataError


def test_views_of_real_files_are_valid_magika_inputs():
    files = zoo.magika_files(12, seed=0)
    views = zoo.magika_views(files, 64, seed=3)
    cfg = zoo.magika_config()
    assert views.shape == (64, cfg["beg_size"] + cfg["end_size"]) and views.dtype == np.int32
    assert views.min() >= 0 and views.max() <= cfg["padding_token"]
    assert np.all(views[:, cfg["min_file_size_for_dl"] - 1] != cfg["padding_token"])  # magika would model each
    assert np.array_equal(views, zoo.magika_views(files, 64, seed=3))  # seeded
    whole = np.stack([zoo.magika_features(p) for p in files])
    assert not any(np.array_equal(v, w) for v in views[:16] for w in whole[:1])  # views, not copies of the file
    (probs,) = ort.run_batched(str(zoo.magika_model_path()), {"bytes": views}).values()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)  # the teacher labels every view


def test_a_file_of_the_minimum_size_has_one_view_its_own_features(tmp_path):
    least = zoo.magika_config()["min_file_size_for_dl"]
    path = tmp_path / "small.txt"
    path.write_bytes(b"x" * least)
    views = zoo.magika_views([path], 3)
    assert all(np.array_equal(v, zoo.magika_features(path)) for v in views)


def test_files_too_small_for_magika_are_refused(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"ab")
    with pytest.raises(DataError, match="none of the 1 files"):
        zoo.magika_views([path], 4)
