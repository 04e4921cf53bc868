"""Compact storage of compressed weights: `pack.sparse` (bitmask + non-zero values),
`pack.clusters` (packed codebook indices), each decoded by a small constant subgraph that
ONNX Runtime folds at session creation, and `unpack`, which folds them back.

Every module in this package is imported here, so each pass registers itself.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
