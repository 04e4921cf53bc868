"""A differentiable executor of the IR: `to_torch(model)` -> an `nn.Module`.

Training passes (fine-tuning, QAT, distillation) must work on any model slimgraph holds,
including ones that came in as ONNX files, so they cannot rely on the original torch
module. `GraphModule` interprets the graph with torch ops: float initializers become
`nn.Parameter`s (trainable), the other constants buffers; `forward` walks the nodes in
order, one table entry per op type (`OPS`). Shape arithmetic (Shape -> Gather -> Concat ->
Reshape) runs on small int64 tensors and is read back as Python ints where torch needs
them. Unsupported ops are reported all at once, by node, when the module is built; a
failure while running names the node. `GraphModule.to_model()` writes the trained values
back into a copy of the IR model, which then goes through the same lowering as any other.

Outputs match ONNX Runtime within 1e-5 relative on the benchmark models (tests).
It runs on CUDA when the module and inputs are moved there (`.to("cuda")`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import PassError, PipelineError, UnsupportedOpError
from slimgraph.ir.model import Model

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the torch extra is optional
    torch = None  # type: ignore[assignment]

#: op type -> f(inputs: list[Tensor | None], attrs: dict, node: Node) -> Tensor | tuple
OPS: dict[str, Callable[..., Any]] = {}


def op(*names: str):
    def register(fn):
        for n in names:
            OPS[n] = fn
        return fn

    return register


def _dtype(onnx_type: int):
    return {
        ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64, ir.DataType.FLOAT16: torch.float16,
        ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
        ir.DataType.INT16: torch.int16, ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8,
        ir.DataType.BOOL: torch.bool,
    }[ir.DataType(onnx_type)]


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]


# --- elementwise ---------------------------------------------------------------------------------
for _name, _fn in {
    "Relu": lambda x: torch.relu(x), "Sigmoid": lambda x: torch.sigmoid(x), "Tanh": lambda x: torch.tanh(x),
    "Erf": lambda x: torch.erf(x), "Exp": lambda x: torch.exp(x), "Log": lambda x: torch.log(x),
    "Sqrt": lambda x: torch.sqrt(x), "Reciprocal": lambda x: torch.reciprocal(x), "Neg": lambda x: -x,
    "Abs": lambda x: torch.abs(x), "Floor": lambda x: torch.floor(x), "Ceil": lambda x: torch.ceil(x),
    "Softplus": lambda x: F.softplus(x), "Sin": lambda x: torch.sin(x), "Cos": lambda x: torch.cos(x),
    "Not": lambda x: torch.logical_not(x), "Identity": lambda x: x, "Sign": lambda x: torch.sign(x),
    "Round": lambda x: torch.round(x), "IsNaN": lambda x: torch.isnan(x), "HardSwish": lambda x: F.hardswish(x),
}.items():
    OPS[_name] = (lambda f: lambda xs, a, n: f(xs[0]))(_fn)

for _name, _fn in {
    "Add": torch.add if torch else None, "Sub": torch.sub if torch else None, "Mul": torch.mul if torch else None,
    "Pow": torch.pow if torch else None, "Equal": torch.eq if torch else None, "Less": torch.lt if torch else None,
    "LessOrEqual": torch.le if torch else None, "Greater": torch.gt if torch else None,
    "GreaterOrEqual": torch.ge if torch else None, "And": torch.logical_and if torch else None,
    "Or": torch.logical_or if torch else None, "Xor": torch.logical_xor if torch else None,
}.items():
    OPS[_name] = (lambda f: lambda xs, a, n: f(xs[0], xs[1]))(_fn)


@op("Div")
def _div(xs, a, n):
    x, y = xs
    return torch.div(x, y, rounding_mode="trunc") if not x.is_floating_point() else x / y


@op("Mod")
def _mod(xs, a, n):
    return torch.fmod(xs[0], xs[1]) if a.get("fmod", 0) else torch.remainder(xs[0], xs[1])


@op("Max", "Min", "Sum", "Mean")
def _variadic(xs, a, n):
    out = xs[0]
    for x in xs[1:]:
        out = {"Max": torch.maximum, "Min": torch.minimum}.get(n.op_type, torch.add)(out, x)
    return out / len(xs) if n.op_type == "Mean" else out


@op("Where")
def _where(xs, a, n):
    return torch.where(xs[0], xs[1], xs[2])


@op("Clip")
def _clip(xs, a, n):
    lo = xs[1] if len(xs) > 1 and xs[1] is not None else a.get("min")
    hi = xs[2] if len(xs) > 2 and xs[2] is not None else a.get("max")
    x = xs[0]
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype, device=x.device))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype, device=x.device))
    return x


@op("LeakyRelu")
def _leaky(xs, a, n):
    return F.leaky_relu(xs[0], a.get("alpha", 0.01))


@op("Elu")
def _elu(xs, a, n):
    return F.elu(xs[0], a.get("alpha", 1.0))


@op("HardSigmoid")
def _hsig(xs, a, n):
    return torch.clamp(a.get("alpha", 0.2) * xs[0] + a.get("beta", 0.5), 0, 1)


@op("Gelu")
def _gelu(xs, a, n):
    return F.gelu(xs[0], approximate=a.get("approximate", "none"))


@op("Softmax", "LogSoftmax")
def _softmax(xs, a, n, opset=13):
    x = xs[0]
    fn = torch.softmax if n.op_type == "Softmax" else torch.log_softmax
    axis = a.get("axis", -1 if a["_opset"] >= 13 else 1)
    if a["_opset"] >= 13:
        return fn(x, dim=axis)
    shape = x.shape  # opset < 13: coerced to 2-D at `axis`
    flat = x.reshape(int(np.prod(shape[:axis % x.dim()])), -1)
    return fn(flat, dim=1).reshape(shape)


@op("Cast")
def _cast(xs, a, n):
    return xs[0].to(_dtype(a["to"]))


@op("CastLike")
def _castlike(xs, a, n):
    return xs[0].to(xs[1].dtype)


# --- linear algebra and normalisation ---------------------------------------------------------------
@op("MatMul")
def _matmul(xs, a, n):
    return torch.matmul(xs[0], xs[1])


@op("Gemm")
def _gemm(xs, a, n):
    A = xs[0].t() if a.get("transA", 0) else xs[0]
    B = xs[1].t() if a.get("transB", 0) else xs[1]
    y = a.get("alpha", 1.0) * (A @ B)
    if len(xs) > 2 and xs[2] is not None:
        y = y + a.get("beta", 1.0) * xs[2]
    return y


def _spatial_pads(a: dict, x, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] after resolving auto_pad."""
    k = len(kernel)
    mode = a.get("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(k):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            pads_b.append(small if mode == "SAME_UPPER" else big)
            pads_e.append(big if mode == "SAME_UPPER" else small)
        return pads_b + pads_e
    if mode == "VALID":
        return [0] * (2 * k)
    return list(a.get("pads", [0] * (2 * k)))


def _pad_input(x, pads: list[int], value: float = 0.0):
    """Apply ONNX-style spatial pads; returns (x, symmetric padding per dim or None)."""
    k = len(pads) // 2
    begin, end = pads[:k], pads[k:]
    if begin == end:
        return x, begin
    torch_pads = []
    for i in reversed(range(k)):
        torch_pads += [begin[i], end[i]]
    return F.pad(x, torch_pads, value=value), [0] * k


@op("Conv")
def _conv(xs, a, n):
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    k = w.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides, dil = list(a.get("strides", [1] * k)), list(a.get("dilations", [1] * k))
    x, padding = _pad_input(x, _spatial_pads(a, x, kernel, strides, dil))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[k]
    return fn(x, w, b, strides, padding, dil, a.get("group", 1))


@op("ConvTranspose")
def _conv_t(xs, a, n):
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    k = w.dim() - 2
    strides, dil = list(a.get("strides", [1] * k)), list(a.get("dilations", [1] * k))
    pads = list(a.get("pads", [0] * (2 * k)))
    if pads[:k] != pads[k:] or "output_shape" in a:
        raise NotSupported("ConvTranspose with asymmetric pads or output_shape")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[k]
    return fn(x, w, b, strides, pads[:k], list(a.get("output_padding", [0] * k)), a.get("group", 1), dil)


@op("BatchNormalization")
def _bn(xs, a, n):
    x, scale, bias, mean, var = xs[:5]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale / torch.sqrt(var + a.get("epsilon", 1e-5))  # inference form: running statistics
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


@op("LayerNormalization")
def _ln(xs, a, n):
    x = xs[0]
    axis = a.get("axis", -1) % x.dim()
    shape = x.shape[axis:]
    bias = xs[2] if len(xs) > 2 else None
    return F.layer_norm(x, shape, xs[1].expand(shape) if xs[1].shape != shape else xs[1],
                        None if bias is None else bias.expand(shape), a.get("epsilon", 1e-5))


# --- pooling -------------------------------------------------------------------------------------
@op("MaxPool", "AveragePool")
def _pool(xs, a, n):
    x = xs[0]
    kernel = list(a["kernel_shape"])
    k = len(kernel)
    strides, dil = list(a.get("strides", [1] * k)), list(a.get("dilations", [1] * k))
    pads = _spatial_pads(a, x, kernel, strides, dil)
    ceil = bool(a.get("ceil_mode", 0))
    if n.op_type == "MaxPool":
        x, padding = _pad_input(x, pads, value=-math.inf)
        if any(p > kk // 2 for p, kk in zip(padding, kernel)):
            x, padding = _pad_input(x, padding + padding, value=-math.inf)
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[k]
        return fn(x, kernel, strides, padding, dil, ceil_mode=ceil)
    include = bool(a.get("count_include_pad", 0))
    torch_pads = [p for i in reversed(range(k)) for p in (pads[:k][i], pads[k:][i])]
    padded = F.pad(x, torch_pads)  # zeros: summed, they add nothing
    total = _avg(padded, kernel, strides, ceil)
    if include or not any(pads):
        return total
    # exclude the padding from the count: divide by the share of real elements per window
    real = _avg(F.pad(torch.ones_like(x[:1, :1]), torch_pads), kernel, strides, ceil)
    return total / real


def _avg(x, kernel, strides, ceil):
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    return fn(x, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)


@op("GlobalAveragePool")
def _gap(xs, a, n):
    return xs[0].mean(dim=tuple(range(2, xs[0].dim())), keepdim=True)


@op("GlobalMaxPool")
def _gmp(xs, a, n):
    return xs[0].amax(dim=tuple(range(2, xs[0].dim())), keepdim=True)


# --- reductions ----------------------------------------------------------------------------------
def _axes(xs, a, n) -> list[int] | None:
    if len(xs) > 1 and xs[1] is not None:
        return _ints(xs[1])
    return list(a["axes"]) if "axes" in a else None


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1", "ReduceSumSquare")
def _reduce(xs, a, n):
    x = xs[0]
    axes = _axes(xs, a, n)
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    dims = tuple(d % x.dim() for d in axes)
    kind = n.op_type
    if kind == "ReduceMean":
        return x.mean(dim=dims, keepdim=keep)
    if kind == "ReduceSum":
        return x.sum(dim=dims, keepdim=keep)
    if kind == "ReduceMax":
        return x.amax(dim=dims, keepdim=keep)
    if kind == "ReduceMin":
        return x.amin(dim=dims, keepdim=keep)
    if kind == "ReduceProd":
        for d in sorted(dims, reverse=True):
            x = x.prod(dim=d, keepdim=keep)
        return x
    if kind == "ReduceL2":
        return torch.sqrt((x * x).sum(dim=dims, keepdim=keep))
    if kind == "ReduceL1":
        return x.abs().sum(dim=dims, keepdim=keep)
    return (x * x).sum(dim=dims, keepdim=keep)


@op("ArgMax", "ArgMin")
def _argmax(xs, a, n):
    fn = torch.argmax if n.op_type == "ArgMax" else torch.argmin
    return fn(xs[0], dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))


# --- shapes and data movement --------------------------------------------------------------------
@op("Shape")
def _shape(xs, a, n):
    dims = list(xs[0].shape)
    start, end = a.get("start", 0), a.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64, device=xs[0].device)


@op("Size")
def _size(xs, a, n):
    return torch.tensor(xs[0].numel(), dtype=torch.int64, device=xs[0].device)


@op("Reshape")
def _reshape(xs, a, n):
    x, shape = xs[0], _ints(xs[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


@op("Flatten")
def _flatten(xs, a, n):
    x = xs[0]
    axis = a.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@op("Transpose")
def _transpose(xs, a, n):
    perm = a.get("perm") or list(reversed(range(xs[0].dim())))
    return xs[0].permute(*perm)


@op("Squeeze")
def _squeeze(xs, a, n):
    axes = _axes(xs, a, n)
    x = xs[0]
    if axes is None:
        return x.squeeze()
    for d in sorted((d % x.dim() for d in axes), reverse=True):
        x = x.squeeze(d)
    return x


@op("Unsqueeze")
def _unsqueeze(xs, a, n):
    axes = _axes(xs, a, n)
    x = xs[0]
    rank = x.dim() + len(axes)
    for d in sorted(d % rank for d in axes):
        x = x.unsqueeze(d)
    return x


@op("Concat")
def _concat(xs, a, n):
    parts = [x for x in xs if x is not None and (x.dim() == 0 or x.numel() or x.dim() > 1)]
    return torch.cat([p.reshape(1) if p.dim() == 0 else p for p in parts], dim=a["axis"])


@op("Split")
def _split(xs, a, n):
    x, axis = xs[0], a.get("axis", 0)
    if len(xs) > 1 and xs[1] is not None:
        sizes = _ints(xs[1])
    elif "split" in a:
        sizes = list(a["split"])
    else:
        parts = a.get("num_outputs", len(n.outputs))
        step = -(-x.shape[axis] // parts)
        sizes = [min(step, x.shape[axis] - i * step) for i in range(parts)]
    return tuple(torch.split(x, sizes, dim=axis))


@op("Slice")
def _slice(xs, a, n):
    x = xs[0]
    if len(xs) > 1:
        starts, ends = _ints(xs[1]), _ints(xs[2])
        axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
        steps = _ints(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = list(a.get("axes", range(len(starts)))), [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        size = x.shape[ax]
        if st > 0:
            s, e = max(0, min(size, s + size if s < 0 else s)), max(0, min(size, e + size if e < 0 else e))
            index[ax] = slice(s, e, st)
        else:  # negative steps: torch slicing has none, flip then slice
            s = max(-1, min(size - 1, s + size if s < 0 else s))
            e = max(-1, min(size - 1, e + size if e < 0 else e))
            idx = torch.arange(s, e, st, device=x.device)
            x = x.index_select(ax, idx)
            index[ax] = slice(None)
    return x[tuple(index)]


@op("Gather")
def _gather(xs, a, n):
    x, idx = xs
    axis = a.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


@op("GatherND")
def _gather_nd(xs, a, n):
    x, idx = xs
    b = a.get("batch_dims", 0)
    if b:
        raise NotSupported("GatherND with batch_dims")
    idx = idx.long()
    return x[tuple(idx[..., i] for i in range(idx.shape[-1]))]


@op("Expand")
def _expand(xs, a, n):
    x, shape = xs[0], _ints(xs[1])
    target = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return x.expand(target)


@op("Tile")
def _tile(xs, a, n):
    return xs[0].repeat(*_ints(xs[1]))


@op("Range")
def _range(xs, a, n):
    start, limit, delta = (x.item() for x in xs)
    return torch.arange(start, limit, delta, dtype=xs[0].dtype, device=xs[0].device)


@op("ConstantOfShape")
def _const_of_shape(xs, a, n):
    value = a.get("value")
    arr = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    t = torch.as_tensor(arr, device=xs[0].device)
    return t.expand(_ints(xs[0])).clone() if t.numel() == 1 else t


@op("Constant")
def _constant(xs, a, n):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            return torch.as_tensor(np.array(a[key]))
    raise NotSupported("Constant without a numeric value")


@op("Dropout")
def _dropout(xs, a, n):
    return (xs[0], torch.ones_like(xs[0], dtype=torch.bool)) if len(n.outputs) > 1 else xs[0]


@op("Pad")
def _pad(xs, a, n):
    x = xs[0]
    pads = _ints(xs[1]) if len(xs) > 1 and xs[1] is not None else list(a["pads"])
    value = float(xs[2].item()) if len(xs) > 2 and xs[2] is not None else a.get("value", 0.0)
    if len(xs) > 3 and xs[3] is not None:
        axes = [d % x.dim() for d in _ints(xs[3])]
    else:
        axes = list(range(x.dim()))
    k = len(axes)
    full_b, full_e = [0] * x.dim(), [0] * x.dim()
    for i, ax in enumerate(axes):
        full_b[ax], full_e[ax] = pads[i], pads[k + i]
    torch_pads = [p for d in reversed(range(x.dim())) for p in (full_b[d], full_e[d])]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[a.get("mode", "constant")]
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    lead = next(i for i in range(x.dim()) if full_b[i] or full_e[i])
    return F.pad(x, torch_pads[: 2 * (x.dim() - lead)], mode=mode)


@op("Resize", "Upsample")
def _resize(xs, a, n):
    x = xs[0]
    scales = sizes = None
    tensors = xs[1:]
    if n.op_type == "Upsample":
        scales = _floats(tensors[0]) if tensors else list(a["scales"])
    else:
        if len(tensors) > 1 and tensors[1] is not None and tensors[1].numel():
            scales = _floats(tensors[1])
        if len(tensors) > 2 and tensors[2] is not None and tensors[2].numel():
            sizes = _ints(tensors[2])
    mode = a.get("mode", "nearest")
    if sizes is None:
        sizes = [int(math.floor(d * s)) for d, s in zip(x.shape, scales)]
    if list(sizes[:2]) != list(x.shape[:2]):
        raise NotSupported("Resize over the batch or channel axis")
    spatial = sizes[2:]
    ctm = a.get("coordinate_transformation_mode", "half_pixel" if n.op_type == "Resize" else "asymmetric")
    if mode == "nearest":
        if ctm not in ("asymmetric",) or a.get("nearest_mode", "round_prefer_floor") != "floor":
            if not all(o % i == 0 for o, i in zip(spatial, x.shape[2:])):
                raise NotSupported(f"Resize nearest with {ctm} / {a.get('nearest_mode')} at a non-integer scale")
        return F.interpolate(x, size=spatial, mode="nearest")
    torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    if ctm not in ("half_pixel", "align_corners", "pytorch_half_pixel"):
        raise NotSupported(f"Resize linear with coordinate_transformation_mode {ctm}")
    return F.interpolate(x, size=spatial, mode=torch_mode, align_corners=ctm == "align_corners")


def _floats(t) -> list[float]:
    return [float(v) for v in t.tolist()]


@op("Einsum")
def _einsum(xs, a, n):
    return torch.einsum(a["equation"], *xs)


class NotSupported(Exception):
    """An op (or an attribute combination) the executor does not implement."""


# --- the module ----------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"


def _attrs(node: ir.Node, opset: int) -> dict[str, Any]:
    out: dict[str, Any] = {"_opset": opset}
    for name, attr in node.attributes.items():
        v = attr.value
        if isinstance(v, ir.TensorProtocol):
            v = v.numpy()
        elif isinstance(v, (list, tuple)):
            v = list(v)
        out[name] = v
    return out


def unsupported_ops(model: Model) -> list[str]:
    """'<op> (node <name>)' for every main-graph node the executor cannot run."""
    return [f"{n.op_type} (node {n.name!r})" for n in model.graph
            if n.domain not in ("", "ai.onnx") or n.op_type not in OPS]


if torch is not None:
    class GraphModule(torch.nn.Module):
        """The IR as a torch module. Inputs by position (graph input order) or by name;
        returns a tuple of the graph outputs (a dict with `as_dict=True`)."""

        def __init__(self, model: Model, *, trainable: Callable[[str, np.ndarray], bool] | None = None):
            super().__init__()
            missing = unsupported_ops(model)
            if missing:
                shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                raise UnsupportedOpError(f"the torch executor has no implementation for {shown}; "
                                    "train a model without these ops, or add them to slimgraph.backends.torch_exec.OPS")
            self.model = model
            self.params = torch.nn.ParameterDict()
            self._const_names: dict[str, str] = {}
            trainable = trainable or _default_trainable
            statistics = {n.inputs[i].name for n in model.graph if n.op_type == "BatchNormalization"
                          for i in (3, 4) if len(n.inputs) > i and n.inputs[i] is not None}
            for name, value in model.graph.initializers.items():
                if value.const_value is None:
                    continue
                array = value.const_value.numpy()
                key = _safe(name)
                while key in self._const_names.values():
                    key += "_"
                self._const_names[name] = key
                tensor = torch.from_numpy(np.array(array))
                if name not in statistics and trainable(name, array):
                    self.params[key] = torch.nn.Parameter(tensor)
                else:
                    self.register_buffer("c_" + key, tensor)
            opset = model.opset
            self._nodes = [(n, _attrs(n, opset)) for n in model.graph]
            self.input_names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
            self.output_names = [v.name for v in model.graph.outputs]
            #: value name -> module applied to that value wherever it is produced or read
            #: from (graph input, constant, node output): fake quantization for QAT
            self.value_hooks = torch.nn.ModuleDict()
            self._hooked: dict[str, str] = {}

        def hook(self, value_name: str, module) -> None:
            """Apply `module` to the value `value_name` each time it is computed."""
            key = _safe(value_name)
            while key in self.value_hooks and self._hooked.get(value_name) != key:
                key += "_"
            self.value_hooks[key] = module
            self._hooked[value_name] = key

        def _hooked_value(self, name: str, x):
            key = self._hooked.get(name)
            return x if key is None else self.value_hooks[key](x)

        def constant(self, name: str):
            key = self._const_names[name]
            return self.params[key] if key in self.params else getattr(self, "c_" + key)

        def forward(self, *args, as_dict: bool = False, **kwargs):
            env: dict[str, Any] = {}
            for name, x in zip(self.input_names, args):
                env[name] = x
            env.update(kwargs)
            missing = [n for n in self.input_names if n not in env]
            if missing:
                raise PipelineError(f"torch executor: inputs {missing} not given (the model takes {self.input_names})")
            for name in self.input_names:
                env[name] = self._hooked_value(name, env[name])
            for name in self._const_names:
                if name not in env:
                    env[name] = self._hooked_value(name, self.constant(name))
            for node, attrs in self._nodes:
                inputs = [None if v is None or not v.name else env[v.name] for v in node.inputs]
                try:
                    result = OPS[node.op_type](inputs, attrs, node)
                except NotSupported as e:
                    raise PipelineError(f"torch executor: node {node.name!r} ({node.op_type}): {e}") from None
                except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as e:
                    raise PipelineError(f"torch executor: node {node.name!r} ({node.op_type}) failed: {e}") from e
                outs = result if isinstance(result, tuple) else (result,)
                for value, out in zip(node.outputs, outs):
                    if value is not None and value.name:
                        env[value.name] = self._hooked_value(value.name, out)
            if as_dict:
                return {n: env[n] for n in self.output_names}
            return tuple(env[n] for n in self.output_names)

        def to_model(self) -> Model:
            """A copy of the IR model holding this module's current parameter values."""
            out = self.model.clone()
            for name, key in self._const_names.items():
                if key in self.params:
                    value = out.graph.initializers[name]
                    array = self.params[key].detach().cpu().numpy().astype(value.const_value.numpy().dtype)
                    value.const_value = ir.tensor(array, name=name)
            return out
else:  # pragma: no cover
    GraphModule = None  # type: ignore[assignment,misc]


def _default_trainable(name: str, array: np.ndarray) -> bool:
    """Float tensors of more than one element: weights, biases, norms. Scalars (epsilons,
    scale factors) and integer constants (shapes, indices) stay fixed."""
    return array.dtype.kind == "f" and array.size > 1


def to_torch(model: Any, *, trainable: Callable[[str, np.ndarray], bool] | None = None) -> GraphModule:
    """`model` (anything `slimgraph.load` takes) as a trainable torch module (needs torch)."""
    if torch is None:
        raise PipelineError("the torch executor needs the torch extra: pip install 'slimgraph[torch]'")
    from slimgraph.ir import load

    m = model if isinstance(model, Model) else load(model)
    m = m.clone()
    m.graph.sort()
    return GraphModule(m, trainable=trainable)


def run(module: GraphModule, feeds: Mapping[str, np.ndarray], device: str = "cpu") -> dict[str, np.ndarray]:
    """Run the module on numpy feeds without gradients; numpy outputs by name."""
    with torch.no_grad():
        out = module(**{k: torch.from_numpy(np.asarray(v)).to(device) for k, v in feeds.items()}, as_dict=True)
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


__all__ = ["OPS", "GraphModule", "PassError", "run", "to_torch", "unsupported_ops"]
