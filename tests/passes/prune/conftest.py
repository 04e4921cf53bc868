"""Fixtures for the structured-pruning tests: hand-written graphs with chosen weights, and
torch architectures from benchmarks/torch_models.py exported once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import slimgraph

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


def build(text: str, **weights: np.ndarray) -> slimgraph.Model:
    """A model from ONNX text whose graph inputs named in `weights` become initializers."""
    proto = onnx.parser.parse_model(text)
    graph = proto.graph
    inputs = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(inputs)
    for name, array in weights.items():
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(proto)
    return slimgraph.load(proto)


def dead_weight(rng, shape, dead_out=(), dead_in=(), in_axis=1) -> np.ndarray:
    """Random float32 weights with rows `dead_out` (axis 0) and columns `dead_in` (axis
    `in_axis`) zero: channels that contribute nothing, so pruning them is exact."""
    w = rng.standard_normal(shape).astype(np.float32)
    w[list(dead_out)] = 0
    index = [slice(None)] * len(shape)
    index[in_axis] = list(dead_in)
    w[tuple(index)] = 0
    return w


def dead_vector(rng, n, dead=(), low=-1.0, high=1.0) -> np.ndarray:
    v = rng.uniform(low, high, n).astype(np.float32)
    v[list(dead)] = 0
    return v


@pytest.fixture(scope="session")
def torch_model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prune_torch_models")


def _exported(folder: Path, name: str, size: int) -> Path:
    path = folder / f"{name}-{size}.onnx"
    if not path.is_file():
        torch = pytest.importorskip("torch")
        import torch_models

        torch.manual_seed(0)
        module = getattr(torch_models, name)().eval()
        for m in module.modules():  # non-trivial BN statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.2, 1.5)
        model = slimgraph.load(module, example_inputs=(torch.randn(1, 3, size, size),))
        slimgraph.save(model, path)
    return path


@pytest.fixture(scope="session")
def exported(torch_model_dir):
    """exported(name, size) -> path of benchmarks/torch_models.<name>() exported at size."""
    return lambda name, size: _exported(torch_model_dir, name, size)
