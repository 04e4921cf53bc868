"""Low-rank factorization passes: `lowrank.svd` splits Gemm/MatMul/Conv weights into two
thin layers by truncated SVD (channel or spatial for Conv), with the rank per layer chosen
by retained energy or an output-error budget, kept only where it is smaller or faster.

Every module in this package is imported here, so each pass registers itself.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
