"""Fusion passes: exact pattern rewrites (BatchNorm folding, Gemm forming, activations)."""
