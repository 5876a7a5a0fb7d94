"""Paged attention through FlashInfer's batch prefill/decode wrappers.

Untested in this project's CI: flashinfer is not installed on its machines. Written against the
documented API (``BatchPrefillWithPagedKVCacheWrapper`` / ``BatchDecodeWithPagedKVCacheWrapper``,
``plan`` then ``run``, NHD layout, ``(k_cache, v_cache)`` tuple). Our cache's K and V halves are
each FlashInfer's NHD ``[num_pages, page_size, kv_heads, head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pagedserve.attention.base import AttentionBackend, AttentionMetadata
from pagedserve.attention.torch_backend import kv_cache_writer

_WORKSPACE_BYTES = 128 * 1024 * 1024


@dataclass
class _FlashInferPlan:
    """The page-table CSR of one forward; the wrapper is planned on the first layer's call,
    once the query/cache dtypes are known, and reused by every later layer."""

    qo_indptr: torch.Tensor  # [b + 1] int32, CPU
    kv_indptr: torch.Tensor  # [b + 1] int32, CPU (pages)
    kv_indices: torch.Tensor  # [kv_indptr[-1]] int32, device
    kv_last_page_len: torch.Tensor  # [b] int32, CPU
    decode_only: bool
    num_rows: int  # query rows covered (the rest are padding)
    planned_for: Optional[tuple[torch.dtype, torch.dtype]] = field(default=None)


class FlashInferBackend(AttentionBackend):
    """FlashInfer paged attention: the decode wrapper for pure-decode steps, the prefill wrapper
    (causal, bottom-right aligned) for anything with a prefill chunk."""

    name = "flashinfer"
    # Its wrappers plan on the host into their own buffers for one batch; a replay would attend
    # with the captured step's page table (wrong results, not an error).
    cuda_graph_safe = False

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, block_size)
        try:
            import flashinfer
        except ImportError as e:
            raise ValueError(f"attention_backend 'flashinfer' is not usable: {e}") from e
        self._flashinfer = flashinfer
        self._workspace: Optional[torch.Tensor] = None
        self._prefill: Any = None
        self._decode: Any = None
        self._write_kv = kv_cache_writer()

    def _wrappers(self, device: torch.device) -> None:
        if self._workspace is not None:
            return
        # FlashInfer requires the float workspace to be zeroed before its first use.
        self._workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._prefill = self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self._workspace, "NHD"
        )
        group = self.num_heads // self.num_kv_heads
        # Tensor-core decode wins once several query heads share a KV head.
        self._decode = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=group >= 4
        )

    def prepare(self, metadata: AttentionMetadata) -> None:
        n = metadata.num_reqs
        qsl = (metadata.query_start_loc_cpu if metadata.query_start_loc_cpu is not None
               else metadata.query_start_loc.cpu())[: n + 1].to(torch.int32)
        seq_lens = (metadata.seq_lens_cpu if metadata.seq_lens_cpu is not None
                    else metadata.seq_lens.cpu())[:n].to(torch.int32)
        q_lens = qsl[1:] - qsl[:-1]
        # Requests without rows (CUDA-graph padding) would need zero pages; drop them. Their
        # row ranges are empty, so the remaining qo_indptr still indexes the same rows.
        keep = q_lens > 0
        kept_qsl = torch.cat([qsl[:1], qsl[1:][keep]])
        kept_lens = seq_lens[keep]
        pages = (kept_lens + self.block_size - 1) // self.block_size
        kv_indptr = torch.zeros(len(pages) + 1, dtype=torch.int32)
        torch.cumsum(pages, 0, out=kv_indptr[1:])
        last_len = kept_lens - (pages - 1) * self.block_size
        table = metadata.block_table[:n][keep.to(metadata.block_table.device)]
        cols = torch.arange(table.shape[1], device=table.device)
        used = cols[None, :] < pages.to(table.device)[:, None]
        metadata.plan = _FlashInferPlan(
            qo_indptr=kept_qsl,
            kv_indptr=kv_indptr,
            kv_indices=table[used].to(torch.int32),  # row-major: request by request
            kv_last_page_len=last_len.to(torch.int32),
            decode_only=bool((q_lens[keep] == 1).all()),
            num_rows=int(qsl[-1]),
        )
        self._wrappers(metadata.block_table.device)

    def _plan(self, plan: _FlashInferPlan, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        common = dict(num_qo_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                      page_size=self.block_size, sm_scale=self.scale,
                      q_data_type=q_dtype, kv_data_type=kv_dtype)
        if plan.decode_only:
            self._decode.plan(plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len,
                              head_dim=self.head_dim, **common)
        else:
            self._prefill.plan(plan.qo_indptr, plan.kv_indptr, plan.kv_indices,
                               plan.kv_last_page_len, head_dim_qk=self.head_dim, causal=True,
                               **common)
        plan.planned_for = (q_dtype, kv_dtype)

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
        plan: _FlashInferPlan = metadata.plan
        n = metadata.num_actual_tokens
        self._write_kv(key[:n], value[:n], kv_cache, metadata.slot_mapping[:n])
        if plan.planned_for != (query.dtype, kv_cache.dtype):
            self._plan(plan, query.dtype, kv_cache.dtype)
        out = torch.zeros_like(query)
        rows = plan.num_rows
        if rows == 0:
            return out
        caches = (kv_cache[0], kv_cache[1])
        wrapper = self._decode if plan.decode_only else self._prefill
        out[:rows] = wrapper.run(query[:rows], caches)
        return out
