"""Does this CPU's u8s8 integer GEMM saturate? (the no-VNNI problem, see `static.py`)

ONNX Runtime's x86 kernels for uint8 activations x int8 weights (MLAS, SSE4.1 / AVX2 /
AVX-512BW without VNNI) multiply with `pmaddubsw`, which adds each pair of adjacent u8*s8
products into a *saturating* int16: 255 * 127 * 2 = 64770 does not fit in 32767. With
VNNI (`vpdpbusd`, AVX512-VNNI or AVX-VNNI) the products are summed in int32 and nothing
saturates; ARM's kernels widen too. Depthwise convolutions run in their own kernel that
widens to int16 before multiplying, so they never saturate either.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

logger = logging.getLogger("slimgraph.passes.quantize")

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The flags of /proc/cpuinfo's first processor, or None where there is no such file."""
    path = Path("/proc/cpuinfo")
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def u8s8_saturates(machine: str | None = None, flags: frozenset[str] | None = None) -> bool:
    """True when ORT's u8s8 GEMM on this CPU may saturate: x86 without VNNI. An x86 CPU
    whose flags cannot be read counts as saturating (the safe answer)."""
    machine = (machine or platform.machine()).lower()
    if machine not in X86:
        return False
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        logger.info("cannot read CPU flags; assuming no VNNI (7-bit weights for u8s8 kernels)")
        return True
    return not (flags & VNNI_FLAGS)
