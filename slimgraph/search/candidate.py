"""A candidate pipeline: what the search builds, caches, evaluates and writes out."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import yaml


def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): the text that goes into every hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """An ordered list of steps, each `(name, config)`; `name` is a pass or a recipe."""

    steps: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]

    @classmethod
    def of(cls, steps: list[tuple[str, dict]]) -> Candidate:
        return cls(tuple((name, tuple(sorted(cfg.items()))) for name, cfg in steps))

    @classmethod
    def from_spec(cls, spec: list) -> Candidate:
        """From a recipe's `passes:` list (names or one-key `{name: config}` mappings)."""
        steps = []
        for entry in spec:
            if isinstance(entry, str):
                steps.append((entry, {}))
            else:
                (name, cfg), = entry.items()
                steps.append((name, dict(cfg or {})))
        return cls.of(steps)

    def spec(self) -> list:
        """The pipeline in recipe form (`slimgraph run -p` and `slimgraph.run` accept it)."""
        return [{name: dict(cfg)} if cfg else name for name, cfg in self.steps]

    def key(self) -> str:
        return hashlib.sha256(canonical(self.spec()).encode()).hexdigest()[:16]

    def to_yaml(self, description: str = "") -> str:
        doc = {"description": description} if description else {}
        doc["passes"] = self.spec()
        return yaml.safe_dump(doc, sort_keys=False, width=100)

    def __str__(self) -> str:
        parts = []
        for name, cfg in self.steps:
            args = ", ".join(f"{k}={v}" for k, v in cfg)
            parts.append(f"{name}({args})" if args else name)
        return ",".join(parts) if parts else "(unmodified)"

    @property
    def is_baseline(self) -> bool:
        return not self.steps
