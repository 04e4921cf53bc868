"""Fusion passes: exact pattern rewrites (BatchNorm folding, Gemm forming, activations)."""

from slimgraph.passes.fuse import (  # noqa: F401  (registration side effect)
    fold_batchnorm,
    fuse_activations,
    fuse_conv_bias,
    fuse_layernorm,
    matmul_add_to_gemm,
)
