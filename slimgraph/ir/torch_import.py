"""Import a torch `nn.Module` or FX `GraphModule` into slimgraph's IR.

`from_torch(module, example_inputs)` captures the module with `torch.export` and
translates it with torch's ONNX exporter (`torch.onnx.export(..., dynamo=True)`):

1. The module is exported in eval mode (its training flag is restored afterwards), so
   BatchNormalization uses running statistics and Dropout is off.
2. The exporter's own graph optimizer is off (`optimize=False`): the import is faithful
   (BatchNormalization, Constant nodes and shape arithmetic stay as torch wrote them) and
   cleanup and fusion are slimgraph's passes, with their statistics in the report.
3. With `dynamic_batch`, dim 0 of every tensor input whose dim 0 equals the first input's
   is exported as the symbolic dim `batch`. If torch refuses (the module hard-codes its
   batch size), the export is retried with static shapes and a warning says why.
4. If the dynamo exporter fails, the TorchScript exporter (`dynamo=False`) is tried, with
   a warning naming the first failure; tracer warnings (a branch on tensor values baked
   into the graph) are logged, since the traced graph may then be wrong for other inputs.
   If both fail: `ModelLoadError` naming the module class and torch's error.
5. Provenance: each node's torch module path (`layer1.0.conv1`; `""` for the root module)
   is written to `metadata_props[PROVENANCE_KEY]`. The dynamo exporter records it as
   `pkg.torch.onnx.name_scopes` (kept, with `namespace` and `class_hierarchy`); the
   TorchScript exporter encodes it in node names (`/layer1/layer1.0/conv1/Conv`). The
   exporter's per-node stack traces and FX node text are dropped: they are large and hold
   absolute paths, which would make content hashes depend on the machine.
6. The result is detached from torch (weights copied out of the module through the proto),
   so training the module further never changes an imported model.

torch is an optional dependency: it is imported inside the functions only.
"""

from __future__ import annotations

import ast
import inspect
import io
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import onnx_ir as ir

from slimgraph.errors import ModelLoadError
from slimgraph.ir.model import PROVENANCE_KEY, Model

logger = logging.getLogger("slimgraph.ir.torch_import")

BATCH_DIM = "batch"
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
NAMESPACE_KEY = "namespace"
#: Exporter metadata dropped on import (large; absolute source paths; see module docstring).
DROPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")
#: Model-level metadata key recording which torch exporter produced the graph.
EXPORTER_KEY = "slimgraph.torch_exporter"
#: name_scopes entries that are not modules (the exporter's placeholder for nodes, such as
#: shape queries, that torch.export did not attribute to any module).
_NOT_A_MODULE = "_empty_nn_module_stack_from_metadata_hook"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WHAT_TO_DO = (
    "make forward() exportable with torch.export (no Python branches on tensor values, no "
    "ops without an ONNX translation; see https://pytorch.org/docs/stable/generated/exportdb/), "
    "or export the module to ONNX yourself and pass the .onnx file to slimgraph.load"
)


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ModelLoadError(
            "importing a torch module needs torch: pip install 'slimgraph[torch]' (torch==2.13.0)"
        ) from None
    return torch


def from_torch(
    module: Any,
    example_inputs: Any,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Model:
    """Export `module` (an `nn.Module`, an FX `GraphModule` or a `torch.export`
    `ExportedProgram`) with `example_inputs` (a tensor, a tuple of positional arguments, or
    a dict of keyword arguments) to a `Model`. See the module docstring."""
    torch = _import_torch()
    is_program = isinstance(module, torch.export.ExportedProgram)
    if not is_program and not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"from_torch needs a torch.nn.Module, an FX GraphModule or an ExportedProgram, "
            f"got {type(module).__name__}"
        )
    name = _class_name(torch, module)
    if example_inputs is None and not is_program:
        raise ModelLoadError(
            f"{name}: importing a torch module needs example inputs: "
            "slimgraph.load(module, example_inputs=(x,))"
        )
    args, kwargs = _split_inputs(example_inputs)
    options = dict(opset=opset, input_names=input_names, output_names=output_names)

    # Each submodule's own flag, so mixed modes (a frozen BatchNorm in a training model) come back.
    modes = {} if is_program else {m: m.training for m in module.modules()}
    if any(modes.values()):
        logger.info("%s is in training mode; exporting it in eval mode", name)
        module.eval()
    try:
        proto, exporter = _export(torch, module, args, kwargs, dynamic_batch, options)
    finally:
        for m, training in modes.items():
            m.training = training

    model = ir.from_proto(proto)
    model.metadata_props[EXPORTER_KEY] = exporter
    if model.functions:
        # The exporter may emit local functions; passes and analyses want a flat graph.
        from onnx_ir.passes.common import InlinePass

        InlinePass()(model)
    modules = None if is_program else {n for n, _ in module.named_modules()}
    count = _set_provenance(model, exporter, modules)
    logger.info(
        "imported %s with the %s exporter: %d nodes, %d with a module path",
        name, exporter, sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph)), count,
    )
    return Model(model, source=f"torch:{name}")


# --- export ---------------------------------------------------------------------------------
def _class_name(torch, module: Any) -> str:
    if isinstance(module, torch.fx.GraphModule):
        return f"GraphModule({module._get_name()})"  # FX names its class after the traced one
    return type(module).__name__


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _batch_spec(torch, module, args: tuple, kwargs: dict):
    """dynamic_shapes for torch.export: dim 0 of tensor inputs that share the first tensor
    input's dim 0 becomes the symbolic dim `batch`; None when no input has a batch dim."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0]
    if not tensors:
        return None
    batch = torch.export.Dim(BATCH_DIM)
    size = tensors[0].shape[0]

    def spec(a):
        return {0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == size else None

    if kwargs:  # torch.export then keys the spec by forward()'s parameter names
        params = list(inspect.signature(module.forward).parameters)
        return {k: spec(v) for k, v in {**dict(zip(params, args)), **kwargs}.items()}
    return tuple(spec(a) for a in args)


def _export(torch, module, args, kwargs, dynamic_batch, options) -> tuple[onnx.ModelProto, str]:
    """(model proto, exporter name). Tries dynamo (dynamic, then static), then TorchScript."""
    name = _class_name(torch, module)
    is_program = isinstance(module, torch.export.ExportedProgram)
    # An ExportedProgram's shapes were fixed when it was exported.
    shapes = _batch_spec(torch, module, args, kwargs) if dynamic_batch and not is_program else None
    errors: list[str] = []
    try:
        return _export_dynamo(torch, module, args, kwargs, shapes, options), "dynamo"
    # User code runs inside forward() and the exporter has many failure types; every one
    # is reported (never swallowed) through the chain below.
    except Exception as e:  # noqa: BLE001
        errors.append(f"dynamo exporter: {_first_line(e)}")
        first = e
    if shapes is not None:
        try:
            proto = _export_dynamo(torch, module, args, kwargs, None, options)
        except Exception as e:  # noqa: BLE001
            logger.info("static-shape dynamo export of %s failed too: %s", name, _first_line(e))
        else:
            logger.warning(
                "%s: the batch dim could not be exported as dynamic (%s); exported with the "
                "example inputs' static shapes", name, _first_line(first),
            )
            return proto, "dynamo"
    if is_program:
        raise ModelLoadError(f"cannot export {name} to ONNX: {errors[0]}; {_WHAT_TO_DO}") from first
    logger.warning("%s: dynamo exporter failed (%s); trying the TorchScript exporter", name, _first_line(first))
    try:
        return _export_torchscript(torch, module, args, kwargs, dynamic_batch, options), "torchscript"
    except Exception as e:  # noqa: BLE001
        errors.append(f"TorchScript exporter: {_first_line(e)}")
        raise ModelLoadError(f"cannot export {name} to ONNX: {'; '.join(errors)}; {_WHAT_TO_DO}") from e


def _export_dynamo(torch, module, args, kwargs, shapes, options) -> onnx.ModelProto:
    program = torch.onnx.export(
        module, args, kwargs=kwargs or None, dynamo=True, optimize=False, verbose=False,
        opset_version=options["opset"], dynamic_shapes=shapes,
        input_names=options["input_names"], output_names=options["output_names"],
    )
    return ir.to_proto(program.model)


def _export_torchscript(torch, module, args, kwargs, dynamic_batch, options) -> onnx.ModelProto:
    if kwargs:
        args = (*args, kwargs)  # the TorchScript exporter takes kwargs as a trailing dict
    input_names = list(options["input_names"] or _forward_params(module, len(args)))
    output_names = options["output_names"]
    dynamic_axes = None
    if dynamic_batch:
        flat_in = [a for a in args if isinstance(a, torch.Tensor)]
        size = flat_in[0].shape[0] if flat_in and flat_in[0].dim() > 0 else None
        with torch.no_grad():
            outs = module(*args)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        output_names = list(output_names or [f"output_{i}" for i in range(len(outs))])
        dynamic_axes = {}
        for n, a in zip(input_names, flat_in):
            if a.dim() > 0 and a.shape[0] == size:
                dynamic_axes[n] = {0: BATCH_DIM}
        for n, o in zip(output_names, outs):
            if isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == size:
                dynamic_axes[n] = {0: BATCH_DIM}
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.onnx.export(
            module, args, buffer, dynamo=False, opset_version=options["opset"],
            do_constant_folding=False, input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            logger.warning("TorchScript tracing of %s: %s (the graph may be wrong for other "
                           "inputs)", _class_name(torch, module), str(w.message).splitlines()[0])
    return onnx.load_from_string(buffer.getvalue())


def _forward_params(module, count: int) -> list[str]:
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params[:count]]
    return names + [f"input_{i}" for i in range(len(names), count)]


def _first_line(error: BaseException) -> str:
    """The root cause's type and first non-empty line, without terminal colour codes."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    for line in _ANSI.sub("", str(root)).splitlines():
        if line.strip():
            return f"{type(root).__name__}: {line.strip()}"
    return type(root).__name__


# --- provenance -----------------------------------------------------------------------------
def _set_provenance(model: ir.Model, exporter: str, modules: set[str] | None) -> int:
    """Write each node's module path to PROVENANCE_KEY; return how many nodes got one."""
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for key in DROPPED_METADATA:
            node.metadata_props.pop(key, None)
        if exporter == "dynamo":
            path = _path_from_metadata(node.metadata_props)
        else:
            path = _path_from_node_name(node.name, modules)
        if path is not None:
            node.metadata_props[PROVENANCE_KEY] = path
            count += 1
    return count


def _strip_call_index(path: str) -> str:
    # torch.export marks the n-th call of a reused module as `name@n`.
    return re.sub(r"@\d+", "", path)


def _path_from_metadata(props: Mapping[str, str]) -> str | None:
    """Module path from the dynamo exporter's metadata. `name_scopes` is the repr of a list:
    the module path at each nesting level, then the op (`['', 'layer1', 'layer1.0', 'conv2d']`);
    `namespace` holds the same as `': Net/layer1: Sequential/.../conv2d: aten.conv2d'`."""
    scopes = None
    if NAME_SCOPES_KEY in props:
        try:
            scopes = ast.literal_eval(props[NAME_SCOPES_KEY])
        except (ValueError, SyntaxError):
            logger.debug("unreadable %s: %r", NAME_SCOPES_KEY, props[NAME_SCOPES_KEY])
    if scopes is None and NAMESPACE_KEY in props:
        scopes = [part.split(": ", 1)[0] for part in props[NAMESPACE_KEY].split("/")]
    if not isinstance(scopes, list) or not scopes:
        return None
    module_scopes = [s for s in scopes[:-1] if isinstance(s, str) and s != _NOT_A_MODULE]
    return _strip_call_index(module_scopes[-1]) if module_scopes else ""


def _path_from_node_name(name: str, modules: set[str] | None) -> str | None:
    """Module path from a TorchScript-exported node name such as `/layer1/layer1.0/conv1/Conv`:
    each component is a child's name, or its full path under the parent (`layer1.0`), and a
    reused module's later calls get a `_<n>` suffix (`/act_1/Relu`)."""
    if not name.startswith("/"):
        return None
    path = ""
    for part in name.strip("/").split("/")[:-1]:
        if path and part.startswith(path + "."):
            candidate = part
        else:
            candidate = f"{path}.{part}" if path else part
        if modules is not None and candidate not in modules:
            base = re.sub(r"_\d+$", "", candidate)
            if base in modules:
                candidate = base
        path = candidate
    return path
