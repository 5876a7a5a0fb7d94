"""Kernel tests run on CUDA when present, else in Triton's interpreter on the CPU.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it is set here, before any
test module imports ``pagedserve_kernels``; kernel modules imported earlier in the session
(without it) are reloaded so that they pick it up.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

_KERNEL_MODULES = (
    "pagedserve_kernels.attention_common",
    "pagedserve_kernels.attention_unified",
    "pagedserve_kernels.attention_split",
    "pagedserve_kernels.attention",
    "pagedserve_kernels.norm",
    "pagedserve_kernels.rotary",
    "pagedserve_kernels.activation",
    "pagedserve_kernels.cache",
    "pagedserve_kernels.int_gemm",
    "pagedserve_kernels.scaled_gemm",
    "pagedserve_kernels.ops",
)

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in _KERNEL_MODULES:
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.cuda_only`` cases (big shapes, bf16) are skipped in the interpreter."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA only: too slow in the interpreter, or bf16")
    for item in items:
        if "cuda_only" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda_only: runs only when CUDA is available")
