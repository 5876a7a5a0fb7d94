"""Paged attention in plain torch (and our C++ decode kernel and KV write): the CPU backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from pagedserve.attention.base import AttentionBackend, AttentionMetadata
from pagedserve_kernels import cpu_decode, cpu_ops, reference

# Query rows of one request that run as decodes when they continue a cached context (a decode
# verifying up to 16 drafts has 17); longer chunks go through SDPA.
_MAX_DECODE_ROWS = 17


def kv_cache_writer() -> Callable[..., None]:
    """Our Triton reshape_and_cache where Triton is installed (one launch on CUDA), else its
    torch reference; both take (key, value, kv_cache, slot_mapping)."""
    try:
        from pagedserve_kernels import ops
    except ImportError:
        return reference.reshape_and_cache
    return ops.reshape_and_cache


@dataclass
class _Prefill:
    """One prefill chunk: its query rows, its context, and what it attends to."""

    start: int
    end: int
    seq_len: int
    blocks: torch.Tensor  # block ids of the context (long)
    mask: Optional[torch.Tensor]  # [q_len, seq_len] True where attended; None = causal, no prefix


@dataclass
class _Plan:
    """What every layer of one forward shares: decode rows and their contexts, prefills."""

    decode_rows: Optional[torch.Tensor]  # query rows of the decodes; None = rows 0..n-1
    num_decodes: int
    decode_seq_lens: Optional[torch.Tensor]  # [n] int32
    decode_tables: Optional[torch.Tensor]  # [n, max_blocks] int32
    prefills: list[_Prefill]
    slots_valid: bool  # no slot is -1 (checked once, not in every layer)
    # For the gather path only, built by the first layer that needs it.
    gather: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (block ids, attend mask)


class TorchAttentionBackend(AttentionBackend):
    """Paged attention for the CPU. Decodes are batched: in fp32 on the CPU through our C++
    decode kernel (one pass over each context, ``pagedserve_kernels.cpu_decode``; an fp32 or
    fp8 cache), otherwise by gathering their blocks whole (one index_select per layer) into one
    masked SDPA call. Prefill chunks go one at a time through causal SDPA; a chunk with no
    cached prefix reads its own new keys and values without touching the cache (rounded
    through fp8 first when the cache is fp8, so that it sees what a later reader will).
    ``prepare`` builds the plan once per forward for all layers."""

    name = "torch"
    # prepare() plans on the host from the batch's values (a replay would reuse the captured
    # step's plan) and forward() syncs on them.
    cuda_graph_safe = False

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, block_size)
        self._decode_kernel: Any = None  # resolved on the first CPU forward (it may compile)
        self._kernel_checked = False
        if not torch.cuda.is_available():  # a CPU machine: build now, not in a request
            self._kernel_for(torch.empty(0), torch.float32)
            cpu_ops.load()

    def _kernel_for(self, kv_cache: torch.Tensor, query_dtype: torch.dtype) -> Any:
        """The C++ decode kernel when it serves this cache and query (fp32 queries on the
        CPU, with an fp32 or fp8 cache), else None."""
        if (kv_cache.device.type != "cpu" or query_dtype != torch.float32
                or not (kv_cache.dtype == torch.float32 or reference.is_fp8(kv_cache.dtype))):
            return None
        if not self._kernel_checked:
            self._kernel_checked = True
            module = cpu_decode.load()
            self._decode_kernel = module.paged_decode if module is not None else None
        return self._decode_kernel

    def prepare(self, metadata: AttentionMetadata) -> None:
        n = metadata.num_reqs
        if metadata.max_query_len == 1 and metadata.num_actual_tokens == n:
            self._prepare_decodes(metadata)
            return
        bs = self.block_size
        qsl = metadata.query_start_loc_cpu
        if qsl is None:
            qsl = metadata.query_start_loc.cpu()
        seq_lens = metadata.seq_lens_cpu
        if seq_lens is None:
            seq_lens = metadata.seq_lens.cpu()
        q_lens = qsl[1 : n + 1] - qsl[:n]
        seq_lens = seq_lens[:n]
        if metadata.max_query_len <= _MAX_DECODE_ROWS:
            q_np, lens_np = q_lens.numpy(), seq_lens.numpy()
            if ((q_np > 0) & ((q_np == 1) | (lens_np > q_np))).all():
                self._prepare_verifications(metadata, q_np, lens_np)
                return
        # A few query rows that continue a cached context (a decode; a decode verifying
        # drafts) are decodes each: row j of a request attends to its first
        # seq_len - q_len + j + 1 positions, which the cache holds once this layer's keys are
        # written. That reads each context once per row through the decode kernel, instead of
        # gathering it into a masked SDPA call.
        is_decode = (q_lens == 1) | (
            (q_lens <= _MAX_DECODE_ROWS) & (q_lens > 0) & (seq_lens > q_lens))
        table = metadata.block_table
        device = table.device
        dec_idx = torch.nonzero(is_decode).flatten()
        rows = lens = tables = None
        num_decodes = 0
        if len(dec_idx):
            counts = q_lens[dec_idx].long()
            num_decodes = int(counts.sum())
            owner = dec_idx.repeat_interleave(counts)
            within = torch.arange(num_decodes) - (counts.cumsum(0) - counts).repeat_interleave(
                counts)
            lens = ((seq_lens[owner] - q_lens[owner]) + within + 1).to(device=device,
                                                                       dtype=torch.int32)
            max_blocks = (int(lens.max()) + bs - 1) // bs
            if num_decodes == len(dec_idx) == n:
                # One decode row per request; rows past n are CUDA-graph padding.
                tables = table[:, :max_blocks]
            else:
                tables = table[owner.to(device), :max_blocks]
                if num_decodes < metadata.num_actual_tokens:  # else every row, in order
                    rows = (qsl[owner].long() + within).to(device)
            tables = tables.to(torch.int32)
        prefills = []
        for i in torch.nonzero(~is_decode & (q_lens > 0)).flatten().tolist():
            start, end, seq_len = int(qsl[i]), int(qsl[i + 1]), int(seq_lens[i])
            mask = None
            if end - start < seq_len:  # a later chunk: causal within it, all of the prefix
                q_pos = torch.arange(seq_len - (end - start), seq_len, device=device)
                mask = torch.arange(seq_len, device=device)[None, :] <= q_pos[:, None]
            prefills.append(
                _Prefill(start, end, seq_len, table[i, : (seq_len + bs - 1) // bs].long(), mask)
            )
        slots = metadata.slot_mapping[: metadata.num_actual_tokens]
        metadata.plan = _Plan(rows, num_decodes, lens, tables, prefills,
                              slots_valid=bool((slots >= 0).all()))

    def _prepare_decodes(self, metadata: AttentionMetadata) -> None:
        """The plan of a forward of one token per request (plain decoding; each step of a
        drafter after its first): every row a decode, in order, read from the metadata as it
        is. Per-forward host work is most of a small model's step on the CPU, so this skips
        the general plan's query-length analysis."""
        n = metadata.num_reqs
        width = (metadata.max_seq_len + self.block_size - 1) // self.block_size
        tables = metadata.block_table[:, :width]
        if tables.dtype != torch.int32:
            tables = tables.to(torch.int32)
        lens = metadata.seq_lens[:n]
        if lens.dtype != torch.int32:
            lens = lens.to(torch.int32)
        slots = metadata.slot_mapping[:n]
        metadata.plan = _Plan(None, n, lens, tables, [], slots_valid=bool((slots >= 0).all()))

    def _prepare_verifications(self, metadata: AttentionMetadata, q_lens: np.ndarray,
                               seq_lens: np.ndarray) -> None:
        """The plan of a forward whose every request is decodes (a decode, or a decode
        verifying drafts, or a drafter's catch-up of a few tokens): the general plan's decode
        rows, computed on the host in numpy (a few microseconds where torch's small ops on
        the CPU take ~100)."""
        bs, n = self.block_size, metadata.num_reqs
        total = int(metadata.num_actual_tokens)
        owner = np.repeat(np.arange(n), q_lens)
        starts = np.cumsum(q_lens) - q_lens
        within = np.arange(total) - starts[owner]
        lens_np = (seq_lens[owner] - q_lens[owner] + within + 1).astype(np.int32)
        table = metadata.block_table
        device = table.device
        width = (int(lens_np.max()) + bs - 1) // bs
        tables = table.index_select(0, torch.from_numpy(owner).to(device))[:, :width]
        if tables.dtype != torch.int32:
            tables = tables.to(torch.int32)
        slots = metadata.slot_mapping[:total]
        metadata.plan = _Plan(None, total, torch.from_numpy(lens_np).to(device), tables, [],
                              slots_valid=bool((slots >= 0).all()))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        n = metadata.num_actual_tokens
        plan: _Plan = metadata.plan
        # C++ for a model-dtype CPU cache; the reference otherwise (an fp8 cache).
        cpu_ops.reshape_and_cache(key[:n], value[:n], kv_cache, metadata.slot_mapping,
                                  all_valid=plan.slots_valid, k_scale=k_scale, v_scale=v_scale)
        fp8 = reference.is_fp8(kv_cache.dtype)
        if not fp8:  # a model-dtype cache holds x itself: its scales (if loaded) are unused
            k_scale = v_scale = 1.0
        # An fp8 cache is read in the query's dtype (exact), its scales folded into the
        # softmax scale (k) and the output (v): SDPA accumulates in fp32.
        softmax_scale = self.scale * k_scale
        out = torch.empty_like(query)
        if plan.num_decodes:
            rows = plan.decode_rows
            q = query[: plan.num_decodes] if rows is None else query[rows]  # [b, heads, dim]
            attn = self._decode(q, kv_cache, plan, k_scale, v_scale)
            if rows is None:
                out[: plan.num_decodes] = attn
            else:
                out[rows] = attn
        group = self.num_heads // self.num_kv_heads
        for pf in plan.prefills:
            q = query[pf.start:pf.end].transpose(0, 1)[None]  # [1, heads, q_len, dim]
            if pf.mask is None:  # nothing cached before this chunk
                k = key[pf.start:pf.end].transpose(0, 1)
                v = value[pf.start:pf.end].transpose(0, 1)
                if fp8:  # attend to what the cache holds, as a later chunk or a prefix hit will
                    k = reference.quantize_kv(k, k_scale, kv_cache.dtype).to(q.dtype)
                    v = reference.quantize_kv(v, v_scale, kv_cache.dtype).to(q.dtype)
            else:
                k = self._gather(kv_cache[0], pf.blocks, 1)[0, :, :pf.seq_len].to(q.dtype)
                v = self._gather(kv_cache[1], pf.blocks, 1)[0, :, :pf.seq_len].to(q.dtype)
            if group > 1:  # SDPA's fused CPU kernel takes 4-D inputs with as many K/V heads as Q
                k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
            attn = F.scaled_dot_product_attention(
                q, k[None], v[None], attn_mask=pf.mask, is_causal=pf.mask is None,
                scale=softmax_scale,
            )
            out[pf.start:pf.end] = _times(attn[0].transpose(0, 1), v_scale)
        return out

    def _decode(
        self, q: torch.Tensor, kv_cache: torch.Tensor, plan: _Plan, k_scale: float,
        v_scale: float,
    ) -> torch.Tensor:
        kernel = self._kernel_for(kv_cache, q.dtype)
        if kernel is not None:
            attn = torch.empty_like(q)
            # The kernel folds an fp8 cache's scales itself (and ignores them otherwise).
            kernel(q.contiguous(), kv_cache, plan.decode_seq_lens, plan.decode_tables,
                   self.scale, attn, k_scale, v_scale)
            return attn
        if plan.gather is None:
            width = plan.decode_tables.shape[1] * self.block_size
            positions = torch.arange(width, device=q.device)
            mask = positions[None, :] < plan.decode_seq_lens[:, None]
            plan.gather = (plan.decode_tables.reshape(-1).long(), mask[:, None, None, :])
        blocks, mask = plan.gather
        b = q.shape[0]
        k = self._gather(kv_cache[0], blocks, b).to(q.dtype)
        v = self._gather(kv_cache[1], blocks, b).to(q.dtype)
        return _times(F.scaled_dot_product_attention(
            q[:, :, None, :], k, v, attn_mask=mask, scale=self.scale * k_scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )[:, :, 0, :], v_scale)

    @staticmethod
    def _gather(cache: torch.Tensor, blocks: torch.Tensor, batch: int) -> torch.Tensor:
        """[batch, kv_heads, blocks * block_size, dim] view of the given blocks' contents."""
        gathered = cache.index_select(0, blocks)  # [batch * nblk, bs, kv_heads, dim]
        return gathered.view(batch, -1, *cache.shape[2:]).transpose(1, 2)


def _times(attn: torch.Tensor, v_scale: float) -> torch.Tensor:
    """The attention output times v's scale (an fp8 cache's; 1.0 costs nothing)."""
    return attn if v_scale == 1.0 else attn * v_scale
