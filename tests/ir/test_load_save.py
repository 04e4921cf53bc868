"""Loading from every accepted source, atomic saving, external data, and bad files."""

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph.errors import ModelLoadError
from tests.helpers import ort_outputs

# Weights over the 1 KB external-data threshold, so external data really is used.
TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 64] x) => (float[N, 32] y) {
    h = MatMul (x, w)
    y = Relu (h)
}
"""


def _model_proto(opset: int = 17) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(TEXT.replace('"" : 17', f'"" : {opset}'))
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    return proto


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(_model_proto().SerializeToString())
    return path


def _feeds():
    return {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}


def _weight(model) -> np.ndarray:
    return model.graph.initializers["w"].const_value.numpy()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- sources ------------------------------------------------------------------------------------
def test_every_source_loads_the_same_model(model_file):
    proto = _model_proto()
    models = {
        "path": slimgraph.load(model_file),
        "str path": slimgraph.load(str(model_file)),
        "bytes": slimgraph.load(model_file.read_bytes()),
        "ModelProto": slimgraph.load(proto),
        "onnx_ir.Model": slimgraph.load(ir.from_proto(proto)),
    }
    reference = ort_outputs(models["ModelProto"], _feeds())["y"]
    for source, model in models.items():
        assert [n.op_type for n in model.graph] == ["MatMul", "Relu"], source
        np.testing.assert_array_equal(_weight(model), _weight(models["ModelProto"]), err_msg=source)
        np.testing.assert_array_equal(ort_outputs(model, _feeds())["y"], reference, err_msg=source)
    assert models["path"].source == str(model_file)


def test_loading_a_model_returns_it():
    model = slimgraph.load(_model_proto())
    assert slimgraph.load(model) is model


def test_load_then_save_round_trips_exactly(model_file, tmp_path):
    out = slimgraph.save(slimgraph.load(model_file), tmp_path / "out" / "copy.onnx")
    saved, original = onnx.load(out), onnx.load(model_file)
    # onnx-ir adds a value_info entry giving each initializer's type; nothing else moves
    assert [v.name for v in saved.graph.value_info] == [t.name for t in original.graph.initializer]
    saved.graph.ClearField("value_info")
    # same graph (the text form ignores proto encoding details such as an explicit domain="")
    assert onnx.printer.to_text(saved) == onnx.printer.to_text(original)
    for a, b in zip(saved.graph.initializer, original.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_input_file_is_untouched_by_load_run_and_save(model_file, tmp_path):
    before, mtime = _sha(model_file), model_file.stat().st_mtime_ns
    result = slimgraph.run(slimgraph.load(model_file), "cleanup")
    slimgraph.save(result.model, tmp_path / "elsewhere.onnx")
    assert _sha(model_file) == before
    assert model_file.stat().st_mtime_ns == mtime


# --- atomic saving ----------------------------------------------------------------------------
def test_failed_write_leaves_no_file_and_no_temporaries(tmp_path, monkeypatch):
    def write_half_then_fail(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        slimgraph.save(slimgraph.load(_model_proto()), tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_keeps_the_previous_file(model_file, monkeypatch):
    before = _sha(model_file)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError, match="rename failed"):
        slimgraph.save(slimgraph.load(_model_proto(opset=18)), model_file)
    assert _sha(model_file) == before
    assert sorted(p.name for p in model_file.parent.iterdir()) == ["model.onnx"]


# --- external data ------------------------------------------------------------------------------
def test_external_data_save_and_load(tmp_path):
    model = slimgraph.load(_model_proto())
    path = slimgraph.save(model, tmp_path / "ext.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    assert path.stat().st_size < 1024 < (tmp_path / "ext.onnx.data").stat().st_size
    loaded = slimgraph.load(path)
    np.testing.assert_array_equal(_weight(loaded), _weight(model))


def test_model_loaded_from_external_data_runs_and_saves_elsewhere(tmp_path):
    model = slimgraph.load(_model_proto())
    (tmp_path / "a").mkdir()
    loaded = slimgraph.load(slimgraph.save(model, tmp_path / "a" / "ext.onnx", external_data=True))
    np.testing.assert_array_equal(ort_outputs(loaded, _feeds())["y"], ort_outputs(model, _feeds())["y"])
    for external in (False, True):
        copy = slimgraph.save(loaded, tmp_path / "b" / f"copy{int(external)}.onnx", external_data=external)
        np.testing.assert_array_equal(_weight(slimgraph.load(copy)), _weight(model))


def test_missing_external_data_file_names_it(tmp_path):
    path = slimgraph.save(slimgraph.load(_model_proto()), tmp_path / "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match=r"ext\.onnx\.data.*missing"):
        slimgraph.load(path)


# --- bad input ----------------------------------------------------------------------------------
def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a model\n" * 20)
    with pytest.raises(ModelLoadError, match="notes.onnx"):
        slimgraph.load(path)


def test_truncated_file(model_file):
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.onnx.*truncated"):
        slimgraph.load(model_file)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        slimgraph.load(tmp_path / "absent.onnx")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ModelLoadError, match="is a folder"):
        slimgraph.load(tmp_path)


def test_unsupported_source_type():
    with pytest.raises(ModelLoadError, match="cannot load a int"):
        slimgraph.load(42)


def test_opset_6_is_rejected_and_7_accepted():
    with pytest.raises(ModelLoadError, match=r"opset 6 .*version_converter"):
        slimgraph.load(_model_proto(opset=6))
    assert slimgraph.load(_model_proto(opset=7)).opset == 7
