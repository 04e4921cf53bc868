"""fuse_conv_bias: Conv(x, W, B) + c -> Conv(x, W, B + c) (exact).

Exporters that keep the bias apart (TF/Keras converters, hand-built graphs) add it after
the convolution. A constant c folds into the bias when it is the same for every batch
item and position, i.e. when right-aligned against the output [N, M, d1, ...] its shape is
1 everywhere except possibly M on the channel axis: [M, 1, 1], [1, M, 1, 1], [1], a
scalar. A c of shape [M] is not per-channel (it runs along the last spatial axis) and a c
of higher rank than the output would broadcast it: both are skipped with the reason. Also
for ConvTranspose. The bias is a new initializer, so a bias shared with another node is
left intact for it.

Exact: B + c is one float addition done ahead of time; outputs change by float rounding
only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.passes.base import register_pass
from slimgraph.passes.rewrite import Rule, RulePass, constant, not_constant, static_dims


def _channels(conv: ir.Node, w_shape: tuple[int, ...]) -> int:
    return w_shape[0] if conv.op_type == "Conv" else w_shape[1] * conv.attributes.get_int("group", 1)


def _plan(conv_out: ir.Value, c: ir.Value):
    """(conv node, new bias) or why c does not fold into the bias."""
    conv = conv_out.producer()
    w_shape, add = static_dims(conv.inputs[1]), constant(c)
    if add is None:
        return not_constant(c, "added value")
    if w_shape is None or len(w_shape) < 3:
        return "weight shape is not known"
    out_rank, channels = len(w_shape), _channels(conv, w_shape)
    if add.ndim > out_rank:
        return "added constant would broadcast the output to a higher rank"
    full = (1,) * (out_rank - add.ndim) + add.shape
    if full[0] != 1 or any(d != 1 for d in full[2:]) or full[1] not in (1, channels):
        return "added constant is not per-channel"
    bias = np.zeros(channels, add.dtype)
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        bias = constant(conv.inputs[2])
        if bias is None:
            return "bias is not a constant"
    new_bias = bias.astype(np.float64) + np.broadcast_to(add.reshape(-1).astype(np.float64), (channels,))
    return conv, new_bias.astype(add.dtype)


def _rule(op_type: str) -> Rule:
    def pattern(op, x, c):
        conv_out = getattr(op, op_type)(x, _allow_other_inputs=True, _outputs=["conv_out"])
        return op.Add(conv_out, c)

    def check(m, x, c, conv_out):
        plan = _plan(conv_out, c)
        return plan if isinstance(plan, str) else None

    def rewrite(op, x, c, conv_out):
        conv, bias = _plan(conv_out, c)
        return getattr(op, op_type)(
            x, conv.inputs[1], op.initializer(bias, f"{conv.inputs[1].name}_bias"), **conv.attributes
        )

    return Rule(f"fuse_{op_type.lower()}_bias", pattern, rewrite, check, commute=True)


@register_pass
class FuseConvBias(RulePass):
    """Fold a constant per-channel Add after Conv/ConvTranspose into its bias (exact)."""

    name = "fuse_conv_bias"

    def rules(self, model):
        return [_rule("Conv"), _rule("ConvTranspose")]
