"""Quantization passes: calibration observers, static int8 with integer-only lowering,
QDQ output, dynamic int8, weight-only int4, fp8 weights, accuracy tools, mixed precision.

Every module in this package is imported here, so each pass registers itself.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
