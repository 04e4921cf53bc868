"""Contracts: facts a pass establishes that every later pass must keep.

A pruning pass records "these weights have at least this many zeros", an N:M pass "these
weights are 2:4 along their reduction axis", a clustering pass "these weights take at
most K distinct values". Later passes (fusion, quantization, clustering, fine-tuning) do
not know about them; the PassManager calls `check` after every pass that modified the
model and fails that pass, by name, when a contract no longer holds.

Contracts are saved with the model (JSON in the model's metadata_props), so a pipeline
split over several `slimgraph run` calls keeps them. The check for each kind is
registered by the module that creates it (`@check_for("sparsity")`) and reads the model
by content, not by tensor name, because later passes rename and replace initializers
(BatchNorm folding, quantization).

    contracts.add(model, "sparsity", {"zeros": 1234567})

    @contracts.check_for("sparsity")
    def _sparsity_holds(model, record) -> str | None:
        ...  # None when it holds, else one line saying what broke
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from slimgraph.ir.model import Model

logger = logging.getLogger(__name__)

KEY = "slimgraph.contracts"
Check = Callable[[Model, dict[str, Any]], "str | None"]
_CHECKS: dict[str, Check] = {}


def check_for(kind: str) -> Callable[[Check], Check]:
    """Register the function that says whether a contract of `kind` still holds."""

    def register(fn: Check) -> Check:
        _CHECKS[kind] = fn
        return fn

    return register


def records(model: Model) -> list[tuple[str, dict[str, Any]]]:
    raw = model.ir.metadata_props.get(KEY)
    return [(r["kind"], r["record"]) for r in json.loads(raw)] if raw else []


def add(model: Model, kind: str, record: dict[str, Any]) -> None:
    """Record a contract (replacing an earlier one of the same kind and `record["id"]`)."""
    rid = record.get("id")
    kept = [(k, r) for k, r in records(model) if not (k == kind and r.get("id") == rid)]
    _write(model, [*kept, (kind, record)])


def drop(model: Model, kind: str) -> int:
    """Remove every contract of `kind` (a pass that deliberately undoes it); returns how many."""
    current = records(model)
    kept = [(k, r) for k, r in current if k != kind]
    _write(model, kept)
    return len(current) - len(kept)


def check(model: Model) -> list[str]:
    """One line per contract that no longer holds (unknown kinds are skipped with a warning)."""
    problems = []
    for kind, record in records(model):
        fn = _CHECKS.get(kind)
        if fn is None:
            logger.warning("no check registered for contract %r; skipped", kind)
            continue
        problem = fn(model, record)
        if problem:
            problems.append(f"{kind} contract broken: {problem}")
    return problems


def _write(model: Model, items: list[tuple[str, dict[str, Any]]]) -> None:
    if items:
        model.ir.metadata_props[KEY] = json.dumps([{"kind": k, "record": r} for k, r in items], sort_keys=True)
    else:
        model.ir.metadata_props.pop(KEY, None)
