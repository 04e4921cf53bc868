"""Shared test helpers: text models, ORT reference runs with ORT's optimizations off."""

from __future__ import annotations

import numpy as np
import onnx

import slimgraph
from slimgraph.ir import Model


def parse(text: str) -> Model:
    """A Model from ONNX text syntax (onnx.parser)."""
    return slimgraph.load(onnx.parser.parse_model(text))


def ort_outputs(model: Model, feeds: dict) -> dict[str, np.ndarray]:
    """Outputs from ORT with its own graph optimizations disabled, so a test checks our
    pass and not ORT's."""
    from slimgraph.backends import ort

    return ort.run(ort.session(model, optimization="disable"), feeds)


def assert_same_outputs(a: Model, b: Model, feeds: dict, rtol: float = 1e-5) -> None:
    """Outputs equal within `rtol` of each output's scale (max |a-b| / max |a|)."""
    ra, rb = ort_outputs(a, feeds), ort_outputs(b, feeds)
    assert sorted(ra) == sorted(rb)
    for name in ra:
        assert ra[name].shape == rb[name].shape, name
        assert ra[name].dtype == rb[name].dtype, name
        scale = max(float(np.max(np.abs(ra[name]))), 1e-12)
        err = float(np.max(np.abs(ra[name].astype(np.float64) - rb[name]))) / scale
        assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"


def ops(model: Model) -> list[str]:
    return [n.op_type for n in model.graph]
