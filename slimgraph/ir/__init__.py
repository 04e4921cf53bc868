"""slimgraph's IR: onnx-ir underneath, the `Model` facade, loading/saving, analyses."""

from slimgraph.ir.analysis import ANALYSES, analysis, summary
from slimgraph.ir.io import load, save
from slimgraph.ir.model import Model

__all__ = ["ANALYSES", "Model", "analysis", "load", "save", "summary"]
