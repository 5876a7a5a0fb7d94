"""Paged attention through the flash-attn package (FlashAttention-2 with a block table).

Untested in this project's CI: flash-attn is not installed on its machines. Written against the
documented flash-attn >= 2.6 API (``flash_attn_with_kvcache`` and ``flash_attn_varlen_func`` with
``block_table``; causal masks aligned to the bottom right, which is our chunked-prefill
semantics). Upstream FlashAttention-2 requires the paged-KV page size to be a multiple of 256.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from pagedserve.attention.base import AttentionBackend, AttentionMetadata
from pagedserve.attention.torch_backend import kv_cache_writer

_PAGE_MULTIPLE = 256


@dataclass
class _FlashAttnPlan:
    """Per-forward tensors shared by all layers."""

    cu_seqlens_q: torch.Tensor  # [num_reqs + 1] int32
    cu_seqlens_k: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    decode_only: bool  # every request has exactly one query row


class FlashAttnBackend(AttentionBackend):
    """FlashAttention-2 over our cache layout (K and V halves are already flash-attn's
    ``[num_blocks, page_size, kv_heads, head_dim]``): decodes through ``flash_attn_with_kvcache``
    (its own split-KV heuristics), mixed batches through ``flash_attn_varlen_func``."""

    name = "flash_attn"
    # prepare() builds cu_seqlens_k anew each step; never checked under capture (flash-attn is
    # not installed on this project's machines), so it runs eagerly.
    cuda_graph_safe = False

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, block_size)
        try:
            import flash_attn
            from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
        except ImportError as e:
            raise ValueError(f"attention_backend 'flash_attn' is not usable: {e}") from e
        if "block_table" not in inspect.signature(flash_attn_varlen_func).parameters:
            raise ValueError(
                f"attention_backend 'flash_attn' needs flash-attn >= 2.6 (paged KV in "
                f"flash_attn_varlen_func); found {getattr(flash_attn, '__version__', '?')}"
            )
        if block_size % _PAGE_MULTIPLE:
            raise ValueError(
                f"attention_backend 'flash_attn' needs block_size to be a multiple of "
                f"{_PAGE_MULTIPLE} (FlashAttention-2 paged KV); got {block_size}. Use "
                f"block_size={_PAGE_MULTIPLE} or attention_backend='triton'"
            )
        if head_dim > 256 or head_dim % 8:
            raise ValueError(f"flash_attn supports head_dim <= 256 and a multiple of 8, "
                             f"got {head_dim}")
        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache
        self._write_kv = kv_cache_writer()

    def prepare(self, metadata: AttentionMetadata) -> None:
        n = metadata.num_reqs
        seq_lens = metadata.seq_lens[:n].to(torch.int32)
        cu_k = torch.zeros(n + 1, dtype=torch.int32, device=seq_lens.device)
        torch.cumsum(seq_lens, 0, out=cu_k[1:])
        metadata.plan = _FlashAttnPlan(
            cu_seqlens_q=metadata.query_start_loc[: n + 1].to(torch.int32),
            cu_seqlens_k=cu_k,
            seq_lens=seq_lens,
            block_table=metadata.block_table[:n].to(torch.int32),
            decode_only=metadata.max_query_len == 1 and metadata.num_actual_tokens == n,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        k_scale: float = 1.0,  # unused: the selector gives this backend no fp8 cache
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        plan: _FlashAttnPlan = metadata.plan
        n = metadata.num_actual_tokens
        self._write_kv(key[:n], value[:n], kv_cache, metadata.slot_mapping[:n])
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        out = torch.empty_like(query)
        if n < query.shape[0]:
            out[n:].zero_()
        if n == 0:
            return out
        if plan.decode_only:
            res = self._with_kvcache(
                query[:n].unsqueeze(1), k_cache, v_cache,
                cache_seqlens=plan.seq_lens, block_table=plan.block_table,
                softmax_scale=self.scale, causal=True,
            )
            out[:n] = res.squeeze(1)
        else:
            out[:n] = self._varlen(
                query[:n], k_cache, v_cache,
                cu_seqlens_q=plan.cu_seqlens_q, cu_seqlens_k=plan.cu_seqlens_k,
                max_seqlen_q=metadata.max_query_len, max_seqlen_k=metadata.max_seq_len,
                softmax_scale=self.scale, causal=True, block_table=plan.block_table,
            )
        return out
