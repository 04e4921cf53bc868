"""Training passes on the IR through the torch executor (`slimgraph.backends.torch_exec`):
fine-tuning that keeps compression intact.

Every module in this package is imported here, so each pass registers itself; the passes
import torch only when they run, so slimgraph works without the torch extra.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
