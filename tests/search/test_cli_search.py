"""`slimgraph search`: help, a real run, and bad input (exit 2, one line, no output folder)."""

from __future__ import annotations

import pytest

from slimgraph import cli


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["search", "--help"])
    text = capsys.readouterr().out
    for flag in ("--eval", "--max-drop", "--objectives", "--strategy", "--jobs", "--executor", "--resume", "--space"):
        assert flag in text


def test_cli_search_runs(digits, tmp_path, capsys):
    model, data = digits
    space = tmp_path / "space.yaml"
    space.write_text("stages:\n  - {name: c, pick: all, passes: {optimize: {}}}\n"
                     "  - {name: q, pick: one, passes: {quantize.dynamic: {}}}\n")
    code = cli.main(["search", str(model), "--data", str(data), "-o", str(tmp_path / "s"), "--trials", "2",
                     "--strategy", "exhaustive", "--space", str(space), "--latency-runs", "5",
                     "--seed-recipes", "int8"])
    assert code == 0 and (tmp_path / "s" / "best.onnx").is_file()
    assert "budget met" in capsys.readouterr().out
    report = (tmp_path / "s" / "report.md").read_text()
    # trial 0 is the seeded recipe, trial 1 the space's one pipeline: both count toward --trials 2
    assert "Seeded: the first 1 trials are built-in recipes applied alone (int8)" in report
    assert "| 0 (seeded)" in report and "`optimize,quantize.dynamic`" in report


@pytest.mark.parametrize("extra, message", [
    (["--space", "SPACE"], "unknown pass 'quantize.statik'"),
    (["--eval", "no_such_module_q:f"], "cannot import module"),
    (["--objectives", "speed"], "unknown objective"),
    (["--max-drop", "5"], "--max-drop"),
    (["--reference", "int9"], "unknown reference recipe"),
    (["--seed-recipes", "int9"], "unknown recipe(s) to seed"),
    (["--space", "EMPTY"], "no stages"),
])
def test_bad_input_exits_2_without_output(digits, tmp_path, capsys, extra, message):
    model, data = digits
    (tmp_path / "bad.yaml").write_text("stages:\n  - {name: q, passes: {quantize.statik: {}}}\n")
    (tmp_path / "empty.yaml").write_text("stages: []\n")
    extra = [str(tmp_path / "bad.yaml") if e == "SPACE" else str(tmp_path / "empty.yaml") if e == "EMPTY" else e
             for e in extra]
    out = tmp_path / "s"
    code = cli.main(["search", str(model), "--data", str(data), "-o", str(out), "-q", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and not out.exists()
    assert len(err.strip().splitlines()) <= 3


def test_no_data_and_no_eval_is_bad_input(digits, tmp_path, capsys):
    model, _ = digits
    assert cli.main(["search", str(model), "-o", str(tmp_path / "s"), "-q"]) == 2
    assert "needs --data" in capsys.readouterr().err
