"""Every transformation, one pass per file, grouped by family. Importing this package
registers the built-in passes."""

from slimgraph.passes import cleanup, cluster, fuse, lowrank, pack, prune, quantize, train  # noqa: F401  (registration side effect)
from slimgraph.passes.base import (
    Pass,
    PassConfig,
    PassContext,
    PassResult,
    choice,
    float_range,
    get_pass,
    int_range,
    register_pass,
    registry,
)

__all__ = [
    "Pass", "PassConfig", "PassContext", "PassResult", "choice", "float_range", "get_pass",
    "int_range", "register_pass", "registry",
]
