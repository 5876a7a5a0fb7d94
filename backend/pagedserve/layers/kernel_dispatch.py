"""Decides whether a layer runs our Triton kernels or its pure-torch reference.

Kernels run for CUDA tensors when Triton is importable, unless ``PAGEDSERVE_DISABLE_KERNELS=1``
(used to compare the two paths). On the CPU the torch references run: they are what the CPU
engine uses and what the kernel tests compare against.
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


def ops_for(x: torch.Tensor) -> Optional[ModuleType]:
    """The kernel ops module when ``x`` should take the kernel path, else None."""
    if not x.is_cuda:
        return None
    return _load_ops()
