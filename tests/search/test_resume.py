"""Resuming an interrupted search (the optuna SQLite study), for optuna and replaying
strategies, and each strategy running on the real digits CNN."""

from __future__ import annotations

import pytest

from slimgraph.search import search
from tests.search.conftest import FAST, TINY_SPACE


@pytest.mark.parametrize("strategy", ["tpe", "random", "greedy"])
def test_resume_after_interruption_continues_where_it_stopped(digits, tmp_path, strategy):
    model, data = digits
    out = tmp_path / "s"
    seen = []

    def stop_after_two(rec):
        seen.append(rec["pipeline"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search(model, data, output=out, trials=5, strategy=strategy, space=TINY_SPACE, on_trial=stop_after_two, **FAST)
    assert not (out / "report.md").exists()
    with pytest.raises(Exception, match="already holds a search"):
        search(model, data, output=out, trials=5, strategy=strategy, space=TINY_SPACE, **FAST)
    later = []
    result = search(model, data, output=out, trials=5, strategy=strategy, space=TINY_SPACE, resume=True,
                    on_trial=lambda r: later.append(r["pipeline"]), **FAST)
    assert len(result.trials) == 5 and len(later) == 3  # only the missing trials ran
    assert [r["pipeline"] for r in result.trials[:2]] == seen
    assert [r["number"] for r in result.trials] == list(range(5))


@pytest.mark.parametrize("strategy", ["nsga2", "exhaustive"])
def test_other_strategies_run(digits, tmp_path, strategy):
    model, data = digits
    result = search(model, data, output=tmp_path / "s", trials=4, strategy=strategy, space=TINY_SPACE, **FAST)
    assert len(result.trials) == 4 and result.hypervolume() >= 0.0
