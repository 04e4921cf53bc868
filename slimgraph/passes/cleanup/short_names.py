"""short_names: the fewest bytes of graph structure a small model file can have (exact).

In a compressed small model the names, not the weights, can be most of the file: every
tensor name is written where it is produced, where it is read and in its value_info, and
exporters name things like `features.3.0.weight_bn_quantized_values_codebook`. This pass

1. renames every initializer and node output to a short base-36 name (`a`, `b`, ...,
   `a0`, ...), never the graph's inputs and outputs (the model's interface);
2. clears node names (optional in ONNX) and doc strings, and drops attributes set to
   their default in the op's schema (exporters write `ceil_mode=0`, `auto_pad="NOTSET"`);
3. drops the value_info of intermediate tensors and initializers (types and shapes ORT
   infers again at load, or the tensor holds) unless `value_info` is true (while the
   contracts are kept, decoded weights keep theirs: the contract checks find them so);
4. keeps, of the nodes' metadata, only what slimgraph needs to read the file back
   (`slimgraph.pack` marks, updated to the new names) unless `metadata` is "all"; the
   model's recorded contracts (`slimgraph.contracts`) go too unless `contracts` is true.

Run it last: names are what people read in reports, and later passes would need shapes.
"""

from __future__ import annotations

import itertools

import onnx
import onnx_ir as ir

from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, register_pass
from slimgraph.passes.cluster._select import PACK_KEY
from slimgraph.passes.contracts import KEY as CONTRACTS_KEY

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def short_name_stream(taken: set[str]):
    """a, b, ..., z, a0, a1, ...: names starting with a letter, none of them in `taken`."""
    for length in itertools.count(1):
        for first in _DIGITS[10:]:
            for rest in itertools.product(_DIGITS, repeat=length - 1):
                name = first + "".join(rest)
                if name not in taken:
                    yield name


@register_pass
class ShortNames(Pass):
    """Rename internal tensors to short names, drop node names, doc strings and value_info (exact)."""

    name = "short_names"
    preserves = ("macs", "params")
    # after every other pass (fnmatch: names not starting with s, and s-names whose second
    # letter is not h): later passes report by name and need shapes
    after = ("[!s]*", "s[!h]*")

    class Config(PassConfig):
        #: keep the types and shapes of intermediate tensors (value_info)
        value_info: bool = choice(False, True, default=False)
        #: node metadata kept: only slimgraph's pack marks, or all of it
        metadata: str = choice("pack", "all", default="pack")
        #: keep the recorded contracts (facts later `slimgraph run` calls check)
        contracts: bool = choice(True, False, default=True)

    def run(self, model: Model, ctx) -> PassResult:
        cfg = self.config
        graph = model.graph
        interface = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
        names = short_name_stream(interface)
        before = _structure_size(model)
        renamed = 0
        marked = {}
        for node in graph:
            if PACK_KEY in node.metadata_props:
                marked[id(node)] = node.metadata_props[PACK_KEY].split(":", 1)[0]
        for node in graph:  # before shapes are cleared: kernel_shape is checked against them
            for key in _defaulted(node, model.ir.opset_imports.get(node.domain or "", 1)):
                del node.attributes[key]
        for value in list(graph.initializers.values()):
            if value.name not in interface:
                value.name, renamed = next(names), renamed + 1
                if not cfg.value_info:  # the tensor itself says its type and shape
                    value.shape, value.type = None, None
        for node in graph:
            node.name, node.doc_string = "", None
            for out in node.outputs:
                if out.name not in interface:
                    out.name, renamed = next(names), renamed + 1
                    # the contracts find decoded weights by their shape
                    if not cfg.value_info and not (cfg.contracts and id(node) in marked):
                        out.shape, out.type = None, None
            if cfg.metadata == "pack":
                for key in [k for k in node.metadata_props if k != PACK_KEY]:
                    del node.metadata_props[key]
            if id(node) in marked:
                node.metadata_props[PACK_KEY] = f"{marked[id(node)]}:{node.outputs[0].name}"
        graph.doc_string, model.ir.doc_string = None, None
        if not cfg.contracts:
            model.ir.metadata_props.pop(CONTRACTS_KEY, None)
        after = _structure_size(model)
        return PassResult(model, renamed > 0 or after != before,
                          {"renamed": renamed, "structure_bytes": f"{before} -> {after}"})


#: attributes the schema gives no default but whose absence means the same (ONNX: "If not
#: present, the stride defaults to 1 along each spatial axis", etc.): name -> the implied value
#: of each element
_IMPLIED = {"strides": 1, "dilations": 1, "pads": 0}
_SPATIAL = {"Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"}
#: ops whose kernel_shape, when present, must equal the weight's spatial dims (input 1 or 3)
_KERNEL_FROM_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}


def _implied(node: ir.Node) -> list[str]:
    """Spatial attributes of `node` equal to what their absence means."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in _SPATIAL:
        return []
    found = [k for k, a in node.attributes.items() if k in _IMPLIED and all(v == _IMPLIED[k] for v in a.value)]
    widx = _KERNEL_FROM_WEIGHT.get(node.op_type)
    if widx is not None and "kernel_shape" in node.attributes and len(node.inputs) > widx:
        shape = node.inputs[widx].shape
        if shape is not None and shape.is_static() and list(shape)[2:] == list(node.attributes["kernel_shape"].value):
            found.append("kernel_shape")
    return found


def _defaulted(node: ir.Node, opset: int) -> list[str]:
    """Attributes of `node` whose value is its schema's default, or the value their absence
    implies."""
    found = _implied(node)
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return found  # not a registered op (a custom domain): nothing known about defaults
    for key, attr in node.attributes.items():
        spec = schema.attributes.get(key)
        if spec is None or spec.default_value.type == onnx.AttributeProto.UNDEFINED:
            continue
        default = onnx.helper.get_attribute_value(spec.default_value)
        value = attr.value
        if isinstance(default, bytes):
            default = default.decode()
        if isinstance(value, (list, tuple)) or isinstance(default, (list, tuple)):
            both = isinstance(value, (list, tuple)) and isinstance(default, (list, tuple))
            same = both and list(value) == list(default)
        else:
            same = type(value) in (int, float, str) and value == default
        if same and key not in found:
            found.append(key)
    return found


def _structure_size(model: Model) -> int:
    """Serialized bytes of everything but the initializers' data."""
    proto = model.to_proto()
    return proto.ByteSize() - sum(len(t.raw_data) for t in proto.graph.initializer)
