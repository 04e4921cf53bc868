"""Per-op channel rules for `channels.analyze`: one function per op family, in one table.

Each rule reads its node's inputs' channel spaces from the builder `b`, gives its outputs a
space, records the constant slices the channels index, and marks spaces unsafe (with a
reason) where it cannot prove the channel mapping.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.passes.prune.channels import (
    BINARY, POOLS, REDUCE, UNARY, _Builder, _dims, _Info, keep_index,
)
from slimgraph.passes.prune.channels import _constant as constant


def _rank(value: ir.Value | None) -> int | None:
    d = _dims(value)
    return None if d is None else len(d)


def _ints(node: ir.Node, attr: str, index: int) -> list[int] | None:
    """An int list given as attribute `attr` (old opsets) or constant input `index`."""
    if attr in node.attributes:
        return list(node.attributes[attr].value)
    if index < len(node.inputs) and node.inputs[index] is not None:
        a = constant(node.inputs[index])
        return None if a is None else [int(x) for x in a.reshape(-1)]
    return None


def _need(b: _Builder, node: ir.Node, value: ir.Value, axis: int, factor_ok: bool = False) -> _Info | None:
    """The value's space, marked unsafe unless its channels sit on `axis` (unflattened)."""
    info = b.get(value)
    if info is None:
        return None
    if info.axis is not None and info.axis != axis:
        b.unsafe(info.key, f"{node.op_type} {node.name!r} reads axis {axis}, channels are on axis {info.axis}")
    if info.factor != 1 and not factor_ok:
        b.unsafe(info.key, f"{node.op_type} {node.name!r} reads flattened channels")
    return info


# --- weight layers ------------------------------------------------------------------------------
def conv(b: _Builder, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    weight = constant(w)
    xi = _need(b, node, x, 1)
    out = node.outputs[0]
    if weight is None or xi is None:
        return b.touch_unknown(node, "Conv with a non-constant weight")
    group = node.attributes.get_int("group", 1)
    if group == 1:
        b.slice(xi, w, 1, node, "consumer")
        oi = b.new_space(out, 1)
        b.slice(oi, w, 0, node, "producer")
        b.slice(oi, bias, 0, node, "producer")
    elif weight.shape[1] == 1 and weight.shape[0] == group:
        # depthwise, multiplier 1: output channel c is input channel c filtered alone
        b.info[out.name] = _Info(xi.key, 1)
        b.slice(xi, w, 0, node, "depthwise")
        b.slice(xi, bias, 0, node, "depthwise")
        b.fixups.append((_fix_group, [xi.key], node))
    else:
        b.unsafe(xi.key, f"grouped Conv {node.name!r} (group={group}) is not handled")
        b.new_space(out, 1, f"output of grouped Conv {node.name!r}")


def _fix_group(analysis, keep, roots, node: ir.Node) -> None:
    node.attributes["group"] = ir.AttrInt64("group", len(keep_index(analysis, roots[0], keep)))


def conv_transpose(b: _Builder, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    xi = _need(b, node, x, 1)
    if constant(w) is None or xi is None or node.attributes.get_int("group", 1) != 1:
        return b.touch_unknown(node, "ConvTranspose with a non-constant weight or groups")
    b.slice(xi, w, 0, node, "consumer")
    oi = b.new_space(node.outputs[0], 1)
    b.slice(oi, w, 1, node, "producer")
    b.slice(oi, bias, 0, node, "producer")


def gemm(b: _Builder, node: ir.Node) -> None:
    a, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    weight = constant(w)
    ai = _need(b, node, a, 1, factor_ok=True)
    if weight is None or weight.ndim != 2 or ai is None or node.attributes.get_int("transA", 0):
        return b.touch_unknown(node, "Gemm with transA or a non-constant weight")
    trans_b = node.attributes.get_int("transB", 0)
    b.slice(ai, w, 1 if trans_b else 0, node, "consumer", ai.factor)
    oi = b.new_space(node.outputs[0], 1)
    b.slice(oi, w, 0 if trans_b else 1, node, "producer")
    bias = constant(c)
    n = weight.shape[0 if trans_b else 1]
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] == n and n > 1:
        b.slice(oi, c, bias.ndim - 1, node, "producer")
    elif c is not None and bias is None:
        b.unsafe(oi.key, f"Gemm {node.name!r} has a non-constant C")


def matmul(b: _Builder, node: ir.Node) -> None:
    a, w = node.inputs
    weight = constant(w)
    rank_a = _rank(a)
    if weight is None and constant(a) is None:
        return _batched_matmul(b, node)
    if weight is None or weight.ndim != 2 or constant(a) is not None:
        return b.touch_unknown(node, "MatMul with a constant first operand or a non-2-D weight")
    if rank_a is None or rank_a < 2:
        return b.touch_unknown(node, "MatMul input of unknown rank")
    ai = _need(b, node, a, rank_a - 1, factor_ok=True)
    if ai is None:
        return b.touch_unknown(node)
    b.slice(ai, w, 0, node, "consumer", ai.factor)
    oi = b.new_space(node.outputs[0], rank_a - 1)
    b.slice(oi, w, 1, node, "producer")


def _batched_matmul(b: _Builder, node: ir.Node) -> None:
    """MatMul of two activations (attention): channels may only sit on a batch axis
    (heads), the same one in both operands and the output."""
    a, w = node.inputs
    ia, iw, ro = b.get(a), b.get(w), _rank(node.outputs[0])
    da, dw = _dims(a), _dims(w)
    if ia is None or iw is None or ro is None or da is None or dw is None:
        return b.touch_unknown(node, "MatMul of two activations of unknown shape")
    aligned = set()
    for info, dims in ((ia, da), (iw, dw)):
        if info.axis is None or info.axis >= len(dims) - 2 or info.factor != 1:
            return b.touch_unknown(node, "MatMul of two activations over their channel axis")
        aligned.add(info.axis - len(dims) + ro)
    if len(aligned) != 1 or da[ia.axis] != dw[iw.axis]:
        return b.touch_unknown(node, "MatMul of two activations with channels on different axes")
    b.join(ia.key, iw.key)
    b.info[node.outputs[0].name] = _Info(ia.key, aligned.pop())


# --- pass-through ops -----------------------------------------------------------------------------
def unary(b: _Builder, node: ir.Node) -> None:
    extra = [v for v in node.inputs[1:] if v is not None]
    if node.op_type != "CastLike" and any(constant(v) is None or constant(v).size > 1 for v in extra):
        return b.touch_unknown(node, "per-channel or non-constant extra input")
    b.same(node, node.inputs[0], node.outputs[0])
    for v in node.outputs[1:]:
        b.new_space(v, None, f"second output of {node.op_type} {node.name!r}")


def batch_norm(b: _Builder, node: ir.Node) -> None:
    xi = _need(b, node, node.inputs[0], 1)
    if xi is None or node.attributes.get_int("training_mode", 0) or len(node.outputs) > 1 and any(
            o.uses() for o in node.outputs[1:]):
        return b.touch_unknown(node, "BatchNormalization in training mode")
    b.same(node, node.inputs[0], node.outputs[0])
    roles = ("bn_scale", "param", "param", "param")
    for v, role in zip(node.inputs[1:5], roles):
        b.slice(xi, v, 0, node, role)


def instance_norm(b: _Builder, node: ir.Node) -> None:
    xi = _need(b, node, node.inputs[0], 1)
    if xi is None:
        return b.touch_unknown(node)
    b.same(node, node.inputs[0], node.outputs[0])
    for v in node.inputs[1:3]:
        b.slice(xi, v, 0, node, "param")


def layer_norm(b: _Builder, node: ir.Node) -> None:
    """Normalises over axes [axis, rank): a pass-through when the channel axis is before
    them (its scale and bias then do not index channels)."""
    info, r = b.get(node.inputs[0]), _rank(node.inputs[0])
    if info is None or info.axis is None or r is None:
        return b.touch_unknown(node)
    if info.axis >= node.attributes.get_int("axis", -1) % r:
        return b.touch_unknown(node, "normalisation over the channel axis")
    b.same(node, node.inputs[0], node.outputs[0])
    for v in node.outputs[1:]:
        b.new_space(v, None, f"statistics output of {node.name!r}")


def pool(b: _Builder, node: ir.Node) -> None:
    if _need(b, node, node.inputs[0], 1) is None:
        return b.touch_unknown(node)
    b.same(node, node.inputs[0], node.outputs[0])
    for v in node.outputs[1:]:
        b.new_space(v, None, f"indices output of {node.name!r}")


def broadcast(b: _Builder, node: ir.Node) -> None:
    """Elementwise ops with broadcasting: activations with a full channel axis are joined,
    constants along it sliced, size-1 operands left alone."""
    out = node.outputs[0]
    r_out = _rank(out) or max((_rank(v) or 0) for v in node.inputs if v is not None)
    lead = None
    for v in node.inputs:
        info = b.get(v)
        if info is not None and info.axis is not None and _rank(v) == r_out and constant(v) is None:
            lead = (v, info)
            break
    if lead is None:
        if _per_channel_constant(b, node, r_out):
            return
        return b.touch_unknown(node, "elementwise op without a channel operand")
    lv, li = lead
    full = (_dims(lv) or [None] * r_out)[li.axis]
    b.info[out.name] = _Info(li.key, li.axis, li.factor)
    for v in node.inputs:
        if v is None or v is lv:
            continue
        arr = constant(v)
        if arr is not None:
            aligned = li.axis - r_out + arr.ndim
            if aligned < 0 or arr.shape[aligned] == 1:
                continue
            if full is not None and arr.shape[aligned] == full:
                b.slice(li, v, aligned, node, "param", li.factor)
            else:
                b.unsafe(li.key, f"{node.op_type} {node.name!r}: constant {v.name!r} does not match the channels")
            continue
        info = b.get(v)
        r = _rank(v)
        if info is None or r is None:
            b.unsafe(li.key, f"{node.op_type} {node.name!r}: operand {v.name!r} not understood")
            continue
        aligned = li.axis - r_out + r
        d = _dims(v)
        if aligned < 0 or (d[aligned] == 1 and full != 1):
            continue  # broadcast along the channels: independent of them
        if info.axis != aligned or info.factor != li.factor:
            b.unsafe(li.key, f"{node.op_type} {node.name!r}: operands' channel axes disagree")
            b.unsafe(info.key, f"{node.op_type} {node.name!r}: operands' channel axes disagree")
        b.join(li.key, info.key)


def _per_channel_constant(b: _Builder, node: ir.Node, r_out: int) -> bool:
    """A per-sample statistic times a per-channel constant (a hand-built LayerNorm's
    `rsqrt(var) * gamma`, [N, 1] x [1, C]): the output's channels are the constant's axis,
    a new space that the op joining it with the normalised tensor ties to that tensor's
    group. False when the operands are not of that form."""
    axis, consts = None, []
    for v in node.inputs:
        if v is None:
            continue
        arr, d = constant(v), _dims(v)
        if d is None:
            return False
        offset = r_out - len(d)
        wide = [i + offset for i, x in enumerate(d) if x != 1]
        if arr is None:
            if b.get(v) is None or b.get(v).axis is not None:
                return False
            continue
        if len(wide) != 1 or (axis is not None and wide[0] != axis) or wide[0] == 0:
            return False
        axis = wide[0]
        consts.append((v, wide[0] - offset))
    if axis is None or any(
            (_dims(v) or (None,))[axis - r_out + len(_dims(v))] not in (1,) for v in node.inputs
            if v is not None and constant(v) is None and axis - r_out + len(_dims(v)) >= 0):
        return False
    out = b.new_space(node.outputs[0], axis)
    for v, a in consts:
        b.slice(out, v, a, node, "param")
    return True


def resize(b: _Builder, node: ir.Node) -> None:
    if _need(b, node, node.inputs[0], 1) is None:
        return b.touch_unknown(node)
    index = 1 if node.op_type == "Upsample" else 2
    scales = constant(node.inputs[index]) if index < len(node.inputs) and node.inputs[index] is not None else None
    sizes_given = len(node.inputs) > 3 and node.inputs[3] is not None and node.op_type == "Resize"
    if scales is None or scales.size < 2 or not np.all(scales[:2] == 1) or sizes_given:
        return b.touch_unknown(node, "Resize that is not a constant spatial scale")
    b.same(node, node.inputs[0], node.outputs[0])


def pad(b: _Builder, node: ir.Node) -> None:
    info, r = b.get(node.inputs[0]), _rank(node.inputs[0])
    pads = _ints(node, "pads", 1)
    has_axes = len(node.inputs) > 3 and node.inputs[3] is not None
    if info is None or info.axis is None or r is None or pads is None or has_axes or len(pads) != 2 * r:
        return b.touch_unknown(node, "Pad with non-constant pads")
    if pads[info.axis] or pads[info.axis + r]:
        return b.touch_unknown(node, "Pad along the channel axis")
    b.same(node, node.inputs[0], node.outputs[0])


def slice_(b: _Builder, node: ir.Node) -> None:
    info, d = b.get(node.inputs[0]), _dims(node.inputs[0])
    starts, ends = _ints(node, "starts", 1), _ints(node, "ends", 2)
    axes = _ints(node, "axes", 3)
    steps = _ints(node, "steps", 4)
    if info is None or info.axis is None or d is None or starts is None or ends is None:
        return b.touch_unknown(node, "Slice with non-constant bounds")
    axes = [a % len(d) for a in (axes if axes is not None else range(len(starts)))]
    if info.axis in axes:
        i = axes.index(info.axis)
        size = d[info.axis]
        whole = starts[i] == 0 and ends[i] >= (size or 0) > 0 and (steps is None or steps[i] == 1)
        if not whole:
            return _slice_piece(b, node, info, i, size, starts, ends, steps)
    b.same(node, node.inputs[0], node.outputs[0])


def _slice_piece(b: _Builder, node: ir.Node, info: _Info, i: int, size, starts, ends, steps) -> None:
    """A Slice taking channels [start, end): a piece of its input's space (see
    `channels._pieces_to_definition`); its bounds are rewritten after pruning."""
    start, end = starts[i], ends[i]
    if size is None or info.factor != 1 or (steps is not None and steps[i] != 1) or "starts" in node.attributes:
        return b.touch_unknown(node, "Slice along the channel axis")
    start, end = (x + size if x < 0 else x for x in (start, end))
    start, end = max(0, min(start, size)), max(0, min(end, size))
    out = b.new_space(node.outputs[0], info.axis)
    b.space(info.key).pieces.append((start, end, out.key, node.name))
    b.fixups.append((_fix_slice, [info.key, out.key], node, i))


def _fix_slice(analysis, keep, roots, node: ir.Node, i: int) -> None:
    whole, piece = roots
    children = next(c for c, _, _ in analysis._spaces[whole].definitions if piece in c)
    start = sum(len(keep_index(analysis, c, keep)) for c in children[:children.index(piece)])
    end = start + len(keep_index(analysis, piece, keep))
    for index, bound in ((1, start), (2, end)):
        array = constant(node.inputs[index]).copy()
        array.reshape(-1)[i] = bound
        _replace_constant_input(node, index, array, ("starts", "ends")[index - 1])


def _replace_constant_input(node: ir.Node, index: int, array: np.ndarray, what: str) -> None:
    """Give `node` a new initializer as input `index` (the old one may be shared)."""
    graph = node.graph
    name, n = f"{node.name}_{what}_pruned", 0
    while name in graph.initializers:
        n += 1
        name = f"{node.name}_{what}_pruned_{n}"
    new = ir.Value(name=name, const_value=ir.tensor(array))
    new.shape = ir.Shape(array.shape)
    new.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(new)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)


def reduce(b: _Builder, node: ir.Node) -> None:
    info, r = b.get(node.inputs[0]), _rank(node.inputs[0])
    axes = _ints(node, "axes", 1)
    if info is None or info.axis is None or r is None or not axes:
        return b.touch_unknown(node, "reduction over all axes or unknown axes")
    axes = [a % r for a in axes]
    if info.axis in axes:
        return _channel_statistic(b, node, info, r, axes)
    keep = node.attributes.get_int("keepdims", 1)
    b.same(node, node.inputs[0], node.outputs[0], info.axis if keep else info.axis - sum(a < info.axis for a in axes))


#: reductions whose value over a subset of the channels is still meaningful
STATISTICS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceMax", "ReduceMin",
                        "ReduceL1", "ReduceL2"})


def _channel_statistic(b: _Builder, node: ir.Node, info: _Info, r: int, axes: list[int]) -> None:
    """A reduction over the channel axis (a normalisation's mean / variance, a max): a
    per-sample statistic without channels. Pruning changes it, as it changes any layer's
    output (Torch-Pruning prunes LayerNorm the same way), but the model stays valid. A
    ReduceSum whose readers multiply it by 1/C (a mean built by hand) gets 1/C' after
    pruning, so the mean stays a mean."""
    if node.op_type not in STATISTICS or info.factor != 1:
        return b.touch_unknown(node, "reduction over the channel axis")
    b.new_space(node.outputs[0], None)
    if node.op_type not in ("ReduceSum", "ReduceSumSquare"):
        return
    size = (_dims(node.inputs[0]) or [None] * r)[info.axis]
    others = [a for a in axes if a != info.axis]
    for use in node.outputs[0].uses():
        reader = use.node
        k = 1 - use.idx if reader.op_type == "Mul" and len(reader.inputs) == 2 else None
        scale = constant(reader.inputs[k]) if k is not None else None
        if size and not others and scale is not None and scale.size == 1 and np.isclose(
                float(scale.reshape(-1)[0]) * size, 1.0, rtol=1e-5):
            b.fixups.append((_fix_mean_scale, [info.key], reader, k, scale.dtype))


def _fix_mean_scale(analysis, keep, roots, reader: ir.Node, index: int, dtype) -> None:
    kept = len(keep_index(analysis, roots[0], keep))
    array = np.asarray(constant(reader.inputs[index])).copy()
    array.reshape(-1)[0] = 1.0 / kept
    _replace_constant_input(reader, index, array.astype(dtype), "mean_scale")


def squeeze(b: _Builder, node: ir.Node) -> None:
    info, d = b.get(node.inputs[0]), _dims(node.inputs[0])
    axes = _ints(node, "axes", 1)
    if info is None or info.axis is None or d is None:
        return b.touch_unknown(node)
    axes = [a % len(d) for a in axes] if axes is not None else [i for i, x in enumerate(d) if x == 1]
    if info.axis in axes:
        return b.touch_unknown(node, "Squeeze of the channel axis")
    b.same(node, node.inputs[0], node.outputs[0], info.axis - sum(a < info.axis for a in axes))


def unsqueeze(b: _Builder, node: ir.Node) -> None:
    info, r_out = b.get(node.inputs[0]), _rank(node.outputs[0])
    axes = _ints(node, "axes", 1)
    if info is None or info.axis is None or r_out is None or axes is None:
        return b.touch_unknown(node)
    axis = info.axis
    for a in sorted(x % r_out for x in axes):
        if a <= axis:
            axis += 1
    b.same(node, node.inputs[0], node.outputs[0], axis)


def transpose(b: _Builder, node: ir.Node) -> None:
    info = b.get(node.inputs[0])
    perm = node.attributes.get_ints("perm", None)
    if info is None or info.axis is None or perm is None or info.factor != 1:
        return b.touch_unknown(node, "Transpose without a known channel axis")
    b.same(node, node.inputs[0], node.outputs[0], list(perm).index(info.axis))


def softmax(b: _Builder, node: ir.Node) -> None:
    info, r = b.get(node.inputs[0]), _rank(node.inputs[0])
    default = -1 if b.model.opset >= 13 else 1
    if info is None or info.axis is None or r is None:
        return b.touch_unknown(node)
    if node.attributes.get_int("axis", default) % r == info.axis:
        return b.touch_unknown(node, "softmax over the channel axis")
    b.same(node, node.inputs[0], node.outputs[0])


def flatten(b: _Builder, node: ir.Node) -> None:
    info, d = b.get(node.inputs[0]), _dims(node.inputs[0])
    k = node.attributes.get_int("axis", 1)
    if info is None or d is None or info.axis is None or k % len(d) != info.axis or None in d[k + 1:]:
        return b.touch_unknown(node, "Flatten that does not start at the channel axis")
    b.info[node.outputs[0].name] = _Info(info.key, 1, info.factor * int(np.prod(d[k + 1:], dtype=np.int64)))


def reshape(b: _Builder, node: ir.Node) -> None:
    """Two provable reshapes of the channel axis `a` (dims before it kept, after it static):

    1. merge: [.., C, r1, .., rk, ..] -> [.., C*r, ..] (a flatten, or attention heads
       folded back): channel c owns entries [c*r, (c+1)*r) of the merged axis;
    2. split: [.., H*D, ..] -> [.., H, D, ..] (attention heads): the H axis is a new space,
       and the input's channels are its heads, D channels each.

    The target's entry for the channel axis is -1 or the channel count (rewritten after
    pruning); it is a constant or a 1-element constant piece of a Concat."""
    data, out = node.inputs[0], node.outputs[0]
    info, d, o = b.get(data), _dims(data), _dims(out)
    if info is None or info.axis is None or d is None or o is None or len(o) == len(d):
        return b.touch_unknown(node, "Reshape that is not a provable flatten")
    a = info.axis
    kept_before = len(o) > a and all(x == y for x, y in zip(d[:a], o[:a]))
    if len(o) < len(d):  # merge
        k = len(d) - len(o)
        rest = d[a + 1:a + k + 1]
        ok = kept_before and None not in rest and d[a] is not None and tuple(o[a + 1:]) == tuple(d[a + k + 1:])
        per_channel = info.factor * int(np.prod(rest, dtype=np.int64)) if ok else 0
        ok = ok and o[a] == d[a] * int(np.prod(rest, dtype=np.int64))
        entry = _target_entry(node, a, len(o)) if ok else None
        if entry is None or entry[3] not in (-1, o[a]):
            return b.touch_unknown(node, "Reshape that is not a provable flatten")
        b.info[out.name] = _Info(info.key, a, per_channel)
        if entry[3] != -1:
            b.fixups.append((_fix_target, [info.key], *entry[:3], per_channel))
        return
    heads, size = o[a], o[a + 1] if len(o) > a + 1 else None  # split
    ok = (len(o) == len(d) + 1 and kept_before and info.factor == 1 and None not in (heads, size, d[a])
          and heads * size == d[a] and tuple(o[a + 2:]) == tuple(d[a + 1:]))
    entry = _target_entry(node, a, len(o)) if ok else None
    second = _target_entry(node, a + 1, len(o)) if ok else None
    if entry is None or second is None or entry[3] not in (-1, heads) or second[3] != size:
        return b.touch_unknown(node, "Reshape that is not a provable flatten or head split")
    hi = b.new_space(out, a)
    b.space(info.key).definitions.append(([hi.key], f"heads of {node.name}", size))
    if entry[3] != -1:
        b.fixups.append((_fix_target, [hi.key], *entry[:3], 1))


def _target_entry(node: ir.Node, position: int, rank: int) -> tuple[ir.Node, int, int, int] | None:
    """Where a Reshape's target entry `position` is held: (reader node, its input index,
    element index, value) for a constant target, or a 1-element constant Concat piece."""
    shape = node.inputs[1]
    target = constant(shape)
    if target is not None:
        return (node, 1, position, int(target.reshape(-1)[position])) if target.size == rank else None
    concat = shape.producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != rank:
        return None
    if any(_dims(v) != (1,) for v in concat.inputs):
        return None
    piece = constant(concat.inputs[position])
    return None if piece is None else (concat, position, 0, int(piece.reshape(-1)[0]))


def _fix_target(analysis, keep, roots, reader: ir.Node, index: int, element: int, per_channel: int) -> None:
    array = constant(reader.inputs[index]).copy()
    array.reshape(-1)[element] = len(keep_index(analysis, roots[0], keep)) * per_channel
    _replace_constant_input(reader, index, array, "shape")


def concat(b: _Builder, node: ir.Node) -> None:
    out, r = node.outputs[0], _rank(node.outputs[0])
    infos = [b.get(v) for v in node.inputs]
    lead = next((i for v, i in zip(node.inputs, infos) if i is not None and i.axis is not None and constant(v) is None), None)
    if lead is None or r is None:
        return b.touch_unknown(node, "Concat without channel operands")
    axis = node.attributes.get_int("axis", 0) % r
    if axis != lead.axis:
        return broadcast(b, node)  # along another axis: every operand shares the channels
    oi = b.new_space(out, axis)
    keys = []
    for v, i in zip(node.inputs, infos):
        if i is None or constant(v) is not None or i.axis != axis or i.factor != 1:
            b.unsafe(oi.key, f"Concat {node.name!r}: operand {v.name!r} is not a channel tensor")
            if i is not None:
                b.unsafe(i.key, f"Concat {node.name!r} mixes it with non-channel operands")
            return
        keys.append(i.key)
    b.space(oi.key).definitions.append((keys, node.name, 1))


def split(b: _Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    info, r = b.get(x), _rank(x)
    if info is None or info.axis is None or r is None:
        return b.touch_unknown(node)
    axis = node.attributes.get_int("axis", 0) % r
    if axis != info.axis:
        for o in node.outputs:
            b.same(node, x, o)
        return
    if info.factor != 1:
        return b.touch_unknown(node, "Split of flattened channels")
    keys = [b.new_space(o, axis).key for o in node.outputs]
    b.space(info.key).definitions.append((keys, node.name, 1))
    b.fixups.append((_fix_split, keys, node))


def _fix_split(analysis, keep, roots, node: ir.Node) -> None:
    sizes = np.array([len(keep_index(analysis, k, keep)) for k in roots], dtype=np.int64)
    if "split" in node.attributes:
        node.attributes["split"] = ir.AttrInt64s("split", [int(s) for s in sizes])
        return
    node.attributes.pop("num_outputs", None)
    _replace_constant_input(node, 1, sizes, "split")


def shape(b: _Builder, node: ir.Node) -> None:
    info, r = b.get(node.inputs[0]), _rank(node.inputs[0])
    start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", r or 0)
    if info is not None and info.axis is not None and r is not None:
        lo, hi = start % r if start < 0 else start, end % r if end < 0 else min(end, r)
        if not lo <= info.axis < hi:
            b.new_space(node.outputs[0], None, "shape tensor")
            return
    b.touch_unknown(node, "Shape of a channel tensor")


def unknown(b: _Builder, node: ir.Node) -> None:
    b.touch_unknown(node)


RULES = {
    "Conv": conv, "ConvTranspose": conv_transpose, "Gemm": gemm, "MatMul": matmul,
    "BatchNormalization": batch_norm, "InstanceNormalization": instance_norm,
    "LayerNormalization": layer_norm,
    "Resize": resize, "Upsample": resize, "Pad": pad, "Slice": slice_,
    "Squeeze": squeeze, "Unsqueeze": unsqueeze, "Transpose": transpose,
    "Softmax": softmax, "LogSoftmax": softmax, "Flatten": flatten, "Reshape": reshape,
    "Concat": concat, "Split": split, "Shape": shape, "PRelu": broadcast,
    **{op: unary for op in UNARY}, **{op: broadcast for op in BINARY},
    **{op: pool for op in POOLS}, **{op: reduce for op in REDUCE},
}

#: ORT contrib ops that slimgraph's fusions emit (fuse_activations): elementwise, with an
#: optional per-channel bias on the last axis
CONTRIB_RULES = {
    ("com.microsoft", "QuickGelu"): unary, ("com.microsoft", "Gelu"): unary,
    ("com.microsoft", "FastGelu"): broadcast, ("com.microsoft", "BiasGelu"): broadcast,
}
