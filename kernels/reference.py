"""The pure-torch reference of every kernel in ``pagedserve.kernels.ops``, in one place.

They live next to the code that uses them on the CPU (layers, torch attention backend); this
module only gathers them, so tests and benchmarks import references without importing Triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from pagedserve.attention.base import AttentionMetadata
from pagedserve.attention.torch_backend import paged_attention_ref, write_kv_cache
from pagedserve.layers.activation import silu_and_mul_ref
from pagedserve.layers.norm import rms_norm_ref
from pagedserve.layers.rotary import apply_rotary_ref


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_ref(x, weight, eps, residual)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return (apply_rotary_ref(positions, query, cos_sin_cache),
            apply_rotary_ref(positions, key, cos_sin_cache))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_ref(x)


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    write_kv_cache(key, value, kv_cache, slot_mapping[: key.shape[0]])


def unified_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: Optional[torch.Tensor] = None,
    num_actual_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Same contract as the kernel (padding rows zeroed), computed by ``paged_attention_ref``."""
    num_seqs = query_start_loc.numel() - 1
    meta = AttentionMetadata(
        num_actual_tokens=query.shape[0] if num_actual_tokens is None else num_actual_tokens,
        num_reqs=num_seqs,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens[:num_seqs],
        block_table=block_table[:num_seqs],
        slot_mapping=torch.empty(0, dtype=torch.long, device=query.device),
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
    )
    res = paged_attention_ref(query, kv_cache, meta, scale)
    res[int(query_start_loc[-1]):] = 0
    if out is None:
        return res
    out.copy_(res)
    return out
