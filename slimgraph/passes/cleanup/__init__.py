"""Cleanup passes (all exact): lifting, folding, dead code, CSE, identities, opset, shapes, order."""
from slimgraph.passes.cleanup import lift_constants  # noqa: F401

