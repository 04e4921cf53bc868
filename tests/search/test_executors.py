"""Executors: a local process pool, Ray missing or unreachable (a clear message; local only
when allowed), and a real local Ray instance (slow: starting Ray takes ~10 s)."""

from __future__ import annotations

import sys

import pytest

from slimgraph import cli
from slimgraph.search import search
from slimgraph.search.executors import ExecutorError, LocalExecutor, make_executor
from tests.search.conftest import FAST, TINY_SPACE


def test_two_jobs_in_a_process_pool(digits, tmp_path):
    model, data = digits
    result = search(model, data, output=tmp_path / "s", trials=4, strategy="random", space=TINY_SPACE, jobs=2, **FAST)
    assert len(result.trials) == 4 and all(r["status"] in ("ok", "pruned") for r in result.trials)
    serial = search(model, data, output=tmp_path / "t", trials=4, strategy="random", space=TINY_SPACE, **FAST)
    assert [r["accuracy"] for r in result.trials] == [r["accuracy"] for r in serial.trials]


def test_ray_missing_is_a_clear_error_unless_fallback_is_allowed(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ExecutorError, match="Ray is not installed.*--fallback-local"):
        make_executor("ray", address="127.0.0.1:6379")
    runner, note = make_executor("ray", address="127.0.0.1:6379", fallback_local=True)
    assert isinstance(runner, LocalExecutor) and "ran locally instead" in note


def test_ray_unreachable_fails_fast_with_the_address(digits, tmp_path, capsys):
    pytest.importorskip("ray")
    model, data = digits
    with pytest.raises(ExecutorError, match="nothing answers at '127.0.0.1:1'"):
        make_executor("ray", address="127.0.0.1:1")
    code = cli.main(["search", str(model), "--data", str(data), "-o", str(tmp_path / "s"), "--executor", "ray",
                     "--address", "127.0.0.1:1", "-q"])
    assert code == 2 and not (tmp_path / "s").exists()
    assert "127.0.0.1:1" in capsys.readouterr().err


def test_ray_unreachable_with_fallback_runs_locally(digits, tmp_path):
    pytest.importorskip("ray")
    model, data = digits
    result = search(model, data, output=tmp_path / "s", trials=2, strategy="random", space=TINY_SPACE,
                    executor="ray", address="127.0.0.1:1", fallback_local=True, **FAST)
    assert len(result.trials) == 2 and any("ran locally instead" in n for n in result.notes)
    assert "ran locally instead" in (tmp_path / "s" / "report.md").read_text()


@pytest.mark.slow
def test_search_on_a_local_ray_instance(digits, tmp_path):
    ray = pytest.importorskip("ray")
    model, data = digits
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        result = search(model, data, output=tmp_path / "s", trials=3, strategy="random", space=TINY_SPACE,
                        executor="ray", **FAST)
    finally:
        ray.shutdown()
    local = search(model, data, output=tmp_path / "t", trials=3, strategy="random", space=TINY_SPACE, **FAST)
    assert [r["pipeline"] for r in result.trials] == [r["pipeline"] for r in local.trials]
    assert [r["accuracy"] for r in result.trials] == [r["accuracy"] for r in local.trials]
