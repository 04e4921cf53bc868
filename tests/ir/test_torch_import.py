"""torch `nn.Module` and FX `GraphModule` import: outputs, provenance, dynamic batch, errors."""

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import slimgraph  # noqa: E402
from slimgraph.errors import ModelLoadError  # noqa: E402
from slimgraph.ir.model import PROVENANCE_KEY, Model  # noqa: E402
from slimgraph.ir.torch_import import EXPORTER_KEY, from_torch  # noqa: E402
from tests.helpers import ort_outputs  # noqa: E402

pytestmark = pytest.mark.torch


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn1(self.conv1(x)))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(Block(1, 4), Block(4, 8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer1(x)), 1))


def _trained_looking(module: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so eval mode and BN export are really exercised."""
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return module


def _assert_close(model: Model, module: nn.Module, x: np.ndarray) -> None:
    out = next(iter(ort_outputs(model, {model.graph.inputs[0].name: x}).values()))
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert err <= 1e-5, f"relative error {err:.2e}"


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    module = _trained_looking(SmallCNN()).train()  # import must switch to eval and back
    model = slimgraph.load(module, example_inputs=(torch.randn(2, 1, 8, 8),))
    return module, model


def test_module_outputs_match_torch_and_training_flag_is_restored(cnn):
    module, model = cnn
    assert module.training  # from_torch exported in eval mode and restored the flag
    module.eval()
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    _assert_close(model, module, x)
    assert model.ir.metadata_props[EXPORTER_KEY] == "dynamo"
    ops = [n.op_type for n in model.graph]
    assert ops.count("BatchNormalization") == 2  # import is faithful: fusion is a pass's job


def test_provenance_is_the_module_path(cnn):
    _, model = cnn
    by_op = {}
    for node in model.graph:
        by_op.setdefault(node.op_type, []).append(Model.provenance(node))
    assert by_op["Conv"] == ["layer1.0.conv1", "layer1.1.conv1"]
    assert by_op["BatchNormalization"] == ["layer1.0.bn1", "layer1.1.bn1"]
    assert by_op["Relu"] == ["layer1.0.relu", "layer1.1.relu"]
    assert by_op["Gemm"] == ["fc"]
    # every node has one, written under slimgraph's own key; bulky exporter metadata is dropped
    for node in model.graph:
        assert PROVENANCE_KEY in node.metadata_props
        assert "pkg.torch.onnx.stack_trace" not in node.metadata_props


def test_provenance_survives_save_and_load(cnn, tmp_path):
    _, model = cnn
    loaded = slimgraph.load(slimgraph.save(model, tmp_path / "cnn.onnx"))
    assert [Model.provenance(n) for n in loaded.graph] == [Model.provenance(n) for n in model.graph]


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch(cnn, batch):
    module, model = cnn
    assert str(model.graph.inputs[0].shape[0]) == "batch"
    x = np.random.default_rng(batch).standard_normal((batch, 1, 8, 8)).astype(np.float32)
    _assert_close(model, module.eval(), x)


def test_fx_graph_module():
    torch.manual_seed(1)
    module = _trained_looking(SmallCNN()).eval()
    gm = torch.fx.symbolic_trace(module)
    model = from_torch(gm, torch.randn(2, 1, 8, 8), input_names=["image"], output_names=["logits"])
    assert [v.name for v in model.graph.inputs] == ["image"]
    assert [v.name for v in model.graph.outputs] == ["logits"]
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8)).astype(np.float32)
    _assert_close(model, gm, x)
    paths = {Model.provenance(n) for n in model.graph}
    assert {"layer1.0.conv1", "layer1.1.bn1", "fc"} <= paths


@pytest.mark.slow  # each torch export costs ~3-6 s (the exporter rebuilds its op registry)
def test_static_batch_when_asked():
    module = nn.Linear(4, 2).eval()
    model = from_torch(module, (torch.randn(3, 4),), dynamic_batch=False)
    assert model.graph.inputs[0].shape.dims == (3, 4)


class _Unexportable(nn.Module):
    """SVD has no ONNX translation in either torch exporter."""

    def forward(self, x):
        return torch.linalg.svd(x)[0]


def test_unexportable_module_raises_model_load_error(caplog):
    with caplog.at_level(logging.WARNING, logger="slimgraph"):
        with pytest.raises(ModelLoadError) as err:
            from_torch(_Unexportable(), (torch.randn(2, 3, 3),))
    message = str(err.value)
    assert "_Unexportable" in message
    assert "svd" in message.lower()  # torch's own reason, first line
    assert "slimgraph.load" in message  # what to do
    assert "TorchScript" in caplog.text  # the fallback was tried and logged


def test_missing_example_inputs():
    with pytest.raises(ModelLoadError, match="example inputs"):
        slimgraph.load(nn.Linear(2, 2))


# --- provenance parsing (no export needed) --------------------------------------------------
@pytest.mark.parametrize(("props", "expected"), [
    ({"pkg.torch.onnx.name_scopes": "['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d']"}, "layer1.0.conv1"),
    ({"pkg.torch.onnx.name_scopes": "['', 'view']"}, ""),  # an op of the root module
    ({"pkg.torch.onnx.name_scopes": "['fc', 'linear']"}, "fc"),  # FX GraphModule: no root entry
    ({"pkg.torch.onnx.name_scopes": "['_empty_nn_module_stack_from_metadata_hook', 'sym_size_int_1']"}, ""),
    ({"pkg.torch.onnx.name_scopes": "['', 'act@1', 'relu_1']"}, "act"),  # second call of a reused module
    ({"namespace": ": __main__.Net/layer1: torch.nn.Sequential/layer1.0: __main__.Block/relu: aten.relu.default"},
     "layer1.0"),
    ({}, None),
])
def test_module_path_from_dynamo_metadata(props, expected):
    from slimgraph.ir.torch_import import _path_from_metadata

    assert _path_from_metadata(props) == expected


@pytest.mark.parametrize(("name", "expected"), [
    ("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"),
    ("/act_1/Relu", "act"),  # later call of a reused module
    ("/fc/Gemm", "fc"),
    ("/Flatten", ""),
    ("Identity_3", None),  # not a scoped name
])
def test_module_path_from_torchscript_node_name(name, expected):
    from slimgraph.ir.torch_import import _path_from_node_name

    modules = {"", "layer1", "layer1.0", "layer1.0.conv1", "act", "fc"}
    assert _path_from_node_name(name, modules) == expected
