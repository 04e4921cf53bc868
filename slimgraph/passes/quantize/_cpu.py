"""Does this CPU's u8s8 integer GEMM saturate? (the no-VNNI problem, see `static.py`)

ONNX Runtime's x86 kernels for uint8 activations x int8 weights (MLAS, SSE4.1 / AVX2 /
AVX-512BW without VNNI) multiply with `pmaddubsw`, which adds each pair of adjacent u8*s8
products into a *saturating* int16: 255 * 127 * 2 = 64770 does not fit in 32767. With
VNNI (`vpdpbusd`, AVX512-VNNI or AVX-VNNI) the products are summed in int32 and nothing
saturates; ARM's kernels widen too. Depthwise convolutions run in their own kernel that
widens to int16 before multiplying, so they never saturate either.

The CPU itself is read once, by `slimgraph.backends.runtime_check.cpu_info` (the same
facts `slimgraph inspect --runtime` reports); this module only answers the question.
"""

from __future__ import annotations

import functools
import logging

from slimgraph.backends.runtime_check import CpuInfo, cpu_info

logger = logging.getLogger("slimgraph.passes.quantize")


@functools.lru_cache(maxsize=1)
def _this_cpu() -> CpuInfo:
    return cpu_info()


def u8s8_saturates(machine: str | None = None, flags: frozenset[str] | None = None) -> bool:
    """True when ORT's u8s8 GEMM on this CPU may saturate: x86 without VNNI. An x86 CPU
    whose flags cannot be read counts as saturating (the safe answer)."""
    cpu = _this_cpu()
    if machine is not None or flags is not None:
        cpu = CpuInfo(machine or cpu.arch, cpu.flags if flags is None else flags)
    if not cpu.x86:
        return False
    if cpu.vnni is None:
        logger.info("cannot read CPU flags; assuming no VNNI (7-bit weights for u8s8 kernels)")
        return True
    return not cpu.vnni


def auto_weight_bits(node, *, weight_dtype: str = "int8", target: str = "cpu") -> int:
    """The one rule for `weight_bits="auto"`, shared by quantize.static and the passes that
    simulate it (bias correction, sensitivity): 7 bits where ORT's u8s8 GEMM may saturate
    (int8 weights on an x86 CPU without VNNI, target "cpu"), except depthwise convolutions
    (their kernel widens first); 8 otherwise."""
    from slimgraph.passes.quantize._ops import is_depthwise

    if weight_dtype == "uint8" or target != "cpu" or is_depthwise(node) or not u8s8_saturates():
        return 8
    return 7
