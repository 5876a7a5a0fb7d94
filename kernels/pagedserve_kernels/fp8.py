"""FP8 KV-cache formats as the Triton kernels see them, and the saturating cast to them.

The cast is done in two steps: ``round_to_fp8`` clamps to the format's finite range and rounds
to nearest even on its grid in fp32 arithmetic, after which the conversion to fp8 is exact.
Rounding before the cast keeps one behaviour on every target: Triton's interpreter (3.x)
truncates with round-half-up and drops the carry out of the mantissa (124.6 -> 64 in e5m2),
and GPUs before SM89 have no e4m3 conversion of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Fp8Format:
    """What the cast needs to know of an fp8 format (all constexprs of the kernels)."""

    max_finite: float
    mantissa_bits: int
    min_normal_exp: int  # exponent of the smallest normal number; subnormals share its quantum


FP8_FORMATS = {
    torch.float8_e4m3fn: Fp8Format(448.0, 3, -6),
    torch.float8_e5m2: Fp8Format(57344.0, 2, -14),
}


def fp8_format(dtype: torch.dtype) -> Optional[Fp8Format]:
    """The format of an fp8 cache dtype, None for any other dtype."""
    return FP8_FORMATS.get(dtype)


@triton.jit
def round_to_fp8(x, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    """fp32 ``x`` saturated to [-FP8_MAX, FP8_MAX] and rounded to nearest even on the fp8 grid
    (still fp32, so the cast that follows is exact)."""
    x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    bits = x.to(tl.int32, bitcast=True)
    negative = bits < 0  # the sign bit, so that -0.0 and tiny negatives round to -0.0
    x = tl.abs(x)
    exp = ((bits >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, MIN_EXP)  # below the normal range the quantum stays fixed
    # The grid spacing at x's exponent and its inverse, built as powers of two: exact products.
    quantum = ((exp - MANT_BITS + 127) << 23).to(tl.float32, bitcast=True)
    inv_quantum = ((127 - exp + MANT_BITS) << 23).to(tl.float32, bitcast=True)
    units = x * inv_quantum  # <= 2^(MANT_BITS + 1)
    # Adding and removing 2^23 rounds to an integer, to nearest even (IEEE fp32 add).
    units = (units + 8388608.0) - 8388608.0
    rounded = units * quantum
    return tl.where(negative, -rounded, rounded)
