"""The per-layer attention module, and what an fp8 KV cache needs of the checkpoint.

The attention backend is one object shared by every layer (it holds no per-layer state); each
decoder layer owns an ``Attention`` module that holds that layer's KV-cache scales and calls the
backend with them. An fp8 cache stores ``x / scale`` and is read as ``x * scale`` (vLLM's
convention): the scales are 1.0 unless the checkpoint carries ``k_scale``/``v_scale`` tensors,
as llm-compressor writes them with a compressed-tensors ``kv_cache_scheme``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch
from torch import nn

from pagedserve.attention.base import AttentionBackend, AttentionMetadata
from pagedserve.attention.torch_backend import kv_cache_writer
from pagedserve_kernels import cpu_ops

logger = logging.getLogger(__name__)

# EngineConfig.kv_cache_dtype (fp8 names canonical) -> the cache tensor's dtype.
_FP8_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the KV cache is allocated in: an fp8 format, else the model's dtype."""
    return _FP8_CACHE_DTYPES.get(name, model_dtype)


def kv_cache_block_bytes(num_kv_heads: int, head_dim: int, num_layers: int, block_size: int,
                        dtype: torch.dtype) -> int:
    """Bytes of one block of a model's paged KV cache (K and V, every layer)."""
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * block_size * num_kv_heads * head_dim * element * num_layers


def allocate_kv_caches(num_kv_heads: int, head_dim: int, num_layers: int, num_blocks: int,
                       block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[torch.Tensor]:
    """A model's paged KV cache: per layer ``[2, num_blocks, block_size, kv_heads, head_dim]``,
    zeroed."""
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def fp8_cache_name(dtype: torch.dtype) -> str:
    """The kv_cache_dtype name of an fp8 cache dtype."""
    return next(name for name, d in _FP8_CACHE_DTYPES.items() if d == dtype)


def check_kv_cache_scheme(raw_config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The compressed-tensors ``quantization_config.kv_cache_scheme`` of a config.json, or
    None. What it describes must be what the fp8 cache does with the checkpoint's scales:
    8-bit floats, one static symmetric scale per tensor; anything else fails naming the field.
    """
    quant = raw_config.get("quantization_config")
    scheme = quant.get("kv_cache_scheme") if isinstance(quant, dict) else None
    if scheme is None:
        return None
    if not isinstance(scheme, dict):
        raise ValueError(f"quantization_config.kv_cache_scheme must be an object, got {scheme!r}")
    expected = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                "symmetric": True}
    for key, want in expected.items():
        got = scheme.get(key, want)
        if got != want:
            raise ValueError(
                f"quantization_config.kv_cache_scheme.{key} is {got!r}; pagedserve's fp8 KV "
                f"cache takes {want!r} (8-bit float, static symmetric per-tensor scales)"
            )
    return scheme


def _load_scale(param: nn.Parameter, tensor: torch.Tensor, shard_id: Any = None) -> None:
    if tensor.numel() != 1:
        raise ValueError(
            f"a KV-cache scale must hold one value (per-tensor), got shape "
            f"{tuple(tensor.shape)} (per-head scales are not supported)"
        )
    param.data.copy_(tensor.reshape(1).to(param.dtype))


def _scale_parameter() -> nn.Parameter:
    param = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=False)
    param.weight_loader = _load_scale
    param.optional = True  # a checkpoint without scales gets 1.0
    return param


class Attention(nn.Module):
    """Owns one layer's KV-cache scales (``k_scale``/``v_scale``, float32 [1], 1.0 unless the
    checkpoint gives them) and runs the shared backend with them. The scales matter only to an
    fp8 cache; the backends ignore them otherwise."""

    def __init__(self, backend: AttentionBackend, prefix: str) -> None:
        super().__init__()
        self.backend = backend
        self.prefix = prefix
        self.k_scale = _scale_parameter()
        self.v_scale = _scale_parameter()
        # Host copies, read by every forward: no device sync, and fixed inside CUDA graphs.
        self.k_scale_float = 1.0
        self.v_scale_float = 1.0

    def process_weights_after_loading(self) -> None:
        scales = (float(self.k_scale.item()), float(self.v_scale.item()))
        for name, value in zip(("k_scale", "v_scale"), scales):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"checkpoint tensor {self.prefix}.{name} must be a positive finite scale, "
                    f"got {value}"
                )
        self.k_scale_float, self.v_scale_float = scales

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Stores keys and values in their slots without attending (positions whose outputs
        nobody reads, but whose keys later queries do)."""
        if kv_cache.device.type == "cuda":
            write = kv_cache_writer()
        else:  # C++ for a model-dtype cache, else (fp8) the reference
            write = cpu_ops.reshape_and_cache
        write(key, value, kv_cache, slot_mapping, k_scale=self.k_scale_float,
              v_scale=self.v_scale_float)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return self.backend.forward(query, key, value, kv_cache, metadata,
                                    self.k_scale_float, self.v_scale_float)
