"""quantize.weight_only: 4-bit (or 8-bit) blocked weights, float activations (lossy).

Weights are cut into blocks of `block_size` consecutive values along the reduction axis,
each block with its own float scale and (unless `symmetric`) its own integer zero point:

    w ≈ (q - z) * s,   q in [0, 2^bits - 1]

1. MatMul(A, W) / Gemm (W constant [K, N], or [N, K] with transB; a foldable bias is
   folded) -> `com.microsoft.MatMulNBits(A, B, scales, zero_points, bias)`, blocks along
   K. B is [N, K / block_size, block_size * bits / 8] uint8, two 4-bit values per byte,
   low nibble first; zero points are packed the same way per column, [N, ceil(blocks *
   bits / 8)]; symmetric weights carry no zero points (ORT's default, 2^(bits-1)).
   `accuracy_level` is MatMulNBits' attribute (4: ORT quantizes A to int8 per block and
   runs an integer kernel where it has one).
2. Gather(table [V, D], ids) with a constant table (`embeddings`, on by default: in a
   small transformer the word embedding is half the weights) ->
   `com.microsoft.GatherBlockQuantized(data uint4/uint8 [V, D], ids, scales [V, D /
   block_size], zero_points)`, blocks along D, rows gathered then dequantized.
   (ORT 1.32 has the op for int4/uint4/uint8 data on CPU; the alternative, an int4
   initializer -> blocked DequantizeLinear -> Gather, is constant-folded by ORT back
   to a float table at session start: the file is small, the session as large as float.)

How codes are chosen (`method`):

- `rtn`: round to nearest with the block's min/max range (symmetric: max |w|).
- `hqq`: half-quadratic optimization (Badri & Shaji, HQQ 2023): starting from RTN, it
  alternates (a) codes q = clip(round(w / s + z)), (b) the sparse error e =
  shrink_p(w - (q - z) s) of an L_p (p = 0.7) loss, through a generalized soft
  threshold, and (c) the zero point that best explains w - e: z = mean(q - (w - e) / s);
  `hqq_iters` rounds, keeping the best. Then, codes fixed, scale and zero point are
  refit by least squares per block (the zero rounded to an integer first). Data-free;
  it lowers the weight error of every block (never raises it: a block keeps RTN's codes
  when HQQ does not help), most for the blocks with outliers.

Errors (`PassError`, naming the layer): a block size that does not divide the layer's K
(or an embedding's D), unless the layer is excluded. Lossy: the reported error is the
weight error of 4-bit blocks; activations stay float.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_ir as ir
import pydantic

from slimgraph.errors import PassError
from slimgraph.passes import contracts
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, float_range, int_range, register_pass
from slimgraph.passes.quantize._weights import MS_DOMAIN, Embedding, GraphEditor, Linear, find_gathers, find_linears

logger = logging.getLogger("slimgraph.passes.quantize.weight_only")

OP_TYPES = ("MatMul", "Gemm", "Gather")
#: L_p exponent and penalty schedule of HQQ's proximal step (the paper's defaults).
HQQ_P, HQQ_BETA, HQQ_KAPPA = 0.7, 10.0, 1.01


# --- packing ------------------------------------------------------------------------------------
def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [..., n] -> bytes [..., ceil(n * bits / 8)], low bits first."""
    q = np.asarray(q, np.uint8)
    if bits == 8:
        return q.copy()
    if bits != 4:
        raise ValueError(f"packing {bits}-bit codes is not supported")
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack`: bytes -> the first `n` codes along the last axis."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :n].copy()
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :n]


# --- block quantization --------------------------------------------------------------------------
def quantize_blocks(blocks: np.ndarray, *, bits: int, symmetric: bool, method: str = "rtn",
                    iters: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks [..., B] of float weights -> (codes uint8 [..., B] in [0, 2^bits - 1],
    scale float32 [...], zero point uint8 [...]); w ≈ (codes - zero) * scale."""
    w = blocks.astype(np.float32)
    qmax = (1 << bits) - 1
    scale, zero = _group_params(w.astype(np.float64), bits, symmetric)  # symmetric int4: -7..7 around 8
    scale, zero = scale.astype(np.float32), zero.astype(np.float32)
    if method == "hqq":
        scale, zero = _hqq(w, scale, zero, qmax, symmetric, iters)
    elif method != "rtn":
        raise ValueError(f"unknown method {method!r}")
    codes = np.clip(np.round(w / scale[..., None] + zero[..., None]), 0, qmax)
    return codes.astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8)


def _group_params(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """RTN scale and zero point of each row of w [..., B] (float64)."""
    qmax = (1 << bits) - 1
    if symmetric:
        bound = np.abs(w).max(axis=-1)
        scale = np.where(bound > 0, bound / ((1 << (bits - 1)) - 1), 1.0)
        return scale, np.full(scale.shape, float(1 << (bits - 1)))
    lo, hi = np.minimum(w.min(axis=-1), 0.0), np.maximum(w.max(axis=-1), 0.0)
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0)
    return scale, np.clip(np.round(-lo / scale), 0, qmax)


def inverse_hessian_factor(hessian: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor of the damped H^-1, mask of dead inputs) for GPTQ: inputs that
    never fire get H = 1 on the diagonal (their weights are zeroed by the caller)."""
    H = hessian.astype(np.float64).copy()
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices(len(H))] += damp * np.mean(np.diag(H))
    hinv = np.linalg.inv(np.linalg.cholesky(H))
    return np.linalg.cholesky(hinv.T @ hinv).T, dead


def gptq(w: np.ndarray, hessian: np.ndarray, *, bits: int, block_size: int, symmetric: bool,
         damp: float = 0.01, keep_zeros: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al., 2022) for a layer x @ w, w [K, N], with H = E[x x^T] [K, K]:
    the inputs k are quantized in order; each one's rounding error, weighted by the
    inverse Hessian, is pushed onto the inputs not yet quantized, so that the layer's
    *output* error on the calibration data is what is minimized. Group (block) parameters
    come from the updated weights when the group starts. Returns the `quantize_blocks`
    triple for blocks [N, K / block_size, block_size].

    `keep_zeros` (after pruning): an exact zero of `w` is coded as its block's zero point
    (dequantized to exactly 0) whatever the updates pushed onto it, and the update it had
    absorbed is pushed on like any rounding error (as SparseGPT does with its mask), so the
    pruned pattern survives."""
    k, n = w.shape
    pruned = (w.T == 0) if keep_zeros else None
    qmax = (1 << bits) - 1
    W = w.T.astype(np.float64).copy()  # [N, K]
    U, dead = inverse_hessian_factor(hessian, damp)
    W[:, dead] = 0.0
    codes = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, k // block_size))
    zeros = np.zeros((n, k // block_size))
    lazy = max(block_size, 128 // block_size * block_size)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1, E1, U1 = W[:, i1:i2].copy(), np.zeros((n, i2 - i1)), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block_size == 0:
                g = col // block_size
                scales[:, g], zeros[:, g] = _group_params(W1[:, i:i + block_size], bits, symmetric)
            g = col // block_size
            q = np.clip(np.round(W1[:, i] / scales[:, g] + zeros[:, g]), 0, qmax)
            if pruned is not None:
                q = np.where(pruned[:, col], np.round(zeros[:, g]), q)
            codes[:, col] = q
            err = (W1[:, i] - (q - zeros[:, g]) * scales[:, g]) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return (codes.reshape(n, k // block_size, block_size), scales.astype(np.float32), zeros.astype(np.uint8))


def dequantize_blocks(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return ((codes.astype(np.float32) - zero[..., None].astype(np.float32)) * scale[..., None]).astype(np.float32)


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Generalized soft threshold: the proximal operator of |x|^p / beta."""
    a = np.abs(x)
    with np.errstate(divide="ignore"):
        return np.sign(x) * np.maximum(a - np.where(a > 0, a ** (p - 1), 0.0) / beta, 0.0)


def _hqq(w, scale, zero, qmax, symmetric, iters):
    """HQQ's proximal zero-point search, then a least-squares refit per block; a block
    keeps whichever of RTN and the result has the smaller squared error."""
    def error(s, z):
        q = np.clip(np.round(w / s[..., None] + z[..., None]), 0, qmax)
        return ((w - (q - z[..., None]) * s[..., None]) ** 2).sum(axis=-1), q

    rtn_scale, rtn_zero = scale, zero
    best_err, _ = error(scale, zero)
    z = zero.copy()
    beta = HQQ_BETA
    if not symmetric:
        best_z = z.copy()
        for _ in range(iters):
            q = np.clip(np.round(w / scale[..., None] + z[..., None]), 0, qmax)
            e = _shrink(w - (q - z[..., None]) * scale[..., None], beta, HQQ_P)
            z = np.mean(q - (w - e) / scale[..., None], axis=-1)
            beta *= HQQ_KAPPA
            err, _ = error(scale, np.clip(np.round(z), 0, qmax))
            better = err < best_err
            best_err, best_z = np.where(better, err, best_err), np.where(better, z, best_z)
        z = np.clip(np.round(best_z), 0, qmax)
    # Least squares: codes fixed, w ≈ s * (q - z) with z an integer -> s = <w, q-z> / |q-z|^2.
    _, q = error(scale, z)
    d = q - z[..., None]
    norm = (d * d).sum(axis=-1)
    refit = np.where(norm > 0, (w * d).sum(axis=-1) / np.where(norm > 0, norm, 1.0), scale)
    refit = np.where(refit > 0, refit, scale)
    err_refit, _ = error(refit, z)
    keep_rtn = err_refit >= error(rtn_scale, rtn_zero)[0]
    return np.where(keep_rtn, rtn_scale, refit), np.where(keep_rtn, rtn_zero, z)


@register_pass
class QuantizeWeightOnly(Pass):
    """Weight-only 4-bit: MatMulNBits for MatMul/Gemm, GatherBlockQuantized for embeddings (lossy)."""

    name = "quantize.weight_only"
    exact = False
    # 2: GPTQ keeps pruned zeros when a sparsity contract exists; 3: 8-bit after pruning passes
    # the sparsity check (cached failures of that pair are stale)
    version = 3
    after = ("cleanup", "fuse", "optimize", "fold_*", "fuse_*", "matmul_add_to_gemm", "prune*", "cluster*",
             "infer_shapes", "quantize.smoothquant", "quantize.equalize")

    class Config(PassConfig):
        bits: int = choice(4, 8, default=4)
        #: weights per block (along K for MatMul, along D for embeddings)
        block_size: int = choice(16, 32, 64, 128, 256, default=32)
        #: no zero points (codes centred on 2^(bits-1)) or one zero point per block
        symmetric: bool = choice(False, True, default=False)
        #: auto: gptq with sample data, else hqq; rtn: round to nearest (see module docstring)
        method: str = choice("auto", "gptq", "hqq", "rtn", default="auto")
        hqq_iters: int = int_range(1, 100, default=20)
        #: GPTQ: calibration samples (the first ones of the data) and Hessian dampening
        samples: int = int_range(1, 100_000, default=128, log=True)
        damp: float = float_range(1e-4, 1.0, default=0.01, log=True)
        #: which ops to quantize (Gather: embedding tables)
        op_types: tuple[str, ...] = ("MatMul", "Gemm", "Gather")
        #: MatMulNBits accuracy_level: 0 float A, 4 int8 A per block
        accuracy_level: int = choice(0, 1, 2, 3, 4, default=0)
        #: fnmatch patterns of node names, output names, torch module paths or weight names
        exclude: tuple[str, ...] = ()
        #: weights smaller than this stay float
        min_weight_elements: int = int_range(0, 1 << 20, default=4096, log=True)

        @pydantic.field_validator("op_types")
        @classmethod
        def _known_ops(cls, v):
            unknown = sorted(set(v) - set(OP_TYPES))
            if unknown:
                raise ValueError(f"unknown op types {unknown}; quantize.weight_only handles {list(OP_TYPES)}")
            return tuple(v)

    #: Passes whose contract this one always breaks (the search's order DAG never proposes
    #: the pair): per-block scales cannot hold a k-means codebook. Pruned zeros are kept
    #: (exactly 0 is the zero point; GPTQ keeps them, see `gptq`).
    incompatible_after = ("cluster.kmeans",)

    def run(self, model, ctx) -> PassResult:
        cfg = self.config
        editor = GraphEditor(model, self.name)
        stats: dict = {"matmul": 0, "embedding": 0, "skipped": collections.Counter(), "weight_error": 0.0}
        linears, skipped = find_linears(model, set(cfg.op_types) & {"MatMul", "Gemm"}, cfg.exclude)
        stats["skipped"].update(skipped)
        gathers: list[Embedding] = []
        if "Gather" in cfg.op_types:
            gathers, skipped = find_gathers(model, cfg.exclude)
            stats["skipped"].update(skipped)
        small = lambda w: w.size < cfg.min_weight_elements  # noqa: E731
        stats["skipped"]["weight smaller than min_weight_elements"] += (
            sum(small(lin.weight) for lin in linears) + sum(small(e.table) for e in gathers))
        linears = [lin for lin in linears if not small(lin.weight)]
        gathers = [e for e in gathers if not small(e.table)]
        self._check_blocks(linears, gathers)
        method = cfg.method
        if method == "auto":
            method = "gptq" if ctx.data and linears else "hqq"
        if method == "gptq" and not ctx.data:
            raise PassError(self.name, "method 'gptq' needs sample data (--data D.npz) to measure each layer's "
                                       "inputs; use method 'hqq' or 'rtn' without data")
        stats["method"] = method
        hessians = self._hessians(model, ctx, linears) if method == "gptq" else {}
        # a pruning pass ran: GPTQ must not refill the zeros (the sparsity contract holds them)
        self._keep_zeros = any(kind == "sparsity" for kind, _ in contracts.records(model))
        errors: list[tuple[float, int]] = []
        cache: dict = {}
        for linear in linears:
            errors.append(self._linear(editor, linear, cache, method, hessians.get(linear.activation.name)))
            stats["matmul"] += 1
        for emb in gathers:
            errors.append(self._gather(editor, emb, "rtn" if method == "gptq" else method))
            stats["embedding"] += 1
        stats["weights_dropped"] = editor.drop_unused_weights()
        stats["skipped"] = {k: v for k, v in stats["skipped"].items() if v}
        if errors:
            total = sum(n for _, n in errors)
            stats["weight_error"] = float(np.sqrt(sum(e * n for e, n in errors) / total))
        modified = stats["matmul"] + stats["embedding"] > 0
        if not modified:
            logger.warning("quantize.weight_only found nothing to quantize (%s)", stats["skipped"] or "no candidates")
        return PassResult(model, modified=modified, stats=stats)

    def _check_blocks(self, linears: list[Linear], gathers: list[Embedding]) -> None:
        bs = self.config.block_size
        for lin in linears:
            k, n = lin.shape
            if k % bs:
                raise PassError(self.name, f"layer {lin.name!r} ({lin.node.op_type}, weight "
                                f"{lin.weight_value.name!r} with K={k}, N={n}): block_size {bs} does not divide "
                                f"K; choose a block size that divides {k} ({_divisors(k)}) or exclude the layer")
        for emb in gathers:
            v, d = emb.table.shape
            if d % bs:
                raise PassError(self.name, f"embedding {emb.name!r} (table {emb.table_value.name!r} [{v}, {d}]): "
                                f"block_size {bs} does not divide its width {d}; choose one of {_divisors(d)} or "
                                f"exclude it (or op_types without 'Gather')")

    def _blocks(self, blocks: np.ndarray, method: str):
        cfg = self.config
        return quantize_blocks(blocks, bits=cfg.bits, symmetric=cfg.symmetric, method=method, iters=cfg.hqq_iters)

    def _hessians(self, model, ctx, linears: list[Linear]) -> dict[str, np.ndarray]:
        """E[x x^T] of each layer input over the first `samples` samples (the float model)."""
        from slimgraph import data as sg_data
        from slimgraph.passes.quantize.observers import stream

        sizes = {lin.activation.name: lin.shape[0] for lin in linears}
        inputs = {v.name for v in model.graph.inputs}
        names = [name for name in sizes if name not in inputs]
        data = {k: v[: self.config.samples] for k, v in ctx.data.items() if k in sg_data.input_ranks(model)}
        sums = {name: np.zeros((k, k)) for name, k in sizes.items()}
        rows = dict.fromkeys(sizes, 0)
        for _, feeds, outputs in stream(model, data, names, progress=ctx.progress, description="GPTQ: layer inputs",
                                        where=self.name):
            for name, k in sizes.items():
                x = (outputs[name] if name in outputs else feeds[name]).reshape(-1, k).astype(np.float64)
                sums[name] += x.T @ x
                rows[name] += len(x)
        return {name: total / max(rows[name], 1) for name, total in sums.items()}

    def _linear(self, editor: GraphEditor, lin: Linear, cache: dict, method: str,
                hessian: np.ndarray | None) -> tuple[float, int]:
        cfg = self.config
        k, n = lin.shape
        bs, bits = cfg.block_size, cfg.bits
        key = (lin.weight_value, lin.node.op_type, lin.node.attributes.get_int("transB", 0),
               lin.node.attributes.get_float("alpha", 1.0))
        if key not in cache:
            blocks = np.ascontiguousarray(lin.weight.T).reshape(n, k // bs, bs)
            if method == "gptq":
                codes, scale, zero = gptq(lin.weight, hessian, bits=bits, block_size=bs, symmetric=cfg.symmetric,
                                          damp=cfg.damp, keep_zeros=self._keep_zeros)
            else:
                codes, scale, zero = self._blocks(blocks, method)
            err = float(((dequantize_blocks(codes, scale, zero) - blocks) ** 2).mean())
            base = lin.weight_value.name or lin.name
            values = [
                editor.initializer(pack(codes, bits), f"{base}_q{bits}"),
                editor.initializer(scale.reshape(-1), f"{base}_scales"),
                None if cfg.symmetric else editor.initializer(pack(zero, bits).reshape(-1), f"{base}_zero_points"),
            ]
            cache[key] = (values, err)
        (b, scales, zeros), err = cache[key]
        bias = editor.initializer(lin.bias, f"{lin.name}_bias") if lin.bias is not None else None
        node = editor.node(MS_DOMAIN, "MatMulNBits", [lin.activation, b, scales, zeros, None, bias], source=lin.node,
                           K=k, N=n, bits=bits, block_size=bs, accuracy_level=cfg.accuracy_level)
        editor.replace(lin.nodes, lin.output, [node], node.outputs[0])
        return err, lin.weight.size

    def _gather(self, editor: GraphEditor, emb: Embedding, method: str) -> tuple[float, int]:
        cfg = self.config
        v, d = emb.table.shape
        bs, bits = cfg.block_size, cfg.bits
        blocks = emb.table.reshape(v, d // bs, bs)
        codes, scale, zero = self._blocks(blocks, method)
        err = float(((dequantize_blocks(codes, scale, zero) - blocks) ** 2).mean())
        base = emb.table_value.name or emb.name
        dtype = ir.DataType.UINT4 if bits == 4 else ir.DataType.UINT8
        if cfg.symmetric and bits == 4:
            # GatherBlockQuantized's default zero point is 0 for 4-bit types: signed codes.
            dtype, codes = ir.DataType.INT4, codes.astype(np.int8) - 8
        data = editor.initializer(_typed(codes.reshape(v, d), dtype), f"{base}_q{bits}")
        scales = editor.initializer(scale, f"{base}_scales")
        zeros = None if cfg.symmetric else editor.initializer(_typed(zero, dtype), f"{base}_zero_points")
        node = editor.node(MS_DOMAIN, "GatherBlockQuantized", [data, emb.node.inputs[1], scales, zeros],
                           source=emb.node, bits=bits, block_size=bs, gather_axis=0, quantize_axis=1)
        editor.replace([emb.node], emb.node.outputs[0], [node], node.outputs[0])
        return err, emb.table.size


def _typed(codes: np.ndarray, dtype: ir.DataType) -> ir.Tensor:
    import ml_dtypes

    np_type = {ir.DataType.UINT4: ml_dtypes.uint4, ir.DataType.INT4: ml_dtypes.int4, ir.DataType.UINT8: np.uint8}
    return ir.Tensor(codes.astype(np_type[dtype]), dtype=dtype)


def _divisors(k: int) -> list[int]:
    return [b for b in (16, 32, 64, 128, 256) if k % b == 0] or ["none of 16..256: exclude it"]
