"""Cleanup passes (all exact): lifting, folding, dead code, CSE, identities, opset, shapes, order.

The `cleanup` recipe (slimgraph/recipes/cleanup.yaml) runs them to a fixed point.
"""

from slimgraph.passes.cleanup import (  # noqa: F401  (registration side effect)
    cse,
    eliminate_dead,
    eliminate_identity,
    fold_constants,
    infer_shapes,
    lift_constants,
    short_names,
    simplify,
    strip_metadata,
    topo_sort,
    upgrade_opset,
)
