"""Weight clustering and sharing: k-means codebooks per tensor or channel
(`cluster.kmeans`), and sharing of identical or near-identical tensors across layers
(`cluster.share`). The compact file format for clustered weights is `pack.clusters`.

Every module in this package is imported here, so each pass registers itself.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
