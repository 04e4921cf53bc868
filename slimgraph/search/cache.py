"""Content-addressed cache of intermediate models, keyed by a sha256 chain.

The root key hashes the input model's bytes, the data's bytes (passes calibrate and train
on it), the seed and the versions of the libraries that compute the result; each step's key
hashes the previous key with the step's passes (name + version + canonical config JSON).
Two pipelines that share a prefix share its keys, so the second one starts from the
stored model of the longest cached prefix. A step that failed is recorded with its error
under its key: a later pipeline with the same prefix fails the same way without re-running.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from slimgraph.search.candidate import Candidate, canonical

LIBRARIES = ("slimgraph", "numpy", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "torch", "scikit-learn")


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def data_hash(data: Mapping[str, np.ndarray] | None, labels: np.ndarray | None = None) -> str:
    h = hashlib.sha256()
    arrays = dict(data or {})
    if labels is not None:
        arrays["\0labels"] = labels
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def root_key(model_bytes: bytes, data_digest: str, seed: int) -> str:
    h = hashlib.sha256()
    h.update(hashlib.sha256(model_bytes).digest())
    h.update(data_digest.encode())
    h.update(canonical({"seed": seed, "libraries": library_versions()}).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=1024)
def _step_identity(step_json: str) -> str:
    """Name + version + canonical config of every pass a step runs (recipes expanded)."""
    from slimgraph.passes.pipeline import parse

    spec = json.loads(step_json)
    passes = parse([spec]).passes()
    return canonical([[p.name, p.version, p.config.model_dump(mode="json")] for p in passes])


def chain(root: str, candidate: Candidate) -> list[str]:
    """The key after each step of `candidate` (same length as its steps)."""
    keys, prev = [], root
    for step in candidate.spec():
        prev = hashlib.sha256((prev + _step_identity(canonical(step))).encode()).hexdigest()
        keys.append(prev)
    return keys


class ModelCache:
    """Files under `root`: `models/<key>.onnx` and `failed/<key>.json`. `enabled=False`
    makes every lookup miss and stores nothing (the search then builds every pipeline
    from the input model)."""

    def __init__(self, root: str | os.PathLike, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def model_path(self, key: str) -> Path:
        return self.root / "models" / f"{key[:32]}.onnx"

    def _failure_path(self, key: str) -> Path:
        return self.root / "failed" / f"{key[:32]}.json"

    def longest_prefix(self, keys: list[str]) -> tuple[int, Path | None, dict | None]:
        """(steps covered, model file of that prefix, recorded failure within it)."""
        if not self.enabled:
            return 0, None, None
        for i, key in enumerate(keys):
            failure = self._failure_path(key)
            if failure.is_file():
                return i, None, json.loads(failure.read_text())
        for i in range(len(keys), 0, -1):
            path = self.model_path(keys[i - 1])
            if path.is_file():
                return i, path, None
        return 0, None, None

    def put_model(self, key: str, proto_bytes: bytes) -> Path:
        path = self.model_path(key)
        if self.enabled and not path.is_file():
            _atomic_write(path, proto_bytes)
        return path

    def put_failure(self, key: str, error: str, trace: str) -> None:
        if self.enabled:
            _atomic_write(self._failure_path(key), json.dumps({"error": error, "traceback": trace}).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
