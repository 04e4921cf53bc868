"""The CLI end to end, in-process: good paths and every kind of bad input the issue lists
(one-line error naming the thing, exit 2, no output file, input untouched)."""

import hashlib
import json

import numpy as np
import onnx
import pytest

from slimgraph.cli import main

MODEL = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[N,4] x) => (float[N,3] y) {
    w = Constant <value = float[4,3] {1,2,3,4,5,6,7,8,9,10,11,12}> ()
    i = Identity (x)
    m = MatMul (i, w)
    y = Relu (m)
}
"""


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(onnx.parser.parse_model(MODEL), path)
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_json_has_the_documented_keys(model_path, capsys):
    code, out, _ = run_cli(capsys, "inspect", model_path, "--json")
    assert code == 0
    info = json.loads(out)
    for key in ("opset", "inputs", "outputs", "nodes", "op_counts", "params", "bytes", "macs"):
        assert key in info
    assert info["opset"] == 15 and info["op_counts"]["MatMul"] == 1 and info["macs"] == 12
    assert 0 < info["file_zipped_bytes"] and info["file_bytes"] > 0  # raw and zipped, side by side


def test_passes_lists_registered_passes_and_recipes(capsys):
    code, out, _ = run_cli(capsys, "passes", "--json")
    assert code == 0
    info = json.loads(out)
    names = {p["name"] for p in info["passes"]}
    assert {"lift_constants", "fold_constants", "cse", "eliminate_dead", "upgrade_opset"} <= names
    assert "cleanup" in info["recipes"]


def test_run_writes_model_and_report_and_leaves_input_alone(model_path, tmp_path, capsys):
    before = digest(model_path)
    out_path, report = tmp_path / "out.onnx", tmp_path / "report.md"
    code, out, _ = run_cli(capsys, "run", model_path, "-p", "cleanup", "-o", out_path, "--verify", "--report", report, "-q")
    assert code == 0
    assert digest(model_path) == before
    m = onnx.load(out_path)
    assert [n.op_type for n in m.graph.node] == ["MatMul", "Relu"]
    assert "| lift_constants | yes |" in report.read_text()


def test_run_with_data_and_compare(model_path, tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32))
    out_path = tmp_path / "out.onnx"
    assert run_cli(capsys, "run", model_path, "-p", "cleanup", "-o", out_path, "--data", data, "--verify", "-q")[0] == 0
    code, out, _ = run_cli(capsys, "compare", model_path, out_path, "--data", data, "--json")
    assert code == 0
    assert json.loads(out)["y"]["max_abs"] == 0.0


def test_bench_two_models(model_path, capsys):
    code, out, _ = run_cli(capsys, "bench", model_path, model_path, "--runs", "3", "--warmup", "1", "--json")
    assert code == 0
    stats = json.loads(out)
    assert len(stats) == 2 and all(v["median"] > 0 for v in stats.values())


@pytest.mark.parametrize("command", ["inspect", "passes", "run", "quantize", "bench", "compare"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: slimgraph" in capsys.readouterr().out


# --- bad input --------------------------------------------------------------------------------
def assert_bad_input(capsys, argv, *must_mention, out_path=None):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    line = " ".join(err.split())
    assert "slimgraph: error:" in line and "Traceback" not in err
    for word in must_mention:
        assert str(word) in line, line
    if out_path is not None:
        assert not out_path.exists()


def test_not_an_onnx_file(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model")
    out_path = tmp_path / "o.onnx"
    assert_bad_input(capsys, ["run", bad, "-p", "cleanup", "-o", out_path], "notes.onnx", "not a valid ONNX model", out_path=out_path)


def test_truncated_file(model_path, tmp_path, capsys):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(model_path.read_bytes()[:-40])
    assert_bad_input(capsys, ["inspect", cut], "cut.onnx")


def test_missing_file(tmp_path, capsys):
    assert_bad_input(capsys, ["inspect", tmp_path / "nope.onnx"], "nope.onnx", "no such file")


def test_missing_external_data(tmp_path, capsys):
    proto = onnx.parser.parse_model(MODEL.replace("w = Constant <value = float[4,3] {1,2,3,4,5,6,7,8,9,10,11,12}> ()\n", ""))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w"))
    path = tmp_path / "ext.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    assert_bad_input(capsys, ["inspect", path], "ext.onnx.data", "missing")


def test_op_ort_cannot_run(tmp_path, capsys):
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 15, "made.up" : 1]>
    g (float[2] x) => (float[2] y) { y = made.up.Frobnicate (x) }
    """)
    path = tmp_path / "custom.onnx"
    onnx.save(proto, path)
    assert_bad_input(capsys, ["bench", path, "--runs", "2"], "Frobnicate")


def test_invalid_pipeline_string(model_path, tmp_path, capsys):
    out_path = tmp_path / "o.onnx"
    assert_bad_input(capsys, ["run", model_path, "-p", "cleanup,fold_batchnrom", "-o", out_path],
                     "fold_batchnrom", out_path=out_path)


@pytest.mark.parametrize("arrays, mention", [
    ({"inputs": np.zeros((2, 4), np.float32)}, "missing ['x']"),
    ({"x": np.zeros((2, 5), np.float32)}, "axis 1 must be 4"),
    ({"x": np.zeros((2, 4, 1, 1), np.float32)}, "store samples as rank 2 (batched) or 3 (stacked)"),
])
def test_npz_that_does_not_fit(model_path, tmp_path, capsys, arrays, mention):
    data = tmp_path / "d.npz"
    np.savez(data, **arrays)
    out_path = tmp_path / "o.onnx"
    assert_bad_input(capsys, ["run", model_path, "-p", "cleanup", "-o", out_path, "--data", data],
                     "d.npz", mention, out_path=out_path)


def test_output_may_not_overwrite_input(model_path, capsys):
    before = digest(model_path)
    assert_bad_input(capsys, ["run", model_path, "-p", "cleanup", "-o", model_path], "overwrite the input")
    assert digest(model_path) == before


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(Exception, match="no such file"):
        main(["--debug", "inspect", str(tmp_path / "nope.onnx")])


# --- inspect --runtime ------------------------------------------------------------------------
QOPERATOR = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[1,4,8,8] x) => (float[1,8,8,8] y) {
    xq = QuantizeLinear(x, s, z)
    c = QLinearConv<pads=[1,1,1,1]>(xq, s, z, w, ws, wz, s, z)
    y = DequantizeLinear(c, s, z)
}
"""


def qoperator_model(tmp_path, weights):
    proto = onnx.parser.parse_model(QOPERATOR)
    for name, value in {"s": np.array(0.02, np.float32), "z": np.array(128, np.uint8), "w": weights,
                        "ws": np.array(0.01, np.float32), "wz": np.array(0, np.int8)}.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    path = tmp_path / "q.onnx"
    onnx.save(proto, path)
    return path


@pytest.fixture
def wide(monkeypatch):
    """Tables on one line per row, so a test can look for whole sentences."""
    import slimgraph.cli as cli
    from rich.console import Console

    monkeypatch.setattr(cli, "out", Console(highlight=False, width=400))


@pytest.fixture
def no_vnni(monkeypatch):
    from slimgraph.backends import runtime_check

    cpu = runtime_check.CpuInfo("x86_64", frozenset({"avx2"}), "test CPU")
    monkeypatch.setattr(runtime_check, "cpu_info", lambda *a: cpu)


def test_inspect_runtime_json(tmp_path, capsys, no_vnni):
    weights = np.random.default_rng(0).integers(-60, 60, (8, 4, 3, 3)).astype(np.int8)
    code, out, _ = run_cli(capsys, "inspect", qoperator_model(tmp_path, weights), "--runtime", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["float_islands"] == [] and info["pitfalls"] == [] and info["integer_mac_share"] == 1.0
    assert {"QuantizeLinear", "QLinearConv", "DequantizeLinear"} <= {n["op"] for n in info["nodes"]}
    assert info["quantize_at_inputs"] == 1 and info["dequantize_at_outputs"] == 1
    assert info["cpu"]["vnni"] is False


def test_inspect_runtime_warns_on_stderr(tmp_path, capsys, no_vnni, wide):
    weights = np.full((8, 4, 3, 3), 127, np.int8)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).uniform(0, 2.5, (4, 4, 8, 8)).astype(np.float32))
    code, out, err = run_cli(capsys, "inspect", qoperator_model(tmp_path, weights), "--runtime", "--data", data)
    assert code == 0
    warning = " ".join(err.split())
    assert "slimgraph: warning: this CPU has no VNNI: u8s8 kernels can saturate int16 pair sums" in warning
    assert "observed" in warning  # activation range measured on --data
    assert "what ONNX Runtime" in out and "MACs in integer kernels: 100.0%" in out


def test_inspect_runtime_lists_float_islands_with_reasons(model_path, capsys, wide):
    code, out, _ = run_cli(capsys, "inspect", model_path, "--runtime")
    assert code == 0
    assert "1 float island(s)" in out
    assert "MatMul 'MatMul_2' reads the float model input 'x': no QuantizeLinear before it" in out


def test_runtime_options_need_runtime(model_path, tmp_path, capsys):
    assert_bad_input(capsys, ["inspect", model_path, "--data", tmp_path / "d.npz"], "--data", "inspect --runtime")


# --- quantize ---------------------------------------------------------------------------------
def test_quantize_without_data_says_calibration_data_is_needed(model_path, tmp_path, capsys):
    out_path = tmp_path / "q.onnx"
    code, _, err = run_cli(capsys, "quantize", model_path, "-o", out_path)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "calibration data" in err and "--data" in err and "m.onnx" in err
    assert not out_path.exists()


@pytest.mark.parametrize("argv, mention", [
    (["--format", "int4"], "invalid choice: 'int4'"),
    ([], "required: -o/--output"),
])
def test_quantize_argument_errors(model_path, capsys, argv, mention):
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(model_path), *argv, *([] if not argv else ["-o", "x.onnx"])])
    assert e.value.code == 2
    assert mention in capsys.readouterr().err


def test_quantize_maps_to_the_recipe_of_its_format(model_path, tmp_path, capsys, monkeypatch):
    import slimgraph.cli as cli
    from slimgraph.passes import pipeline

    seen = []
    monkeypatch.setattr(pipeline, "recipe_names", lambda: ["cleanup", "int8", "int8-qdq"])
    monkeypatch.setattr(cli, "cmd_run", lambda args: seen.append((args.pipeline, args.data, args.output)) or 0)
    data = tmp_path / "d.npz"
    for fmt, recipe in (("qoperator", "int8"), ("qdq", "int8-qdq")):
        assert run_cli(capsys, "quantize", model_path, "--data", data, "-o", tmp_path / "q.onnx", "--format", fmt)[0] == 0
        assert seen[-1] == (recipe, str(data), str(tmp_path / "q.onnx"))


def test_quantize_names_a_missing_recipe(model_path, tmp_path, capsys, monkeypatch):
    from slimgraph.passes import pipeline

    monkeypatch.setattr(pipeline, "recipe_names", lambda: ["cleanup"])
    out_path = tmp_path / "q.onnx"
    assert_bad_input(capsys, ["quantize", model_path, "--data", tmp_path / "d.npz", "-o", out_path, "--format", "qdq"],
                     "'int8-qdq' recipe", out_path=out_path)


def test_run_report_has_the_per_layer_sensitivity_table(tmp_path, capsys):
    from slimgraph import zoo

    data = tmp_path / "calib.npz"
    np.savez(data, input=zoo.digits_data().x_train[:16])
    report = tmp_path / "r.md"
    code, _, err = run_cli(capsys, "run", zoo.digits_cnn(), "-p", "optimize,quantize.sensitivity,quantize.mixed_precision",
                           "-o", tmp_path / "o.onnx", "--data", data, "--report", report, "-q")
    assert code == 0, err
    text = report.read_text()
    assert "## Per-layer quantization sensitivity" in text and "| 1 |" in text and "SQNR" in text


def test_quantize_end_to_end(tmp_path, capsys):
    """A small CNN through `slimgraph quantize` (the int8 recipe) and `inspect --runtime`."""
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,8,8] x) => (float[1,8,8,8] y) {
        c = Conv<pads=[1,1,1,1]>(x, w)
        y = Relu(c)
    }
    """)
    rng = np.random.default_rng(0)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"))
    src, dst, report = tmp_path / "cnn.onnx", tmp_path / "cnn.int8.onnx", tmp_path / "r.md"
    onnx.save(proto, src)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    code, out, err = run_cli(capsys, "quantize", src, "--data", data, "-o", dst, "--report", report, "-q")
    assert code == 0, err
    assert "quantize.static" in report.read_text()
    code, out, _ = run_cli(capsys, "inspect", dst, "--runtime", "--json")
    info = json.loads(out)
    assert info["integer_mac_share"] == 1.0 and info["quantize_at_inputs"] == 1
