"""Shared pieces of the search tests: the real digits CNN, a small slice of its real test
images as data, and a tiny search space over it."""

from __future__ import annotations

import numpy as np
import pytest

TINY_SPACE = {
    "stages": [
        {"name": "cleanup", "pick": "all", "passes": {"optimize": {}}},
        {"name": "structure", "pick": "one", "passes": {"prune.magnitude": {"sparsity": [0.5, 0.9]}}},
        {"name": "quantization", "pick": "one", "passes": {"quantize.static": {"per_channel": [True]}}},
        {"name": "packing", "pick": "any", "passes": {"pack.sparse": {}}},
    ]
}


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """(model path, .npz path with 64 real test images and their labels)."""
    from slimgraph import zoo

    d = zoo.digits_test_data()
    path = tmp_path_factory.mktemp("digits") / "digits64.npz"
    np.savez(path, input=d["input"][:64], labels=d["labels"][:64])
    return zoo.digits_cnn(), path


#: space-only trials (seeding the search with recipes has its own tests)
FAST = dict(latency_runs=5, progress=False, seed_recipes=False)
