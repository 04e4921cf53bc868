"""simplify: algebraic no-op and redundancy removal with onnxscript's rewrite rules (exact).

Rules (all from onnxscript's common rule library, applied as one rewrite pass):
1. no-ops: x+0, x-0, x*1, x/1, Dropout in inference, Cast to the same type, Expand or
   Transpose that changes nothing, ScatterND that rewrites the whole tensor;
2. chains: Cast∘Cast, Reshape∘Reshape, Transpose∘Transpose, Unsqueeze∘Unsqueeze,
   Relu∘Relu, Clip∘Relu, Min/Max chains to Clip, Slice chains to one Slice (not
   Slice pairs to Split: that rule's matcher is quadratic in the graph size);
3. shapes: a Reshape whose target shape is computable becomes a constant shape; an Expand
   before a broadcasting binary op is dropped; Cast(ConstantOfShape) folds the type;
4. Conv/Gemm with an all-zero optional bias lose it; Pad folded into Conv's pads.
Rules that reduce an op to a no-op leave an Identity; those are removed at once.
Each rule checks its own preconditions (types, shapes, constant values) and does not
fire when it cannot prove the rewrite exact.
"""

from __future__ import annotations

from onnxscript.rewriter import RewritePass, RewriteRule
from onnxscript.rewriter.rules.common import (
    _basic_rules,
    _cast_constant_of_shape,
    _collapse_slices,
    _fuse_pad_into_conv,
    _fuse_relus_clips,
    _materialize_reshape_shape,
    _min_max_to_clip,
    _no_op,
    _redundant_scatter_nd,
    _remove_expand_before_binary_op,
    _remove_optional_bias,
)

from slimgraph.passes.base import Pass, PassResult, register_pass
from slimgraph.passes.cleanup._onnx_ir import run_ir_pass
from slimgraph.passes.cleanup.eliminate_identity import remove_identities


def _dropout_default(op, x):
    # Dropout with no training_mode input runs in inference mode (onnxscript's own rule
    # needs the input spelled out, which exporters omit).
    return op.Dropout(x)


def _identity(op, x, **_):
    return op.Identity(x)


def _rules() -> list:
    sets = [
        _no_op.rules, _basic_rules.basic_optimization_rules(), _collapse_slices.rules,
        _redundant_scatter_nd.rules, _min_max_to_clip.rules, _fuse_relus_clips.rules,
        _materialize_reshape_shape.rules, _remove_optional_bias.rules, _cast_constant_of_shape.rules,
        _remove_expand_before_binary_op.expand_before_binary_op_rules, _fuse_pad_into_conv.rules,
    ]
    rules = [RewriteRule(_dropout_default, _identity)]
    for s in sets:
        rules.extend(getattr(s, "rules", s))
    # Patterns with several output nodes (Slice pairs -> Split) are matched by trying every
    # pair of nodes in the graph: 230 s on a 10,000-node model. Left out.
    return [r for r in rules if r._target_pattern.has_single_output_node]


def _root_op(rule) -> tuple[str, str] | None:
    op = rule._target_pattern.output_nodes[0].op_identifier()
    return None if op is None else (op[0], op[1])


@register_pass
class Simplify(Pass):
    """Remove algebraic no-ops and collapse redundant op chains (exact)."""

    name = "simplify"

    def run(self, model, ctx) -> PassResult:
        nodes = list(model.nodes(recursive=True))
        before = len(nodes)
        present = {(n.domain, n.op_type) for n in nodes}
        # onnxscript tries every rule on every node (~50 us a try); a rule whose root op is
        # absent cannot match, so only the others are handed over.
        rules = [r for r in _rules() if _root_op(r) is None or _root_op(r) in present]
        if not rules:
            return PassResult(model, modified=False, stats={"nodes_removed": 0})
        result = run_ir_pass(RewritePass(rules), model)
        remove_identities(model)
        removed = before - len(list(model.nodes(recursive=True)))
        # onnxscript's RewritePass can report no change for rewrites of subgraphs; the node
        # count says otherwise, and the fixed point depends on a truthful flag.
        result.modified = result.modified or removed != 0
        result.stats["nodes_removed"] = removed
        return result
