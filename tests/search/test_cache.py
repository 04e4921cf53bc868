"""The prefix cache: the sha256 chain (model, data, each pass's name + version + config),
reuse of shared prefixes on the real digits CNN with the same result as an uncached build,
and failures recorded under their step's key."""

from __future__ import annotations

import numpy as np

from slimgraph.backends import ort
from slimgraph.search.cache import chain, data_hash, root_key
from slimgraph.search.candidate import Candidate
from slimgraph.search.evaluate import Settings, build, run_job


def _cand(*steps):
    return Candidate.from_spec(list(steps))


def test_chain_shares_prefix_keys_and_depends_on_everything():
    root = root_key(b"model", data_hash({"x": np.ones((2, 3), np.float32)}), seed=0)
    a = chain(root, _cand("optimize", {"prune.magnitude": {"sparsity": 0.5}}, "pack.sparse"))
    b = chain(root, _cand("optimize", {"prune.magnitude": {"sparsity": 0.5}}, {"quantize.dynamic": {}}))
    c = chain(root, _cand("optimize", {"prune.magnitude": {"sparsity": 0.6}}, "pack.sparse"))
    assert a[:2] == b[:2] and a[2] != b[2]
    assert a[0] == c[0] and a[1] != c[1]
    assert chain(root_key(b"model", data_hash({"x": np.zeros((2, 3), np.float32)}), 0), _cand("optimize")) != a[:1]
    plain = root_key(b"model", data_hash(None), 0)
    assert chain(root_key(b"other", data_hash(None), 0), _cand("optimize")) != chain(plain, _cand("optimize"))
    # a pass's defaults written out or left implicit are the same step
    assert chain(root, _cand({"prune.magnitude": {"sparsity": 0.5, "scope": "layer"}})) == \
        chain(root, _cand({"prune.magnitude": {"sparsity": 0.5}}))


def test_shared_prefix_is_reused_and_gives_the_uncached_result(digits, tmp_path):
    model, data = digits
    cached = Settings(str(model), str(data), str(tmp_path / "c"))
    first = _cand("optimize", {"prune.magnitude": {"sparsity": 0.5}})
    second = _cand("optimize", {"prune.magnitude": {"sparsity": 0.5}}, "pack.sparse")
    assert build(cached, first)[1:] == (0, 2)
    path, hits, built = build(cached, second)
    assert (hits, built) == (2, 1)
    plain, _, built_plain = build(Settings(str(model), str(data), str(tmp_path / "u"), use_cache=False), second)
    assert built_plain == 3
    x = {"input": np.load(data)["input"]}
    np.testing.assert_array_equal(ort.run_batched(path, x)["logits"], ort.run_batched(plain, x)["logits"])


def test_a_failed_step_is_recorded_and_not_rerun(digits, tmp_path):
    model, data = digits
    settings = Settings(str(model), str(data), str(tmp_path / "c"))
    # clustering to k=8 then int4 blocks break the clusters contract (the run manager checks it;
    # the search's order DAG would never propose this pair, run_job builds what it is given)
    bad = _cand("optimize", {"cluster.kmeans": {"k": 8}}, {"quantize.weight_only": {}})
    first = run_job(settings, bad)
    assert first.status == "failed" and "clusters contract" in first.error and "Traceback" in first.traceback
    longer = _cand("optimize", {"cluster.kmeans": {"k": 8}}, {"quantize.weight_only": {}}, "pack.clusters")
    again = run_job(settings, longer)
    assert again.status == "failed" and "recorded in the cache" in again.error
