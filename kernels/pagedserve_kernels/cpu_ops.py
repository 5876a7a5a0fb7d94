"""The small per-layer ops on the CPU (RMSNorm, fused add + RMSNorm, rotary, SiLU-and-mul, the
KV-cache write), one small C++ kernel each, built on first use.

Each pure-torch reference chains several small torch ops of a few microseconds each; at one
token that overhead, not arithmetic, is most of a small model's forward (a draft model's
proposal steps). The C++ ops make one pass over their rows, with the reference's numerics
(fp32 arithmetic, rounded to bf16/fp16 where the reference rounds).

The functions have the signatures of ``pagedserve_kernels.reference``'s and fall back to it per
call for what the C++ does not cover: tensors off the CPU or needing gradients, dtypes other
than float32/bfloat16/float16, mixed dtypes, fp8 KV caches. Built by ``cpu_build``; where it
cannot be built (or ``PAGEDSERVE_CPU_KERNEL=0``), ``load()`` returns None and every function
runs the reference.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Optional

import torch

from pagedserve_kernels import reference
from pagedserve_kernels.cpu_build import build, simd_flags

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def load() -> Optional[ModuleType]:
    """The compiled extension, or None where it cannot be built (or PAGEDSERVE_CPU_KERNEL=0)."""
    # No contraction into FMAs: fp32 results round like the reference's separate ops. No
    # trapping math: without it GCC keeps float compares as branches, and SiLU's loop (exp
    # included) would not vectorize; nothing here reads the FP exception flags.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", *simd_flags()]
    return build("pagedserve_cpu_small_ops", "small_ops.cpp", flags, "CPU small ops")


def _kernel_takes(x: torch.Tensor) -> Optional[ModuleType]:
    """The extension when it serves ``x`` (a CPU float tensor outside autograd), else None."""
    if x.is_cpu and x.dtype in _FLOATS and not x.requires_grad:
        return load()
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``reference.rms_norm``."""
    module = _kernel_takes(x)
    if module is None or weight.dtype != x.dtype or weight.requires_grad:
        return reference.rms_norm(x, weight, eps)
    return module.rms_norm(x, weight, float(eps))


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.fused_add_rms_norm``: new (normed, x + residual); the inputs are unchanged."""
    module = _kernel_takes(x)
    if (module is None or weight.dtype != x.dtype or residual.dtype != x.dtype
            or weight.requires_grad or residual.requires_grad):
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    return module.fused_add_rms_norm(x, residual, weight, float(eps))


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.rotary_embedding`` (NeoX style): new rotated (query, key)."""
    module = _kernel_takes(query)
    if module is None or key.dtype != query.dtype or key.requires_grad:
        return reference.rotary_embedding(positions, query, key, cos_sin_cache)
    return module.rotary_embedding(positions, query, key, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``reference.silu_and_mul``."""
    module = _kernel_takes(x)
    if module is None:
        return reference.silu_and_mul(x)
    return module.silu_and_mul(x)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    all_valid: bool = False,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """``reference.reshape_and_cache`` for a model-dtype cache (rows with slot -1 skipped
    either way, so ``all_valid`` only spares the reference a check); an fp8 cache goes to the
    reference, which quantizes with the scales."""
    module = _kernel_takes(key)
    if module is None or kv_cache.dtype != key.dtype or value.dtype != key.dtype:
        reference.reshape_and_cache(key, value, kv_cache, slot_mapping, all_valid, k_scale,
                                    v_scale)
        return
    module.reshape_and_cache(key, value, kv_cache, slot_mapping)


def main() -> None:
    """``python -m pagedserve_kernels.cpu_ops``: builds the kernels now (setup does this, so
    that no request waits for the compiler)."""
    logging.basicConfig(level=logging.INFO)
    print("CPU small ops:", "ready" if load() is not None else "unavailable (see warning)")


if __name__ == "__main__":
    main()
