"""FP8 (e4m3) W8A8 matmul for the CPU from the weight's fp8 bytes, a small C++ kernel built on
first use.

torch has no fast CPU path from fp8 (``Tensor.to``, ``torch._scaled_mm`` and oneDNN's fp8
``qlinear_pointwise`` convert elementwise, 5-60x slower than the fp32 matmul). The kernel widens
four weight rows at a time to fp32 by bit manipulation (exact) into a buffer that stays in L1
and multiplies them there by every activation row, so memory traffic is one byte per weight:
faster than the fp32 matmul at decode, with the weights kept fp8 in memory.

Built by ``cpu_build`` on first use; where it cannot be built, ``load()`` returns None and the
caller keeps its pure-torch path. ``PAGEDSERVE_CPU_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Optional

import torch

from pagedserve_kernels.cpu_build import build, simd_flags


@functools.cache
def load() -> Optional[ModuleType]:
    """The compiled extension, or None where it cannot be built (or PAGEDSERVE_CPU_KERNEL=0)."""
    flags = ["-O3", "-fopenmp", *simd_flags(avx512=True)]
    return build("pagedserve_cpu_fp8_gemm", "fp8_gemm.cpp", flags, "CPU fp8 GEMM kernel")


def fp8_scaled_mm(
    x: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """fp32 [M, N] = sum over the G groups of K of ``x_scale[m, g] * w_scale[n, g] * (x_g .
    w_g)``, for x [M, K] fp32 (the activations' fp8 values, unscaled), x_scale [1 or M, G],
    qweight [N, K] float8_e4m3fn and w_scale [N, G] (fp32 accumulation; the weight's values are
    exact). Raises RuntimeError when the kernel is not available."""
    module = load()
    if module is None:
        raise RuntimeError("the CPU fp8 GEMM kernel could not be built")
    return module.fp8_scaled_mm(
        x.float().contiguous(), x_scale.float().contiguous(),
        qweight.contiguous().view(torch.uint8), w_scale.float().contiguous(),
    )


def main() -> None:
    """``python -m pagedserve_kernels.cpu_fp8_gemm``: builds the kernel now."""
    logging.basicConfig(level=logging.INFO)
    print("CPU fp8 GEMM kernel:", "ready" if load() is not None else "unavailable (see warning)")


if __name__ == "__main__":
    main()
