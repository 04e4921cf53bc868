"""quantize.dynamic: int8 weights, activations quantized at run time (lossy).

Every layer with a constant float32 weight becomes an integer matrix product whose
activation is quantized to uint8 per tensor on each run (its range measured on the
batch itself, so no calibration data is needed):

1. MatMul(A, W) and Gemm(A, B, C) (transA=0): W (B transposed when transB=1, times
   alpha) is quantized per output column (`per_channel`, default) or per tensor, and
   the layer becomes `com.microsoft.DynamicQuantizeMatMul(A, Wq, scale, zero_point,
   bias)`. The bias is folded in: a Gemm's C (times beta) when it broadcasts as [N], or
   the constant [N] of an `Add` that is the MatMul's only consumer. Layers reading the
   same activation (attention's Q, K, V) share one `DynamicQuantizeLinear` and each
   become `com.microsoft.MatMulIntegerToFloat(A_q, Wq, a_scale, scale, a_zp, zp, bias)`.
   `format="integer"` writes standard ops instead (`DynamicQuantizeLinear` ->
   `MatMulInteger` -> `Cast` -> `Mul` by a_scale * scale -> `Add` bias), for runtimes
   without ORT's contrib ops; ORT fuses them back into `MatMulIntegerToFloat`.
2. Conv (group 1, constant weight, explicit or VALID padding) as an im2col product:
   `Transpose` to channels-last, one `Slice` per kernel tap (strides as steps,
   dilations as offsets), `Concat` along channels, `DynamicQuantizeMatMul` with the
   weight as a [taps * C, M] matrix, `Transpose` back. ORT's own integer Conv
   (`ConvInteger`, what onnxruntime's quantizer emits) runs 2.8-3.6x *slower* than float
   Conv on x86 without VNNI (measured on magika), while the im2col product runs ~1.4x
   faster than the float Conv, so Conv is lowered this way or not at all. Convs with
   more than `max_conv_taps` kernel taps stay float: the default (7) covers 1-D kernels
   like magika's 5x1 (measured: 1.4x); for 3x3 and larger kernels the gain was not
   measured and each tap is one more copy of the input (`quantize.static` is the path
   for CNNs). Needs opset >= 11 (Slice steps, Pad pads as an input).
3. Gather from a constant [V, D] table (embeddings, `embeddings=True`): the table is
   stored as uint8 with one scale per block of D (`com.microsoft.GatherBlockQuantized`,
   bits=8, zero point 128), 4x smaller; the rows are dequantized after the gather.

Weights: `weight_type="int8"` (ORT's u8s8 kernels, the fastest) or `"uint8"` (u8u8).
On x86 CPUs without AVX-VNNI, ORT's u8s8 kernel multiplies with `vpmaddubsw`, which
adds the products of K-adjacent pairs (rows 2i and 2i+1) into int16 and *saturates* at
32767: two int8 weights of one sign near 127 against uint8 activations near 255
overflow it and the result is silently wrong (on all-MiniLM-L6-v2: mean cosine 0.9958
instead of 0.9982). Cures: `pair_safe` (default): each column's scale is set by its
largest same-sign pair |w[2i]| + |w[2i+1]| (see `pair_bound`), so every pair of |q| sums
to at most 128 and 255 * 128 < 32768, which costs less than one bit; or 7-bit weights
(`reduce_range=True`, ORT's cure); or uint8 weights, which ORT multiplies in 16 bits
without saturation (8-bit precision, ~10-15% slower).

Activations: with sample data in the context and `smooth` > 0, `quantize.smoothquant`
(alpha = `smooth`) runs first, so that the few outlier channels of transformer
activations no longer set the per-tensor scale alone (exact in float). On
all-MiniLM-L6-v2 the per-tensor activation error dominates (weights alone: cosine
0.9996): smoothing with alpha 0.8 lifts the mean cosine from 0.994 to 0.998. Without
data, no smoothing (logged).

Skipped layers (weight computed, excluded by pattern, too small, ...) are counted in
`stats["skipped"]` with their reason. Lossy: the error is that of 8-bit weights plus an
8-bit activation per tensor and per run; outputs of a batch depend (slightly) on the
other samples in it, since the activation range is the batch's.
"""

from __future__ import annotations

import collections
import itertools
import logging

import numpy as np
import onnx_ir as ir
import pydantic

from slimgraph.errors import PassError
from slimgraph.passes import contracts
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, float_range, int_range, register_pass
from slimgraph.passes.quantize._weights import (
    MS_DOMAIN,
    GraphEditor,
    Linear,
    find_gathers,
    find_linears,
    matches,
)
from slimgraph.passes.quantize.qparams import QParams
from slimgraph.passes.rewrite import constant, rank

logger = logging.getLogger("slimgraph.passes.quantize.dynamic")

OP_TYPES = ("MatMul", "Gemm", "Conv")
#: GatherBlockQuantized's block sizes, largest first (powers of two, at least 16).
BLOCK_SIZES = (128, 64, 32, 16)


def pair_bound(w: np.ndarray) -> np.ndarray:
    """Per column of w [K, N]: the largest |w[2i]| + |w[2i+1]| over row pairs of one sign
    (|w| alone where the signs differ or K is odd). Symmetric int8 weights scaled by
    bound / 127 keep every such pair of |q| at most 128 after rounding, so uint8 x int8
    pair sums stay within int16: 255 * 128 = 32640 <= 32767."""
    k = w.shape[0]
    a = np.abs(w)
    bound = a.max(axis=0)
    if k >= 2:
        even, odd = w[0:k - 1:2], w[1:k:2]
        same = np.sign(even) == np.sign(odd)
        pairs = np.where(same, np.abs(even) + np.abs(odd), np.maximum(np.abs(even), np.abs(odd)))
        bound = np.maximum(bound, pairs.max(axis=0))
    return bound


def quantize_weight(w: np.ndarray, *, dtype: str, bits: int, symmetric: bool, per_channel: bool,
                    pair_safe: bool = False) -> tuple[np.ndarray, QParams]:
    """(integer weight, its QParams) for a float weight w [K, N], per column or per tensor.
    `pair_safe` (symmetric int8 only): scales from `pair_bound`, so ORT's u8s8 kernels
    cannot saturate on CPUs without VNNI."""
    if pair_safe:
        if dtype != "int8" or not symmetric:
            raise ValueError("pair_safe applies to symmetric int8 weights only")
        bound = pair_bound(w) if per_channel else pair_bound(w.reshape(-1, 1)).reshape(())
        low, high = -bound, bound
    else:
        low, high = (w.min(axis=0), w.max(axis=0)) if per_channel else (w.min(), w.max())
    qp = QParams.from_range(low, high, dtype=dtype, symmetric=symmetric, bits=bits,
                            axis=1 if per_channel else None)
    return qp.quantize(w), qp


@register_pass
class QuantizeDynamic(Pass):
    """Dynamic int8: MatMul/Gemm/Conv weights to int8, activations quantized per run (lossy)."""

    name = "quantize.dynamic"
    exact = False
    version = 2  # 2: no SmoothQuant on clustered weights (keeps the k-means codebooks)
    after = ("cleanup", "fuse", "optimize", "fold_*", "fuse_*", "matmul_add_to_gemm", "prune*", "cluster*",
             "infer_shapes")
    before = ("quantize.weight_only", "quantize.fp8")
    #: read by the search's order DAG: after cluster.kmeans -> quantize.dynamic, pack.clusters
    #: always breaks the clusters contract (the check no longer finds the classifier's
    #: weight), and without k-means it packs nothing after this pass
    incompatible_before = ("pack.clusters",)

    class Config(PassConfig):
        #: which ops to quantize (Gather tables: see `embeddings`)
        op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
        #: one scale per output column (True) or per weight tensor
        per_channel: bool = choice(True, False, default=True)
        #: weight integer type: uint8 (u8u8 kernels, no saturation) or int8 (u8s8)
        weight_type: str = choice("int8", "uint8", default="int8")
        #: bits of the weight type used (fewer: coarser, but cheaper products)
        weight_bits: int = int_range(4, 8, default=8)
        #: drop one weight bit (ORT's name): 7-bit int8 weights never saturate u8s8 on AVX2
        reduce_range: bool = choice(False, True, default=False)
        #: symmetric weights (zero point at the type's middle) or asymmetric (min/max)
        symmetric: bool = choice(True, False, default=True)
        #: int8: scale each column so no pair of adjacent products can saturate u8s8 (no VNNI)
        pair_safe: bool = choice(True, False, default=True)
        #: fnmatch patterns of node names, torch module paths or weight names to keep float
        exclude: tuple[str, ...] = ()
        #: weights smaller than this (K * N) stay float: not worth a quantize step
        min_weight_elements: int = int_range(0, 1 << 20, default=4096, log=True)
        #: Convs with more kernel taps than this stay float (see module docstring)
        max_conv_taps: int = int_range(1, 49, default=7)
        #: also store Gather tables (embeddings) as 8-bit
        embeddings: bool = choice(False, True, default=False)
        #: com.microsoft.DynamicQuantizeMatMul, or standard MatMulInteger ops
        format: str = choice("contrib", "integer", default="contrib")
        #: with sample data: quantize.smoothquant's alpha, run first (0: off)
        smooth: float = float_range(0.0, 1.0, default=0.8)

        @pydantic.field_validator("op_types")
        @classmethod
        def _known_ops(cls, v):
            unknown = sorted(set(v) - set(OP_TYPES))
            if unknown:
                raise ValueError(f"unknown op types {unknown}; quantize.dynamic handles {list(OP_TYPES)}")
            return tuple(v)

        @pydantic.model_validator(mode="after")
        def _pair_safe_needs_symmetric(self):
            if self.weight_type == "int8" and self.pair_safe and not self.symmetric and not self.reduce_range \
                    and self.weight_bits == 8:
                raise ValueError("pair_safe needs symmetric int8 weights: set symmetric=true, "
                                 "pair_safe=false or reduce_range=true")
            return self

    def run(self, model, ctx) -> PassResult:
        cfg = self.config
        if cfg.format == "integer" and model.opset < 10:
            raise PassError(self.name, f"format='integer' needs opset >= 10 (MatMulInteger); the model has "
                                       f"opset {model.opset}: run upgrade_opset first")
        stats: dict = {"matmul": 0, "conv": 0, "embedding": 0, "skipped": collections.Counter()}
        smoothed = False
        clustered = any(kind == "clusters" for kind, _ in contracts.records(model))
        if cfg.smooth > 0 and ctx.data and clustered:
            # smoothing scales each input channel: every codebook value of an output channel
            # would become a different number, and the clusters contract would break
            stats["smoothquant"] = "skipped: the weights are clustered (cluster.kmeans contract)"
        elif cfg.smooth > 0 and ctx.data:
            from slimgraph.passes.quantize.smoothquant import SmoothQuant

            result = SmoothQuant({"alpha": cfg.smooth})(model, ctx)
            smoothed = result.modified
            stats["smoothquant"] = result.stats
        elif cfg.smooth > 0:
            logger.info("quantize.dynamic: no sample data, so activations are not smoothed")
        editor = GraphEditor(model, self.name)
        linears, skipped = find_linears(model, set(cfg.op_types) & {"MatMul", "Gemm"}, cfg.exclude)
        stats["skipped"].update(skipped)
        small = [lin for lin in linears if lin.weight.size < cfg.min_weight_elements]
        if small:
            stats["skipped"]["weight smaller than min_weight_elements"] += len(small)
            linears = [lin for lin in linears if lin.weight.size >= cfg.min_weight_elements]
        cache: dict = {}
        readers = collections.Counter(lin.activation for lin in linears)
        shared: dict[ir.Value, tuple[ir.Value, ...] | None] = {a: None for a, n in readers.items() if n > 1}
        for linear in linears:
            self._linear(editor, linear, cache, shared)
            stats["matmul"] += 1
        if "Conv" in cfg.op_types:
            for node in [n for n in model.graph if n.op_type == "Conv" and n.domain in ("", "ai.onnx")]:
                reason = self._conv(editor, node)
                if reason is None:
                    stats["conv"] += 1
                else:
                    stats["skipped"][reason] += 1
        if cfg.embeddings:
            gathers, skipped = find_gathers(model, cfg.exclude)
            stats["skipped"].update(skipped)
            for emb in gathers:
                reason = self._gather(editor, emb)
                if reason is None:
                    stats["embedding"] += 1
                else:
                    stats["skipped"][reason] += 1
        stats["weights_dropped"] = editor.drop_unused_weights()
        modified = smoothed or stats["matmul"] + stats["conv"] + stats["embedding"] > 0
        stats["skipped"] = dict(stats["skipped"])
        if not modified:
            logger.warning("quantize.dynamic found nothing to quantize (%s)", stats["skipped"] or "no MatMul/Gemm/Conv")
        return PassResult(model, modified=modified, stats=stats)

    # -- weights ----------------------------------------------------------------------------
    def _weight_params(self):
        cfg = self.config
        bits = cfg.weight_bits - (1 if cfg.reduce_range else 0)
        pair_safe = cfg.pair_safe and cfg.weight_type == "int8" and bits == 8
        return dict(dtype=cfg.weight_type, bits=bits, symmetric=cfg.symmetric, per_channel=cfg.per_channel,
                    pair_safe=pair_safe)

    def _quantized(self, editor: GraphEditor, w: np.ndarray, base: str, cache: dict, key=None):
        """(Wq, scale, zero point) initializers for a [K, N] weight; shared weights stored once."""
        if key is not None and key in cache:
            return cache[key]
        q, qp = quantize_weight(w, **self._weight_params())
        values = (
            editor.initializer(q, f"{base}_quantized"),
            editor.initializer(qp.scale, f"{base}_scale"),
            editor.initializer(qp.zero_point, f"{base}_zero_point"),
        )
        if key is not None:
            cache[key] = values
        return values

    # -- MatMul / Gemm --------------------------------------------------------------------------
    def _linear(self, editor: GraphEditor, linear: Linear, cache: dict, shared: dict) -> None:
        key = (linear.weight_value, linear.node.op_type, linear.node.attributes.get_int("transB", 0),
               linear.node.attributes.get_float("alpha", 1.0))
        wq, scale, zp = self._quantized(editor, linear.weight, linear.weight_value.name or linear.name, cache, key)
        bias = editor.initializer(linear.bias, f"{linear.name}_bias") if linear.bias is not None else None
        nodes, out = self._product(editor, linear.activation, wq, scale, zp, bias, linear.node, shared)
        editor.replace(linear.nodes, linear.output, nodes, out)

    def _product(self, editor: GraphEditor, a: ir.Value, wq, scale, zp, bias, source: ir.Node,
                 shared: dict | None = None):
        """Nodes computing A @ dequantize(Wq) (+ bias); returns (nodes, output value).
        An activation several layers read (attention's Q, K and V) is quantized once:
        one DynamicQuantizeLinear feeding a `MatMulIntegerToFloat` per layer (contrib
        format), where each layer's own DynamicQuantizeMatMul would quantize it again."""
        shared = shared if shared is not None else {}
        new: list[ir.Node] = []
        if a in shared and shared[a] is None:
            dq = editor.node("", "DynamicQuantizeLinear", [a], source=source, num_outputs=3)
            new.append(dq)
            shared[a] = tuple(dq.outputs)
        if self.config.format == "contrib":
            if a in shared:
                a_q, a_scale, a_zp = shared[a]
                node = editor.node(MS_DOMAIN, "MatMulIntegerToFloat", [a_q, wq, a_scale, scale, a_zp, zp, bias],
                                   source=source)
            else:
                node = editor.node(MS_DOMAIN, "DynamicQuantizeMatMul", [a, wq, scale, zp, bias], source=source)
            return new + [node], node.outputs[0]
        if a in shared:
            a_q, a_scale, a_zp = shared[a]
        else:
            dq = editor.node("", "DynamicQuantizeLinear", [a], source=source, num_outputs=3)
            new.append(dq)
            a_q, a_scale, a_zp = dq.outputs
        # The shape ORT's MatMulIntegerToFloat fusion matches: Cast(MatMulInteger) * (a_scale * scale).
        mm = editor.node("", "MatMulInteger", [a_q, wq, a_zp, zp], source=source)
        cast = editor.node("", "Cast", [mm.outputs[0]], source=source, to=int(ir.DataType.FLOAT))
        scales = editor.node("", "Mul", [a_scale, scale], source=source)
        mul = editor.node("", "Mul", [cast.outputs[0], scales.outputs[0]], source=source)
        nodes = [*new, mm, cast, scales, mul]
        if bias is not None:
            nodes.append(editor.node("", "Add", [mul.outputs[0], bias], source=source))
        return nodes, nodes[-1].outputs[0]

    # -- Conv as im2col ---------------------------------------------------------------------------
    def _conv(self, editor: GraphEditor, node: ir.Node) -> str | None:
        """Lower one Conv as im2col + integer product, or say why not."""
        cfg = self.config
        if matches(node, cfg.exclude, node.inputs[1]):
            return "excluded by pattern"
        w = constant(node.inputs[1])
        if w is None:
            return "Conv weight is not a constant"
        if w.dtype != np.float32:
            return f"Conv weight is {w.dtype}, not float32"
        attrs = node.attributes
        if attrs.get_int("group", 1) != 1:
            return "grouped or depthwise Conv"
        spatial = w.ndim - 2
        x_rank = rank(node.inputs[0])
        if x_rank is None:
            return "Conv input rank unknown (run infer_shapes first)"
        if spatial < 1 or x_rank != spatial + 2:
            return "Conv input rank does not match its weight"
        if editor.model.opset < 11:
            return "Conv as im2col needs opset >= 11"
        auto_pad = attrs.get_string("auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):
            return f"Conv auto_pad={auto_pad}"
        m, c = w.shape[:2]
        kernel = list(w.shape[2:])
        taps = int(np.prod(kernel))
        if taps > cfg.max_conv_taps:
            return "Conv kernel has more than max_conv_taps taps"
        if w.size < cfg.min_weight_elements:
            return "weight smaller than min_weight_elements"
        strides = list(attrs.get_ints("strides", [1] * spatial))
        dilations = list(attrs.get_ints("dilations", [1] * spatial))
        pads = list(attrs.get_ints("pads", [0] * 2 * spatial)) if auto_pad == "NOTSET" else [0] * 2 * spatial
        bias = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if len(node.inputs) > 2 and node.inputs[2] is not None and bias is None:
            return "Conv bias is not a constant"

        new: list[ir.Node] = []
        x = node.inputs[0]
        if any(pads):
            pad_values = [0, 0] + pads[:spatial] + [0, 0] + pads[spatial:]
            pad = editor.node("", "Pad", [x, editor.initializer(np.asarray(pad_values, np.int64), "pads")],
                              source=node)
            new.append(pad)
            x = pad.outputs[0]
        to_last = editor.node("", "Transpose", [x], source=node, perm=[0, *range(2, spatial + 2), 1])
        new.append(to_last)
        x = to_last.outputs[0]
        axes = list(range(1, spatial + 1))
        if taps > 1 or any(s != 1 for s in strides):
            columns = []
            for offset in itertools.product(*(range(k) for k in kernel)):
                starts = [o * d for o, d in zip(offset, dilations)]
                # End counted from the back, so dynamic spatial sizes work too.
                ends = [-(k - 1 - o) * d if (k - 1 - o) else np.iinfo(np.int64).max
                        for o, k, d in zip(offset, kernel, dilations)]
                sl = editor.node("", "Slice", [
                    x,
                    editor.initializer(np.asarray(starts, np.int64), "starts"),
                    editor.initializer(np.asarray(ends, np.int64), "ends"),
                    editor.initializer(np.asarray(axes, np.int64), "axes"),
                    editor.initializer(np.asarray(strides, np.int64), "steps"),
                ], source=node)
                new.append(sl)
                columns.append(sl.outputs[0])
            if len(columns) > 1:
                concat = editor.node("", "Concat", columns, source=node, axis=-1)
                new.append(concat)
                x = concat.outputs[0]
            else:
                x = columns[0]
        # Row (tap, channel) of the [taps * C, M] matrix: W[m, c, tap...].
        matrix = np.ascontiguousarray(w.transpose(*range(2, w.ndim), 1, 0).reshape(taps * c, m))
        wq, scale, zp = self._quantized(editor, matrix, node.inputs[1].name or node.name, {})
        b = editor.initializer(bias.astype(np.float32), f"{node.name}_bias") if bias is not None else None
        product, out = self._product(editor, x, wq, scale, zp, b, node)
        new += product
        back = editor.node("", "Transpose", [out], source=node, perm=[0, spatial + 1, *range(1, spatial + 1)])
        new.append(back)
        editor.replace([node], node.outputs[0], new, back.outputs[0])
        return None

    # -- Gather tables -----------------------------------------------------------------------------
    def _gather(self, editor: GraphEditor, emb) -> str | None:
        v, d = emb.table.shape
        block = next((b for b in BLOCK_SIZES if d % b == 0), None)
        if block is None:
            return "embedding width has no power-of-two block size >= 16"
        indices = emb.node.inputs[1]
        if indices is None or indices.dtype not in (ir.DataType.INT64, ir.DataType.INT32, None):
            return "Gather indices are not int32/int64"
        blocks = emb.table.reshape(v, d // block, block)
        bound = np.abs(blocks).max(axis=2)
        scale = np.where(bound > 0, bound / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.round(blocks / scale[..., None]), -127, 127).astype(np.int32) + 128
        data = editor.initializer(q.reshape(v, d).astype(np.uint8), f"{emb.table_value.name}_quantized")
        scales = editor.initializer(scale, f"{emb.table_value.name}_scale")
        node = editor.node(MS_DOMAIN, "GatherBlockQuantized", [data, indices, scales], source=emb.node,
                           bits=8, block_size=block, gather_axis=0, quantize_axis=1)
        editor.replace([emb.node], emb.node.outputs[0], [node], node.outputs[0])
        return None
