"""The ORT backend: sessions from every source, clear errors on refused models, batched
runs, interleaved benchmarks, and the report of what ORT really executes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

import slimgraph
from slimgraph.backends import OpKind, op_kind, ort
from slimgraph.errors import DataError, ModelLoadError, PipelineError, UnsupportedOpError

CONV_BN_RELU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y)
<float[4, 3, 1, 1] w = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2},
 float[4] scale = {1, 2, 3, 4}, float[4] bias = {0, 1, 0, 1},
 float[4] mean = {0, 0, 1, 1}, float[4] var = {1, 1, 2, 2}>
{
    c = Conv(x, w)
    bn = BatchNormalization(c, scale, bias, mean, var)
    y = Relu(bn)
}
"""

@pytest.fixture
def conv_proto() -> onnx.ModelProto:
    return onnx.parser.parse_model(CONV_BN_RELU)


@pytest.fixture
def x(rng) -> np.ndarray:
    return rng.standard_normal((5, 3, 8, 8)).astype(np.float32)


def _reference(x: np.ndarray) -> np.ndarray:
    """Conv(1x1) + BN + Relu in numpy."""
    w = np.arange(1, 13, dtype=np.float32).reshape(4, 3) / 10
    scale, bias = np.array([1, 2, 3, 4], np.float32), np.array([0, 1, 0, 1], np.float32)
    mean, var = np.array([0, 0, 1, 1], np.float32), np.array([1, 1, 2, 2], np.float32)
    c = np.einsum("oc,nchw->nohw", w, x)
    k = (scale / np.sqrt(var + 1e-5))[None, :, None, None]
    return np.maximum((c - mean[None, :, None, None]) * k + bias[None, :, None, None], 0)


# --- sessions from every source ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["model", "ir", "proto", "bytes", "path"])
def test_session_from_each_source(kind, conv_proto, x, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_proto, path)
    source = {
        "model": lambda: slimgraph.load(conv_proto),
        "ir": lambda: slimgraph.load(conv_proto).ir,
        "proto": lambda: conv_proto,
        "bytes": lambda: conv_proto.SerializeToString(),
        "path": lambda: path,
    }[kind]()
    sess = ort.session(source, threads=1)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    out = ort.run(sess, {"x": x})
    np.testing.assert_allclose(out["y"], _reference(x), rtol=1e-5, atol=1e-5)


def test_session_from_model_with_external_data(conv_proto, x, tmp_path):
    """A Model loaded from a file with external data keeps lazy references to it; the
    session must read them in, from any working directory."""
    onnx.save(conv_proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    model = slimgraph.load(tmp_path / "m.onnx")
    np.testing.assert_allclose(ort.run(model, {"x": x})["y"], _reference(x), rtol=1e-5, atol=1e-5)
    assert ort.runtime_report(model, optimization="basic").op_counts() == {"Conv": 1, "Relu": 1}


def test_session_writes_optimized_model(conv_proto, tmp_path):
    target = tmp_path / "opt.onnx"
    ort.session(conv_proto, optimization="basic", optimized_model_path=target)
    ops = [n.op_type for n in onnx.load(target).graph.node]
    assert "BatchNormalization" not in ops and "Conv" in ops


def test_unknown_optimization_level_and_provider(conv_proto):
    with pytest.raises(PipelineError, match="optimization level 'fast'"):
        ort.session(conv_proto, optimization="fast")
    with pytest.raises(PipelineError, match="unknown provider 'tpu'"):
        ort.session(conv_proto, provider="tpu")


@pytest.mark.skipif(ort.has_cuda(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_clear_error(conv_proto):
    with pytest.raises(PipelineError, match="onnxruntime-gpu"):
        ort.session(conv_proto, provider="cuda")


@pytest.mark.skipif(not ort.has_cuda(), reason="needs onnxruntime-gpu and a GPU")
def test_cuda_session_runs(conv_proto, x):
    sess = ort.session(conv_proto, provider="cuda")
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(ort.run(sess, {"x": x})["y"], _reference(x), rtol=1e-4, atol=1e-4)


# --- models ORT refuses -------------------------------------------------------------------------
def _model(body: str, inputs: str = "float[1, 4] x", outputs: str = "float[1, 4] y", opsets: str = '"" : 17') -> onnx.ModelProto:
    return onnx.parser.parse_model(f"<ir_version: 8, opset_import: [{opsets}]> g ({inputs}) => ({outputs}) {{ {body} }}")


def test_op_in_unknown_domain_names_op_domain_and_node():
    model = _model("y = my.dom.Frob(x)", opsets='"" : 17, "my.dom" : 1')
    with pytest.raises(UnsupportedOpError) as e:
        ort.session(model)
    assert "'Frob'" in str(e.value) and "'my.dom'" in str(e.value) and "['y']" in str(e.value)
    assert "custom-op library" in str(e.value)


def test_op_without_kernel_for_its_type_names_node_and_fix():
    model = _model("t = Tan(x)", inputs="double[4] x", outputs="double[4] t")
    model.graph.node[0].name = "tan_node"
    with pytest.raises(UnsupportedOpError) as e:
        ort.session(model)
    message = str(e.value)
    assert "no kernel for Tan" in message and "'tan_node'" in message and "x: double" in message
    assert "cast its inputs" in message
    assert "\n" not in message


def test_unknown_standard_op():
    with pytest.raises(UnsupportedOpError, match="no op 'Froblicate' exists in opset 17"):
        ort.session(_model("y = Froblicate(x)"))


def test_invalid_graph_is_a_load_error():
    with pytest.raises(ModelLoadError, match="Neg"):
        ort.session(_model("y = Neg(x)", inputs="bool[1, 4] x", outputs="bool[1, 4] y"))
    with pytest.raises(ModelLoadError, match="check_model"):
        ort.session(_model("y = Add(x, missing)"))


def test_unreadable_sources(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        ort.session(tmp_path / "absent.onnx")
    with pytest.raises(ModelLoadError, match="cannot read the model"):
        ort.session(b"not an onnx model")
    with pytest.raises(ModelLoadError, match="cannot make an ORT session from a int"):
        ort.session(3)


# --- runs -----------------------------------------------------------------------------------
def test_run_checks_feeds(conv_proto, x):
    with pytest.raises(DataError, match=r"missing \['x'\].*unexpected \['z'\]"):
        ort.run(conv_proto, {"z": x})
    with pytest.raises(DataError, match="Got invalid dimensions"):
        ort.run(conv_proto, {"x": x[:, :2]})
    with pytest.raises(DataError, match="dtype complex64"):
        ort.run(conv_proto, {"x": x.astype(np.complex64)})
    out = ort.run(conv_proto, {"x": x.astype(np.float64)})  # same-kind cast is fine
    assert out["y"].dtype == np.float32


@pytest.mark.parametrize("batch_size", [None, 1, 2])
def test_run_batched_equals_single_runs_dynamic_batch(conv_proto, x, batch_size):
    sess = ort.session(conv_proto)
    batched = ort.run_batched(sess, {"x": x}, batch_size=batch_size)
    singles = np.concatenate([ort.run(sess, {"x": x[i:i + 1]})["y"] for i in range(len(x))])
    assert batched["y"].shape == (5, 4, 8, 8)
    np.testing.assert_array_equal(batched["y"], singles)


def test_run_batched_fixed_batch_and_rank0_output(rng):
    model = _model(
        "axes = Constant <value = int64[1] {1}> () y = Relu(x) s = ReduceSum <keepdims = 0> (x, axes)",
        outputs="float[1, 4] y, float[1] s",
    )
    data = rng.standard_normal((6, 4)).astype(np.float32)
    out = ort.run_batched(model, {"x": data}, batch_size=4)  # fixed batch: one at a time
    np.testing.assert_array_equal(out["y"], np.maximum(data, 0))
    np.testing.assert_allclose(out["s"], data.sum(1), rtol=1e-6)
    with pytest.raises(DataError, match="different sample counts"):
        two = _model("y = Add(a, b)", inputs="float[1, 4] a, float[1, 4] b")
        ort.run_batched(two, {"a": data, "b": data[:3]})


# --- bench ------------------------------------------------------------------------------------
def test_bench_stats_and_self_vs_self(conv_proto, x):
    stats = ort.bench({"a": conv_proto, "b": conv_proto}, {"x": x[:1], "unused": x}, runs=8, warmup=2, threads=1)
    assert list(stats) == ["a", "b"]
    for s in stats.values():
        assert s.runs == 8 and len(s.times) == 8 and s.threads == 1 and s.provider == "cpu"
        assert 0 < s.p10 <= s.median <= s.p90 and s.mean > 0 and s.std >= 0
        assert "times" not in s.as_dict()
    ratio = stats["a"].median / stats["b"].median
    assert 0.2 < ratio < 5, f"self-vs-self median ratio {ratio:.2f}: interleaving is broken"
    assert 0.2 < stats["a"].ratio_to(stats["b"]) < 5
    assert stats["a"].ratio_to(stats["a"]) == 1.0


def test_bench_generates_feeds_and_accepts_sessions(conv_proto):
    sess = ort.session(conv_proto, threads=1)
    stats = ort.bench({"session": sess, "proto": conv_proto}, runs=3, warmup=0, threads=1)
    assert all(s.runs == 3 for s in stats.values())
    with pytest.raises(ValueError, match="runs >= 1"):
        ort.bench({"a": conv_proto}, runs=0)


# --- what ORT executes -------------------------------------------------------------------------
def test_runtime_report_shows_bn_folded_and_provider(conv_proto):
    report = ort.runtime_report(conv_proto, optimization="basic")
    assert report.op_counts() == {"Conv": 1, "Relu": 1}  # ORT folded BatchNormalization
    assert report.provider_counts() == {"CPUExecutionProvider": 2}
    assert all(n.input_dtype == "float" and n.time_us is not None for n in report.nodes)
    assert report.kind_counts() == {"float": 2}
    assert report.float_islands() == [[n.name for n in report.nodes]]


def test_runtime_report_extended_fuses_conv_relu(conv_proto):
    report = ort.runtime_report(conv_proto, optimization="extended", profile=False)
    assert report.op_counts() == {"com.microsoft:FusedConv": 1}
    assert report.nodes[0].provider == "CPUExecutionProvider"  # from ORT's partitioning record
    assert report.optimized_model.graph.node[0].op_type == "FusedConv"
    assert report.as_dict()["nodes"][0]["kind"] == "float"


def test_runtime_report_classifies_integer_kernels():
    model = _model(
        """
        xq = QuantizeLinear(x, s, z)
        yq = QLinearMatMul(xq, s, z, w, s, z, s, z)
        y = DequantizeLinear(yq, s, z)
        """,
        inputs="float[1, 4] x", outputs="float[1, 4] y",
    )
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        onnx.numpy_helper.from_array(np.array(0, np.uint8), "z"),
        onnx.numpy_helper.from_array(np.eye(4, dtype=np.uint8) * 20, "w"),
    ])
    report = ort.runtime_report(model, optimization="disable")
    assert {n.op_type: n.kind for n in report.nodes} == {
        "QuantizeLinear": OpKind.BOUNDARY, "QLinearMatMul": OpKind.INTEGER, "DequantizeLinear": OpKind.BOUNDARY,
    }
    assert report.float_islands() == []


def test_op_kind_table():
    assert op_kind("QGemm", "com.microsoft") is OpKind.INTEGER
    assert op_kind("MatMulNBits", "com.microsoft") is OpKind.INTEGER
    assert op_kind("DequantizeLinear") is OpKind.BOUNDARY
    assert op_kind("Conv") is OpKind.FLOAT
    from slimgraph.backends.op_kinds import resolve

    assert resolve("MaxPool", "", "int8") is OpKind.INTEGER
    assert resolve("Reshape", "", "float") is OpKind.FLOAT
    assert resolve("Add", "", "int64") is OpKind.SHAPE
    assert resolve("Reshape") is OpKind.MOVEMENT
