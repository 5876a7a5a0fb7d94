"""Decides whether a layer runs our kernels or its pure-torch reference.

Triton kernels run for CUDA tensors when Triton is importable, unless
``PAGEDSERVE_DISABLE_KERNELS=1`` (used to compare the two paths). On the CPU, the small
per-layer ops (norms, rotary, SiLU-and-mul, the KV-cache write: ``small_ops_for``) run in C++
(``pagedserve_kernels.cpu_ops``) when it is built, unless ``PAGEDSERVE_CPU_KERNEL=0``; every
other op runs its torch reference there (``ops_for`` returns None for CPU tensors).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Optional

import torch


@functools.cache
def _load_ops() -> Optional[ModuleType]:
    if os.environ.get("PAGEDSERVE_DISABLE_KERNELS", "0") == "1":
        return None
    try:
        from pagedserve_kernels import ops
    except ImportError:
        return None
    return ops


@functools.cache
def _load_cpu_ops() -> Optional[ModuleType]:
    from pagedserve_kernels import cpu_ops

    return cpu_ops if cpu_ops.load() is not None else None


def ops_for(x: torch.Tensor) -> Optional[ModuleType]:
    """The kernel ops module when ``x`` should take the kernel path, else None."""
    if not x.is_cuda:
        return None
    return _load_ops()


def small_ops_for(x: torch.Tensor) -> Optional[ModuleType]:
    """The module of the small per-layer ops (``rms_norm``, ``fused_add_rms_norm``,
    ``rotary_embedding``, ``silu_and_mul``, ``reshape_and_cache``, with the reference's
    signatures) for ``x``: the Triton ops on CUDA, the C++ ops on the CPU, else None."""
    if x.is_cuda:
        return _load_ops()
    if x.is_cpu:
        return _load_cpu_ops()
    return None
