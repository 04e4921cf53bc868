"""Loading and saving models.

`load` takes a path (external data next to it is read into memory), bytes, an `onnx.ModelProto`,
an `onnx_ir.Model`, a `Model`, or a torch `nn.Module` / FX `GraphModule` (with
`example_inputs`, through `slimgraph.ir.torch_import`). Loading is faithful: nothing is
rewritten, so `load` then `save` round-trips exactly; cleanup is a pipeline's job.

`save` writes atomically (temporary files in the target folder, then rename), so a failed
save leaves no partial file, and switches to external data for models over 2 GB.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import google.protobuf.message
import onnx
import onnx_ir as ir

from slimgraph.errors import ModelLoadError
from slimgraph.ir.model import Model

MIN_OPSET = 7
PROTO_LIMIT = 2**31 - 1  # protobuf cannot serialize a message of 2 GB or more


def _is_torch_module(obj: Any) -> bool:
    """An nn.Module (FX GraphModules included) or a torch.export.ExportedProgram."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, (torch.nn.Module, torch.export.ExportedProgram))


def load(source: Any, *, example_inputs: Any = None, **torch_options: Any) -> Model:
    """Import a model into slimgraph's IR. See the module docstring for accepted sources."""
    if isinstance(source, Model):
        return source
    if isinstance(source, ir.Model):
        return _checked(Model(source), "<onnx_ir.Model>")
    if isinstance(source, onnx.ModelProto):
        return _checked(Model(ir.from_proto(source)), "<ModelProto>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _checked(Model(ir.from_proto(_parse(bytes(source), "<bytes>"))), "<bytes>")
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source))
    if _is_torch_module(source):
        from slimgraph.ir.torch_import import from_torch

        return from_torch(source, example_inputs, **torch_options)
    raise ModelLoadError(
        f"cannot load a {type(source).__name__}: pass a path to an .onnx file, bytes, an "
        "onnx.ModelProto, or a torch.nn.Module with example_inputs (pip install slimgraph[torch])"
    )


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (google.protobuf.message.DecodeError, ValueError) as e:
        raise ModelLoadError(
            f"{where}: not a valid ONNX model (protobuf parse failed: {e}); "
            "is the file truncated or of another format?"
        ) from None
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{where}: parsed but contains no graph; is this an ONNX model file?")
    return proto


def _load_path(path: Path) -> Model:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder; pass the .onnx file inside it")
    proto = _parse(path.read_bytes(), str(path))
    _check_external_data(proto, path)
    try:
        model = ir.from_proto(proto)
        _set_base_dir(model, path.parent)
        # Read external data in now: lazy references would be written relative to the
        # wrong folder when the model is serialized (ORT sessions, clone, save elsewhere).
        ir.external_data.load_to_model(model)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{path}: could not convert to the IR: {e}") from None
    return _checked(Model(model, source=str(path)), str(path))


def _set_base_dir(model: ir.Model, base: Path) -> None:
    for tensor in _all_initializer_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = str(base)


def _all_initializer_tensors(model: ir.Model):
    for graph in [model.graph, *model.graph.subgraphs()]:
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    for tensor in _get_all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        target = path.parent / (location or "")
        if not location or not target.is_file():
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} stores its data in external file "
                f"{location!r}, which is missing from {path.parent}; copy it next to the model"
            )


def _checked(model: Model, where: str) -> Model:
    opset = model.ir.opset_imports.get("", None)
    if opset is None:
        # Models with only custom domains are allowed, but the default domain must be known.
        return model
    if opset < MIN_OPSET:
        raise ModelLoadError(
            f"{where}: opset {opset} is older than {MIN_OPSET}, the oldest slimgraph supports; "
            "convert it with onnx.version_converter first"
        )
    return model


def model_nbytes(model: Model) -> int:
    """Total bytes of initializer data (what dominates the file size)."""
    return sum(t.nbytes for t in _all_initializer_tensors(model.ir))


def save(model: Model | ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically. External data (`<name>.data`) is used when asked
    or when the model is too large for one protobuf (2 GB)."""
    if isinstance(model, ir.Model):
        model = Model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = model_nbytes(model) >= PROTO_LIMIT - 64 * 2**20
    proto = model.to_proto()
    tmpdir = Path(tempfile.mkdtemp(prefix=".slimgraph-", dir=path.parent))
    try:
        tmp_model = tmpdir / path.name
        data_name = path.name + ".data"
        if external_data:
            onnx.save_model(
                proto, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                location=data_name, size_threshold=1024,
            )
            os.replace(tmpdir / data_name, path.parent / data_name)
        else:
            tmp_model.write_bytes(proto.SerializeToString())
        os.replace(tmp_model, path)
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()
    return path
