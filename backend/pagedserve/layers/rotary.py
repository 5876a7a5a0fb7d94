"""Rotary position embeddings (NeoX style: rotate halves), with linear and Llama-3 scaling."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from pagedserve.layers import kernel_dispatch
from pagedserve_kernels import reference


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Optional[dict[str, Any]] = None
) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, computed as HF does so fp32 outputs match."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(
        f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band in between
    # interpolated linearly in 1/wavelength.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(in_band, blended, scaled)


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos of each frequency, then its sin."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


class RotaryEmbedding(nn.Module):
    """Owns the cos/sin cache; rotates queries and keys by their token positions."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self.register_buffer(
            "cos_sin_cache", build_cos_sin_cache(inv_freq, max_positions), persistent=False
        )

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, Hq, D], key [T, Hkv, D] -> rotated (query, key)."""
        ops = kernel_dispatch.small_ops_for(query) or reference
        return ops.rotary_embedding(positions, query, key, self.cos_sin_cache)
