"""slimgraph: a compiler that makes neural networks smaller and faster.

    import slimgraph
    model = slimgraph.load("model.onnx")                  # or a torch module + example_inputs
    result = slimgraph.run(model, "cleanup,fuse", verify=True)
    print(result.report.to_markdown())
    slimgraph.save(result.model, "model.slim.onnx")
"""

from slimgraph.errors import (
    DataError,
    ModelLoadError,
    PassError,
    PipelineError,
    SlimgraphError,
    UnsupportedOpError,
)
from slimgraph.ir import Model, load, save, summary
from slimgraph.passes.base import Pass, PassConfig, PassContext, PassResult, register_pass, registry
from slimgraph.passes.manager import PassManager, Report, RunResult, run
from slimgraph.passes.pipeline import Pipeline, parse as parse_pipeline

__version__ = "0.1.0"


def to_torch(model, **options):
    """The model as a trainable `torch.nn.Module` (slimgraph.backends.torch_exec; needs torch)."""
    from slimgraph.backends.torch_exec import to_torch as _to_torch

    return _to_torch(model, **options)


def search(model, data=None, **options):
    """Autotune `model`: search pass order and configs (slimgraph.search; needs optuna)."""
    from slimgraph.search import search as _search

    return _search(model, data, **options)


__all__ = [
    "DataError", "Model", "ModelLoadError", "Pass", "PassConfig", "PassContext", "PassError",
    "PassManager", "PassResult", "Pipeline", "PipelineError", "Report", "RunResult",
    "SlimgraphError", "UnsupportedOpError", "load", "parse_pipeline", "register_pass",
    "registry", "run", "save", "search", "summary", "to_torch",
]
