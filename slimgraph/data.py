"""Sample data: read and check `.npz` files, or generate inputs from declared shapes.

A data set is `{input name: array[N, ...]}` holding N samples, each array in one of two
layouts, told apart by its rank against the model input's rank R:

- batched, rank R: the samples are concatenated along the batch axis; sample i is the
  slice `[i:i+1]` (the usual layout for a model with a leading batch dim);
- stacked, rank R+1: sample i is `array[i]`, a whole input (for inputs whose first axis
  is not a batch axis, such as an RNN state `[2, batch, 128]`, and for scalars).

An optional `labels` array (length N) is kept apart for training/accuracy passes.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slimgraph.errors import DataError
from slimgraph.ir.model import Model

LABELS_KEY = "labels"

_NP_DTYPES = {
    ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64, ir.DataType.FLOAT16: np.float16,
    ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32, ir.DataType.INT16: np.int16,
    ir.DataType.INT8: np.int8, ir.DataType.UINT8: np.uint8, ir.DataType.BOOL: np.bool_,
}


def parse_shape_overrides(items: list[str] | None) -> dict[str, list[int]]:
    """`["x=1x3x224x224", "mask=1x128"]` -> {"x": [1, 3, 224, 224], ...}."""
    out: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise DataError(f"--shape {item!r}: expected name=DIMxDIMx..., e.g. input=1x3x224x224") from None
    return out


def _input_values(model: Model) -> list[ir.Value]:
    inits = set(model.graph.initializers)
    return [v for v in model.graph.inputs if v.name not in inits]


def input_spec(model: Model, overrides: Mapping[str, list[int]] | None = None) -> dict[str, tuple[type, list[int]]]:
    """{input name: (numpy dtype, concrete shape)}; dynamic dims become 1."""
    overrides = dict(overrides or {})
    spec = {}
    for v in _input_values(model):
        dtype = _NP_DTYPES.get(v.dtype) if v.dtype is not None else np.float32
        if dtype is None:
            raise DataError(f"input {v.name!r} has dtype {v.dtype}; pass real data with --data")
        if v.name in overrides:
            shape = overrides.pop(v.name)
        else:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in (v.shape or [])]
        spec[v.name] = (dtype, shape)
    if overrides:
        raise DataError(f"--shape names unknown input(s) {sorted(overrides)}; inputs are {sorted(spec)}")
    return spec


def generate(model: Model, n: int = 1, *, overrides=None, seed: int = 0) -> dict[str, np.ndarray]:
    """n random samples (normal floats, small non-negative ints) in the stacked layout."""
    rng = np.random.default_rng(seed)
    return {
        name: np.stack([rng_sample(rng, dtype, shape) for _ in range(n)])
        for name, (dtype, shape) in input_spec(model, overrides).items()
    }


def rng_sample(rng: np.random.Generator, dtype, shape: list[int]) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, 10, shape).astype(dtype)


def load_npz(path: str | Path, model: Model) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read an .npz and check it against the model's inputs. Returns (inputs, labels)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e}); save one with numpy.savez") from None
    labels = arrays.pop(LABELS_KEY, None)
    return check(arrays, model, where=str(path)), labels


def check(arrays: Mapping[str, np.ndarray], model: Model, *, where: str = "data") -> dict[str, np.ndarray]:
    """Keys must be exactly the model's inputs; each array [N, ...] with slices that fit."""
    values = {v.name: v for v in _input_values(model)}
    missing = sorted(set(values) - set(arrays))
    extra = sorted(set(arrays) - set(values))
    if missing or extra:
        raise DataError(
            f"{where}: keys {sorted(arrays)} do not match the model's inputs {sorted(values)}"
            + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else "")
        )
    counts = {k: len(a) if np.ndim(a) else 0 for k, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: arrays have different sample counts {counts}; all must be [N, ...]")
    out = {}
    for name, array in arrays.items():
        v = values[name]
        array = np.asarray(array)
        if array.ndim == 0:
            raise DataError(f"{where}: {name!r} is a scalar; store samples as [N, ...]")
        expected = _NP_DTYPES.get(v.dtype) if v.dtype is not None else None
        if expected is not None and array.dtype != expected:
            if np.can_cast(array.dtype, expected, casting="same_kind"):
                array = array.astype(expected)
            else:
                raise DataError(f"{where}: {name!r} has dtype {array.dtype}, the model wants {np.dtype(expected)}")
        declared = list(v.shape) if v.shape is not None else None
        if declared is not None:
            rank = len(declared)
            if array.ndim == rank + 1:  # stacked: every axis after the first is the input's
                pairs = enumerate(zip(declared, array.shape[1:]), start=1)
            elif array.ndim == rank and rank > 0:  # batched: axis 0 is the batch axis
                pairs = enumerate(zip(declared[1:], array.shape[1:]), start=1)
            else:
                raise DataError(
                    f"{where}: {name!r} has shape {list(array.shape)}; the model input is rank {rank} "
                    f"{_fmt(declared)}, so store samples as rank {rank} (batched) or {rank + 1} (stacked)"
                )
            for axis, (want, got) in pairs:
                if isinstance(want, int) and want != got:
                    raise DataError(
                        f"{where}: {name!r} has shape {list(array.shape)}, but axis {axis} must be {want} "
                        f"(model input {_fmt(declared)})"
                    )
        out[name] = array
    return out


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def count(data: Mapping[str, np.ndarray]) -> int:
    return min((len(a) for a in data.values() if np.ndim(a)), default=1)


def sample(data: Mapping[str, np.ndarray], ranks: Mapping[str, int], i: int, n: int = 1) -> dict[str, np.ndarray]:
    """Samples i..i+n as feeds. `ranks` maps input name -> the model input's rank, which
    tells the stacked layout (rank+1: `a[i]`) from the batched one (`a[i:i+n]`)."""
    out = {}
    for k, a in data.items():
        if k in ranks and a.ndim == ranks[k] + 1:
            out[k] = a[i] if n == 1 else a[i:i + n].reshape((-1, *a.shape[2:]))
        else:
            out[k] = a[i:i + n]
    return out


def input_ranks(model: Model) -> dict[str, int]:
    return {v.name: len(v.shape) if v.shape is not None else 1 for v in _input_values(model)}
