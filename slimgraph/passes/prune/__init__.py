"""Pruning passes: unstructured magnitude pruning with compact storage, N:M
semi-structured masks, and structured channel pruning that physically shrinks the graph
(channel-coupling analysis in `channels`), optionally latency-aware.

Every module in this package is imported here, so each pass registers itself.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
