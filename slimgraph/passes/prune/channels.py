"""Channel-coupling analysis for structured pruning: which channels must go together.

Every activation tensor that carries channels is given a *space* (its channel axis: axis 1
for NCHW and [N, C] tensors, the last axis for MatMul activations). Ops couple spaces:

1. producers create channels: Conv (weight axis 0, bias), ConvTranspose (weight axis 1,
   bias), Gemm (B's N axis, C), MatMul with a constant 2-D weight (weight axis 1);
2. consumers read them: Conv (weight axis 1, group 1), ConvTranspose (weight axis 0),
   Gemm/MatMul (the weight's K axis); a depthwise Conv (group == C, multiplier 1) joins its
   input and output spaces and slices weight axis 0 and bias (its `group` follows);
3. pass-through ops keep the channel index: BatchNormalization (slices its four
   parameters), unary elementwise ops, pools, Resize with scale 1 on N and C, Pad, Slice,
   Reduce*, Squeeze/Unsqueeze and Softmax that leave the channel axis alone; Transpose
   moves the channel axis;
4. binary elementwise ops join the spaces of their activation operands (residual Add,
   SiLU, squeeze-excite gates); a constant operand broadcast along the channels is sliced,
   a scalar (or size-1) one is left alone;
5. Concat along the channel axis: the output space is the concatenation of the inputs'
   (a composite); Split along it, or Slices that tile it: the input space is the
   concatenation of the outputs';
6. Flatten, or a Reshape provably equal to it ([N, C, ...] -> [N, C*H*W]): channel c owns
   entries [c*HW, (c+1)*HW) of the flattened axis (a `factor` of HW);
7. attention heads: a Reshape splitting the channels into [H, D] makes the projection's
   space a composite of H heads of D channels (a `unit` of D); a MatMul of two activations
   joins the head axes of its operands (a batch axis of both); the Reshape folding the
   heads back gives the output projection's input a factor of D.

Anything else that touches a channel axis (graph inputs and outputs, a reduction or
Softmax over channels, a MatMul of two activations over their channels, unknown ops and
ops with subgraphs, shapes that cannot be inferred, shared weights) makes the space
*unsafe*, with a reason. Decisions are taken per
leaf space (a `Group`); composite spaces map them through their segments' offsets. A group
is prunable only when it is safe and at least one producer's weight defines it.

`analyze(model)` never modifies the model; `apply(model, keep)` slices it in place.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir
from networkx.utils import UnionFind

from slimgraph.ir.model import Model

logger = logging.getLogger("slimgraph.passes.prune")

# --- op tables ---------------------------------------------------------------------------------
UNARY = frozenset({
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "PRelu", "Tanh", "Gelu",
    "Erf", "Neg", "Abs", "Identity", "Cast", "CastLike", "Dropout", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "Exp", "Log", "Sqrt", "Reciprocal", "Sin", "Cos", "Floor",
    "Ceil", "Round", "Sign", "ThresholdedRelu", "Not", "IsNaN", "IsInf", "Swish",
})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "Where",
                    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or"})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
                   "GlobalLpPool"})
REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                    "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"})
#: ops that read nothing (their outputs are constants)
CONSTANT_OPS = frozenset({"Constant"})
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


# --- records ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Slice:
    """One axis of a constant tensor indexed by a channel space."""

    value: ir.Value
    axis: int
    node: str
    #: producer (its weight creates the channels), consumer (reads them) or param
    role: str
    #: each channel owns `factor` consecutive entries along `axis` (Flatten -> Gemm)
    factor: int = 1


@dataclasses.dataclass
class _Info:
    """The channel space of one activation value."""

    key: str
    axis: int | None
    factor: int = 1


@dataclasses.dataclass
class _Space:
    size: int | None = None
    reasons: list[str] = dataclasses.field(default_factory=list)
    slices: list[Slice] = dataclasses.field(default_factory=list)
    #: (child spaces, why, unit): this space is the concatenation of the children, each
    #: child channel standing for `unit` consecutive channels here (attention heads)
    definitions: list[tuple[list[str], str, int]] = dataclasses.field(default_factory=list)
    #: (start, end, key, node name) of Slices cutting this space into pieces along its axis
    pieces: list[tuple[int, int, str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Group:
    """A leaf channel space: channels pruned together."""

    id: int
    size: int
    safe: bool
    reason: str
    producers: list[str]
    consumers: list[str]
    #: (slice, offset of this group inside the slice's space)
    slices: list[tuple[Slice, int]] = dataclasses.field(repr=False, default_factory=list)
    #: (name, channel axis, factor) of activation values whose channels are this group's
    values: list[tuple[str, int, int]] = dataclasses.field(repr=False, default_factory=list)
    #: the fewest entries a channel of the group owns in any of its tensors: 1, or the head
    #: size for attention heads
    unit: int = 1
    units: list[int] = dataclasses.field(repr=False, default_factory=list)

    def weight_rows(self) -> Iterator[tuple[Slice, np.ndarray]]:
        """Each weight slice of the group as a [size, -1] matrix: row c holds every entry
        of channel c in that tensor."""
        for (s, offset), unit in zip(self.slices, self.units or [1] * len(self.slices)):
            moved = np.moveaxis(_constant(s.value), s.axis, 0)
            # group channel j owns entries [(offset + j*unit) * factor, (offset + (j+1)*unit) * factor)
            part = moved[offset * s.factor:(offset + self.size * unit) * s.factor]
            yield s, np.asarray(part.reshape(self.size, -1), dtype=np.float64)


@dataclasses.dataclass
class ChannelAnalysis:
    """The result of `analyze`."""

    groups: list[Group]
    #: Conv/Gemm/MatMul/ConvTranspose node -> (input group id, output group id), None
    #: where the channels are not prunable
    layer_groups: dict[str, tuple[int | None, int | None]]
    _spaces: dict[str, _Space] = dataclasses.field(repr=False, default_factory=dict)
    _leaves: dict[str, list[tuple[str, int]]] = dataclasses.field(repr=False, default_factory=dict)
    _group_of_leaf: dict[str, int] = dataclasses.field(repr=False, default_factory=dict)
    _fixups: list[tuple] = dataclasses.field(repr=False, default_factory=list)
    #: weight node -> (input space, output space, depthwise?) for MAC estimates
    layer_spaces: dict[str, tuple[str | None, str | None, bool]] = dataclasses.field(repr=False, default_factory=dict)
    #: the unit of each segment of `_leaves[root]` (1 but for attention heads)
    _units: dict[str, list[int]] = dataclasses.field(repr=False, default_factory=dict)
    #: activation value -> (space, channel axis, factor)
    _values: dict[str, tuple[str, int, int]] = dataclasses.field(repr=False, default_factory=dict)

    def safe_groups(self) -> list[Group]:
        return [g for g in self.groups if g.safe]

    def unsafe_reasons(self) -> list[str]:
        return [f"group {g.id} ({g.size} ch, {', '.join(g.producers[:2]) or 'no producer'}): {g.reason}"
                for g in self.groups if not g.safe]

    def apply(self, model: Model, keep: dict[int, np.ndarray]) -> None:
        """Slice `model` in place to the kept channel indices of each group (groups not in
        `keep` keep all their channels). See `apply`."""
        apply(model, self, keep)


# --- the analysis ----------------------------------------------------------------------------
def _constant(value: ir.Value | None) -> np.ndarray | None:
    """A constant's array: an initializer (not a graph input) or a Constant node's output."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    p = value.producer()
    if p is None or p.op_type != "Constant" or len(p.attributes) != 1:
        return None
    (name, attr), = p.attributes.items()
    if name == "value":
        return attr.value.numpy()
    kinds = {"value_int": np.int64, "value_ints": np.int64, "value_float": np.float32, "value_floats": np.float32}
    return np.asarray(attr.value, dtype=kinds[name]) if name in kinds else None


def _dims(value: ir.Value | None) -> tuple | None:
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


class _Builder:
    """Walks the graph once in order, giving each activation value a channel space."""

    def __init__(self, model: Model):
        self.model = model
        self.uf = UnionFind()
        self.spaces: dict[str, _Space] = {}
        self.info: dict[str, _Info] = {}
        self.fixups: list[tuple] = []
        # unnamed nodes are named as the "macs" analysis names them
        self.names = {n: n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.nodes(recursive=True))}
        self._n = 0

    # spaces
    def new_space(self, value: ir.Value, axis: int | None, reason: str = "", factor: int = 1) -> _Info:
        self._n += 1
        key = f"s{self._n}"
        self.uf[key]
        dims = _dims(value)
        size = None
        if axis is not None and dims is not None and axis < len(dims) and dims[axis] is not None:
            size = dims[axis] // factor
        self.spaces[key] = _Space(size=size, reasons=[reason] if reason else [])
        info = _Info(key, axis, factor)
        self.info[value.name] = info
        return info

    def space(self, key: str) -> _Space:
        return self.spaces[key]

    def unsafe(self, key: str, reason: str) -> None:
        self.spaces[key].reasons.append(reason)

    def join(self, a: str, b: str) -> None:
        self.uf.union(a, b)

    def get(self, value: ir.Value | None) -> _Info | None:
        if value is None:
            return None
        return self.info.get(value.name)

    def slice(self, info: _Info, value: ir.Value | None, axis: int, node: ir.Node, role: str, factor: int = 1) -> None:
        if value is None:
            return
        if _constant(value) is None:
            self.unsafe(info.key, f"{node.op_type} {node.name!r}: its {role} tensor {value.name!r} is not a constant")
            return
        self.spaces[info.key].slices.append(Slice(value, axis, self.names[node], role, factor))

    def same(self, node: ir.Node, src: ir.Value, out: ir.Value, axis: int | None = None) -> None:
        """out has the channel space of src (at `axis` if the op moves it)."""
        info = self.get(src)
        if info is None:
            self.touch_unknown(node)
            return
        self.info[out.name] = _Info(info.key, info.axis if axis is None else axis, info.factor)

    def touch_unknown(self, node: ir.Node, why: str = "") -> None:
        reason = f"{why or 'not understood'}: {node.op_type} {node.name!r}"
        for v in node.inputs:
            info = self.get(v)
            if info is not None:
                self.unsafe(info.key, reason)
        for v in node.outputs:
            self.new_space(v, None, reason)


def analyze(model: Model) -> ChannelAnalysis:
    """The channel groups of `model` and how to slice them (see the module docstring). The
    model is not modified; values need shapes (run shape inference first)."""
    from slimgraph.passes.prune import _rules

    b = _Builder(model)
    graph = model.graph
    for v in graph.inputs:
        b.new_space(v, 1 if (_dims(v) or ()) and len(_dims(v)) >= 2 else None, f"graph input {v.name!r}")
    for node in graph:
        if node.op_type in CONSTANT_OPS and node.domain in ("", "ai.onnx"):
            continue
        if node.domain not in ("", "ai.onnx"):
            rule = _rules.CONTRIB_RULES.get((node.domain, node.op_type))
            rule(b, node) if rule is not None else b.touch_unknown(node, "custom-domain op")
            continue
        for sub in node.attributes.values():
            if sub.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                _touch_subgraphs(b, node)
                break
        else:
            if node.inputs and all(v is None or _constant(v) is not None for v in node.inputs):
                for v in node.outputs:  # computes a constant (not folded): no channels of ours
                    b.new_space(v, None, f"computed from constants by {node.name!r}")
                continue
            rule = _rules.RULES.get(node.op_type, _rules.unknown)
            rule(b, node)
    for v in graph.outputs:
        info = b.get(v)
        if info is not None:
            b.unsafe(info.key, f"graph output {v.name!r}")
    _check_weight_sharing(b)
    return _finish(model, b)


def _touch_subgraphs(b: _Builder, node: ir.Node) -> None:
    """An op with subgraphs (If, Loop, Scan) is not understood: its inputs, the outer
    values its subgraphs read, and its outputs are unsafe."""
    b.touch_unknown(node, "op with a subgraph")
    reason = f"read inside the subgraph of {node.op_type} {node.name!r}"
    for attr in node.attributes.values():
        if attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            continue
        for graph in [attr.value] if attr.type == ir.AttributeType.GRAPH else attr.value:
            for inner in ir.traversal.RecursiveGraphIterator(graph):
                for v in inner.inputs:
                    info = b.get(v)
                    if info is not None:
                        b.unsafe(info.key, reason)


def _check_weight_sharing(b: _Builder) -> None:
    """A constant sliced for one space but read by nodes the analysis did not account for
    (another layer sharing the weight, or the same tensor tied to two spaces) is unsafe."""
    users: dict[int, set[str]] = {}
    holders: dict[int, list[tuple[str, Slice]]] = {}
    for key, sp in b.spaces.items():
        for s in sp.slices:
            users.setdefault(id(s.value), set()).add(s.node)
            holders.setdefault(id(s.value), []).append((key, s))
    for vid, items in holders.items():
        value = items[0][1].value
        readers = {b.names.get(use.node, use.node.name) for use in value.uses()}
        roots_per_axis: dict[int, set[str]] = {}
        for k, s in items:
            roots_per_axis.setdefault(s.axis, set()).add(b.uf[k])
        if readers - users[vid]:
            reason = f"tensor {value.name!r} is shared with {sorted(readers - users[vid])[:2]}"
        elif any(len(r) > 1 for r in roots_per_axis.values()):
            reason = f"tensor {value.name!r} is indexed by two channel spaces"
        else:
            continue
        for k, _ in items:
            b.unsafe(k, reason)


def _finish(model: Model, b: _Builder) -> ChannelAnalysis:
    # merge spaces per union-find class
    merged: dict[str, _Space] = {}
    for key, sp in b.spaces.items():
        root = b.uf[key]
        m = merged.setdefault(root, _Space())
        if sp.size is not None:
            if m.size is None:
                m.size = sp.size
            elif m.size != sp.size:
                m.reasons.append(f"channel counts disagree ({m.size} vs {sp.size})")
        m.reasons += sp.reasons
        m.slices += sp.slices
        m.definitions += [([b.uf[c] for c in children], why, unit) for children, why, unit in sp.definitions]
        m.pieces += sp.pieces
    for root, m in merged.items():
        _pieces_to_definition(root, m, merged, b)
    # composite spaces: resolve each into (leaf, offset, unit) segments
    segments: dict[str, list[tuple[str, int, int]]] = {}

    values_of: dict[str, list[tuple[str, int, int]]] = {}
    for name, info in b.info.items():
        if info.axis is not None:
            values_of.setdefault(b.uf[info.key], []).append((name, info.axis, info.factor))

    def resolve(root: str, depth: int = 0) -> list[tuple[str, int, int]]:
        if root in segments:
            return segments[root]
        sp = merged[root]
        if not sp.definitions or depth > 64:
            segments[root] = [(root, 0, 1)]
            return segments[root]
        options = []
        for children, _, unit in sp.definitions:
            segs, offset = [], 0
            for c in children:
                for leaf, off, u in resolve(c, depth + 1):
                    segs.append((leaf, offset + off * unit, u * unit))
                offset += (merged[c].size or 0) * unit
            options.append(segs)
        first = options[0]
        if any(o != first for o in options[1:]):
            sp.reasons.append("channels are split two incompatible ways")
            for o in options:
                for leaf, _, _ in o:
                    merged[leaf].reasons.append("part of a space split two incompatible ways")
        segments[root] = first
        return first

    for root in merged:
        resolve(root)
    # a composite's size is the sum of its segments
    for root, segs in segments.items():
        if segs != [(root, 0, 1)]:
            total = sum((merged[leaf].size or 0) * u for leaf, _, u in segs)
            if merged[root].size is not None and merged[root].size != total:
                merged[root].reasons.append(f"concatenated sizes {total} != {merged[root].size}")
    # attach every slice and reason to the leaves it covers
    leaf_slices: dict[str, list[tuple[Slice, int, int]]] = {}
    leaf_reasons: dict[str, list[str]] = {}
    for root, sp in merged.items():
        for leaf, off, unit in segments[root]:
            leaf_slices.setdefault(leaf, []).extend((s, off, unit) for s in sp.slices)
            leaf_reasons.setdefault(leaf, []).extend(sp.reasons)
    leaves = {root: [(leaf, off) for leaf, off, _ in segs] for root, segs in segments.items()}
    units = {root: [u for _, _, u in segs] for root, segs in segments.items()}
    groups: list[Group] = []
    group_of_leaf: dict[str, int] = {}
    leaf_roots = sorted({leaf for segs in leaves.values() for leaf, _ in segs}, key=lambda k: int(k[1:]))
    for leaf in leaf_roots:
        sp = merged[leaf]
        slices = leaf_slices.get(leaf, [])
        if not slices and not values_of.get(leaf):
            continue  # shape tensors and other values without a channel axis
        reasons = list(dict.fromkeys(leaf_reasons.get(leaf, [])))
        producers = list(dict.fromkeys(s.node for s, _, _ in slices if s.role == "producer"))
        consumers = list(dict.fromkeys(s.node for s, _, _ in slices if s.role == "consumer"))
        if sp.size is None:
            reasons.append("channel count unknown (no static shape)")
        elif not producers:
            reasons.append("no weight defines these channels")
        gid = len(groups)
        group_of_leaf[leaf] = gid
        groups.append(Group(
            gid, sp.size or 0, not reasons, "; ".join(reasons[:3]), producers, consumers,
            [(s, off) for s, off, _ in slices], values_of.get(leaf, []),
            unit=min((u * s.factor for s, _, u in slices), default=1), units=[u for _, _, u in slices],
        ))
    layer_groups = _layer_groups(b, groups, leaves, group_of_leaf)
    fixups = [(f[0], [b.uf[k] for k in f[1]], *f[2:]) for f in b.fixups]
    spaces = {}
    for node in model.graph:
        if node.op_type in WEIGHT_OPS and not node.domain:
            ins, outs = b.get(node.inputs[0]), b.get(node.outputs[0])
            root_in = b.uf[ins.key] if ins is not None else None
            root_out = b.uf[outs.key] if outs is not None else None
            spaces[b.names[node]] = (root_in, root_out, root_in is not None and root_in == root_out)
    values = {name: (b.uf[i.key], i.axis, i.factor) for name, i in b.info.items() if i.axis is not None}
    return ChannelAnalysis(groups, layer_groups, merged, leaves, group_of_leaf, fixups, spaces, units, values)


def _pieces_to_definition(root: str, sp: _Space, merged: dict[str, _Space], b: _Builder) -> None:
    """Slices that tile a space exactly ([0, a), [a, b), ... [z, C)) define it as the
    concatenation of their outputs; any other set of Slices makes every part unsafe."""
    if not sp.pieces:
        return
    pieces = sorted((start, end, b.uf[key], node) for start, end, key, node in sp.pieces)
    bounds = [(start, end) for start, end, _, _ in pieces]
    tiled = sp.size is not None and bounds[0][0] == 0 and bounds[-1][1] == sp.size and all(
        a[1] == c[0] for a, c in zip(bounds, bounds[1:]))
    if tiled:
        sp.definitions.append(([key for _, _, key, _ in pieces], "Slice", 1))
        return
    reason = f"Slices {sorted({node for *_, node in pieces})[:3]} do not tile the channels exactly"
    sp.reasons.append(reason)
    for _, _, key, _ in pieces:
        merged[key].reasons.append(reason)


def _layer_groups(b, groups, leaves, group_of_leaf) -> dict[str, tuple[int | None, int | None]]:
    def gid(value: ir.Value | None) -> int | None:
        info = b.get(value)
        if info is None:
            return None
        segs = leaves.get(b.uf[info.key], [])
        if len(segs) != 1:
            return None  # a composite space: several groups
        gid_ = group_of_leaf.get(segs[0][0])
        return gid_ if gid_ is not None and groups[gid_].safe else None

    out = {}
    for node in b.model.graph:
        if node.op_type in WEIGHT_OPS and not node.domain:
            out[b.names[node]] = (gid(node.inputs[0]), gid(node.outputs[0]))
    return out


# --- applying decisions -------------------------------------------------------------------------
def keep_index(analysis: ChannelAnalysis, root: str, keep: dict[int, np.ndarray]) -> np.ndarray:
    """Kept channel indices of a (possibly composite) space, in its own numbering."""
    parts = []
    units = analysis._units.get(root) or [1] * len(analysis._leaves[root])
    for (leaf, offset), unit in zip(analysis._leaves[root], units):
        if leaf not in analysis._group_of_leaf:
            parts.append(np.arange((analysis._spaces[leaf].size or 0) * unit) + offset)
            continue
        g = analysis.groups[analysis._group_of_leaf[leaf]]
        k = keep.get(g.id)
        idx = np.arange(g.size) if k is None or not g.safe else np.sort(np.asarray(k, dtype=np.int64))
        parts.append(_expand(idx, unit) + offset)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _touched(analysis: ChannelAnalysis, root: str, keep: dict[int, np.ndarray]) -> bool:
    return any(analysis._group_of_leaf.get(leaf) in keep for leaf, _ in analysis._leaves[root])


def _expand(index: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return index
    return (index[:, None] * factor + np.arange(factor)[None, :]).ravel()


def _set_constant(value: ir.Value, array: np.ndarray) -> None:
    producer = value.producer()
    tensor = ir.tensor(array, name=value.name)
    if producer is not None and producer.op_type == "Constant":
        producer.attributes.clear()
        producer.attributes["value"] = ir.AttrTensor("value", tensor)
    value.const_value = tensor
    value.shape = ir.Shape(array.shape)


def apply(model: Model, analysis: ChannelAnalysis, keep: dict[int, np.ndarray]) -> None:
    """Slice every constant tied to each group to the kept channels `keep[group id]`
    (indices; sorted here), update Split sizes, Reshape targets and depthwise `group`s,
    re-infer shapes, and check the model. `model` must be the one `analysis` was computed
    on; it is modified in place. Unsafe groups and groups not in `keep` are left whole."""
    for gid, k in keep.items():
        g = analysis.groups[gid]
        k = np.asarray(k)
        if not g.safe:
            raise ValueError(f"group {gid} is not safe to prune: {g.reason}")
        if len(k) == 0 or len(np.unique(k)) != len(k) or k.min() < 0 or k.max() >= g.size:
            raise ValueError(f"group {gid}: keep indices must be distinct, non-empty and in [0, {g.size})")
    done: set[tuple[int, int]] = set()  # (tensor, axis): a weight is cut on its in and out axes
    for root, sp in analysis._spaces.items():
        if not _touched(analysis, root, keep):
            continue  # nothing of this space is cut (its size may not even be known)
        index = keep_index(analysis, root, keep)
        for s in sp.slices:
            if (id(s.value), s.axis) in done:
                continue
            done.add((id(s.value), s.axis))
            array = _constant(s.value)
            _set_constant(s.value, np.take(array, _expand(index, s.factor), axis=s.axis))
    for fix in analysis._fixups:
        if any(_touched(analysis, root, keep) for root in fix[1]):
            fix[0](analysis, keep, *fix[1:])
    _refresh_shapes(model, analysis, keep)


def _refresh_shapes(model: Model, analysis: ChannelAnalysis, keep: dict[int, np.ndarray]) -> None:
    """Set the channel dim of every value of a cut space (ONNX shape inference stops at
    contrib ops, so it is not left to re-derive them), infer the rest and check."""
    from onnx_ir.passes.common import CheckerPass, ShapeInferencePass

    values = {v.name: v for node in model.graph for v in node.outputs}
    for name, (root, axis, factor) in analysis._values.items():
        v = values.get(name)
        if v is None or v.shape is None or axis >= len(v.shape) or not _touched(analysis, root, keep):
            continue
        dims = list(v.shape.dims)
        dims[axis] = len(keep_index(analysis, root, keep)) * factor
        v.shape = ir.Shape(dims)
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model.ir)
    CheckerPass(full_check=False)(model.ir)


def space_size(analysis: ChannelAnalysis, root: str | None, counts: dict[int, int]) -> tuple[int, int] | None:
    """(kept, total) channels of a space when each group `g` keeps `counts[g]` channels."""
    if root is None or root not in analysis._leaves:
        return None
    kept = total = 0
    units = analysis._units.get(root) or [1] * len(analysis._leaves[root])
    for (leaf, _), unit in zip(analysis._leaves[root], units):
        if leaf not in analysis._group_of_leaf:
            return None
        g = analysis.groups[analysis._group_of_leaf[leaf]]
        total += g.size * unit
        kept += (counts.get(g.id, g.size) if g.safe else g.size) * unit
    return kept, total


def estimate_macs(analysis: ChannelAnalysis, macs: dict[str, int], counts: dict[int, int]) -> float:
    """Model MACs after keeping `counts[g]` channels per group: each layer's MACs scale
    with its kept input and output fractions (only the output one for depthwise)."""
    total = 0.0
    for name, m in macs.items():
        root_in, root_out, depthwise = analysis.layer_spaces.get(name, (None, None, False))
        frac = 1.0
        for root in ((root_out,) if depthwise else (root_in, root_out)):
            kt = space_size(analysis, root, counts)
            if kt and kt[1]:
                frac *= kt[0] / kt[1]
        total += m * frac
    return total
