"""Chooses the attention backend named by ``EngineArgs.attention_backend``.

Asking for a backend that cannot run here is an error that says what is missing, never a silent
fallback to another backend: numbers measured with one backend must not come from another.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from pagedserve.attention.base import AttentionBackend
from pagedserve.attention.layer import fp8_cache_name
from pagedserve.config import ATTENTION_BACKENDS
from pagedserve_kernels.reference import is_fp8


def _missing_module(module: str) -> Optional[str]:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"the python package {module!r} is not installed"


def triton_unusable(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    missing = _missing_module("triton")
    if missing:
        return missing
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return ("Triton kernels need a CUDA device; on the CPU they only run in the interpreter "
                "(set TRITON_INTERPRET=1 before triton is imported; slow, for tests)")
    return f"Triton kernels do not support device type {device.type!r}"


def _needs_cuda(name: str, device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"{name} runs only on CUDA devices, not {device.type!r}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def _fp8_unsupported(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``backend`` cannot serve an fp8 KV cache of ``dtype`` on ``device``, or None."""
    if backend in ("flash_attn", "flashinfer"):
        # Their fp8 paths (scales, kernels) have never run here: not installed on our machines.
        return ("this backend's fp8 KV cache is not supported by pagedserve; use "
                "attention_backend 'triton' (CUDA) or 'torch'")
    if (backend == "triton" and device.type == "cuda" and dtype == torch.float8_e4m3fn
            and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) < (8, 9)):
        return ("Triton has no e4m3 type before compute capability 8.9 (Ada, Hopper); "
                "use kv_cache_dtype 'fp8_e5m2' on this GPU")
    return None


def resolve_backend_name(name: str, device: torch.device) -> str:
    """The concrete backend ``name`` stands for on ``device`` ("auto" resolved)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention_backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    if name != "auto":
        return name
    if device.type == "cuda" and triton_unusable(device) is None:
        return "triton"
    return "torch"


def get_attention_backend(
    name: str,
    device: torch.device,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    block_size: int,
    kv_cache_dtype: Optional[torch.dtype] = None,
) -> AttentionBackend:
    """Builds the backend ``name`` ("auto", "torch", "triton", "flash_attn", "flashinfer").

    "auto" is "triton" on CUDA when Triton is installed, else "torch". Raises ValueError when the
    named backend is unknown, not installed, or cannot serve this device/shape, or an fp8
    ``kv_cache_dtype`` (None: the model's dtype).
    """
    device = torch.device(device)
    resolved = resolve_backend_name(name, device)
    if kv_cache_dtype is not None and is_fp8(kv_cache_dtype):
        reason = _fp8_unsupported(resolved, device, kv_cache_dtype)
        if reason:
            raise ValueError(f"kv_cache_dtype {fp8_cache_name(kv_cache_dtype)!r} with "
                             f"attention_backend {resolved!r}: {reason}")
    args = (num_heads, num_kv_heads, head_dim, scale, block_size)
    if resolved == "torch":
        from pagedserve.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(*args)
    if resolved == "triton":
        reason = triton_unusable(device)
        if reason:
            raise ValueError(f"attention_backend 'triton' is not usable: {reason}")
        from pagedserve.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(*args)
    if resolved == "flash_attn":
        reason = _needs_cuda("flash_attn", device) or _missing_module("flash_attn")
        if reason:
            raise ValueError(f"attention_backend 'flash_attn' is not usable: {reason} "
                             "(pip install flash-attn)")
        from pagedserve.attention.flash_attn_backend import FlashAttnBackend

        return FlashAttnBackend(*args)
    reason = _needs_cuda("flashinfer", device) or _missing_module("flashinfer")
    if reason:
        raise ValueError(f"attention_backend 'flashinfer' is not usable: {reason} "
                         "(pip install flashinfer-python)")
    from pagedserve.attention.flashinfer_backend import FlashInferBackend

    return FlashInferBackend(*args)
