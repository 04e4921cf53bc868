"""Backends: ONNX Runtime sessions, runs, benchmarks and runtime reports (`ort`), and the
op-kind table (`op_kinds`) that says which ops run in integer kernels."""

from slimgraph.backends.op_kinds import OP_KINDS, OpKind, op_kind
from slimgraph.backends.ort import (
    BenchStats,
    RuntimeNode,
    RuntimeReport,
    available_providers,
    bench,
    has_cuda,
    run,
    run_batched,
    runtime_report,
    session,
)

__all__ = [
    "OP_KINDS", "BenchStats", "OpKind", "RuntimeNode", "RuntimeReport", "available_providers",
    "bench", "has_cuda", "op_kind", "run", "run_batched", "runtime_report", "session",
]
