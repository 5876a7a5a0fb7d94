"""Paged attention in plain torch: the CPU backend, and the reference for the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from pagedserve.attention.base import AttentionBackend, AttentionMetadata

try:
    from pagedserve.kernels import cpu_decode
except ImportError:  # a partial install without the kernels package
    cpu_decode = None


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    all_valid: bool = False,
) -> None:
    """Stores each token's key/value at its slot; rows whose slot is -1 are skipped
    (``all_valid`` says there are none, sparing the check)."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    keep = None if all_valid else slot_mapping >= 0
    if keep is not None and not bool(keep.all()):
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    flat[0].index_copy_(0, slot_mapping, key)
    flat[1].index_copy_(0, slot_mapping, value)


def context_slots(block_table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """The cache slots holding positions 0..seq_len-1 of one request."""
    positions = torch.arange(seq_len, device=block_table.device)
    return block_table[positions // block_size].long() * block_size + positions % block_size


def paged_attention_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of every query row over its request's cached context, one request at a time.

    The simplest correct statement of what every backend computes (after the cache is written):
    row j of request i sits at position ``seq_len - q_len + j`` and sees positions ``<=`` it.
    """
    block_size = kv_cache.shape[2]
    num_kv_heads = kv_cache.shape[3]
    flat = kv_cache.flatten(1, 2)  # [2, slots, kv_heads, dim]
    qsl = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    out = torch.empty_like(query)
    for i in range(metadata.num_reqs):
        start, end, seq_len = qsl[i], qsl[i + 1], seq_lens[i]
        if end == start:
            continue
        slots = context_slots(metadata.block_table[i], seq_len, block_size)
        k, v = flat[0, slots], flat[1, slots]  # [seq, kv_heads, dim]
        q = query[start:end]
        group = q.shape[1] // num_kv_heads
        k = k.repeat_interleave(group, dim=1).float()
        v = v.repeat_interleave(group, dim=1).float()
        scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(out.dtype)
    return out


@dataclass
class _Plan:
    """Gather indices shared by all layers of one forward."""

    decode_rows: Optional[torch.Tensor]  # [n] rows that are single-token decodes; None = all
    num_decodes: int
    decode_blocks: torch.Tensor  # [n * max_blocks] block ids to gather (0 where unused)
    decode_mask: torch.Tensor  # [n, 1, 1, max_blocks * block_size] True where attended
    prefills: list[tuple[int, int, int, torch.Tensor]]  # (start, end, seq_len, block ids)
    # For the C++ decode kernel instead of the gather: each decode's length and block row.
    decode_seq_lens: Optional[torch.Tensor] = None  # [n] int32
    decode_tables: Optional[torch.Tensor] = None  # [n, max_blocks] int32
    slots_valid: bool = False  # no slot is -1 (checked once, not in every layer)


class TorchAttentionBackend(AttentionBackend):
    """Paged attention for the CPU. Decodes are batched: in fp32 on the CPU through our C++
    decode kernel (one pass over each context, ``pagedserve.kernels.cpu_decode``), otherwise
    by gathering their blocks whole (one index_select per layer) into one masked SDPA call.
    Prefill chunks go one at a time through causal SDPA; a chunk with no cached prefix reads
    its own new keys and values without touching the cache. ``prepare`` builds the plan once
    per forward for all layers."""

    name = "torch"

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, block_size)
        self._decode_kernel: Any = None  # resolved on the first CPU forward (it may compile)
        self._kernel_checked = False
        if not torch.cuda.is_available():  # a CPU machine: build now, not in a request
            self._cpu_kernel()

    def _cpu_kernel(self) -> Any:
        if not self._kernel_checked:
            self._kernel_checked = True
            module = cpu_decode.load() if cpu_decode is not None else None
            self._decode_kernel = module.paged_decode if module is not None else None
        return self._decode_kernel

    def _kernel_for(self, kv_cache: torch.Tensor) -> Any:
        if kv_cache.device.type == "cpu" and kv_cache.dtype == torch.float32:
            return self._decode_kernel
        return None

    def prepare(self, metadata: AttentionMetadata) -> None:
        bs = self.block_size
        qsl = metadata.query_start_loc_cpu
        if qsl is None:
            qsl = metadata.query_start_loc.cpu()
        seq_lens = metadata.seq_lens_cpu
        if seq_lens is None:
            seq_lens = metadata.seq_lens.cpu()
        n = metadata.num_reqs
        q_lens = qsl[1 : n + 1] - qsl[:n]
        seq_lens = seq_lens[:n]
        is_decode = q_lens == 1
        table = metadata.block_table
        device = table.device
        dec_idx = torch.nonzero(is_decode).flatten()
        num_decodes = len(dec_idx)
        if num_decodes:
            dec_seq = seq_lens[dec_idx]
            max_blocks = int(dec_seq.max() + bs - 1) // bs
            all_decode = num_decodes == n
            # Query rows of the decodes (a decode's single row starts its request's slice).
            rows = None if all_decode else qsl[dec_idx].long().to(device)
            tables = table[:, :max_blocks] if all_decode else table[dec_idx.to(device), :max_blocks]
            if device.type == "cpu" and self._cpu_kernel() is not None:
                dec_lens = dec_seq.to(torch.int32)
                dec_tables = tables.to(torch.int32)
            else:
                dec_lens = dec_tables = None
            positions = torch.arange(max_blocks * bs)
            mask = (positions[None, :] < dec_seq[:, None])[:, None, None, :].to(device)
            blocks = tables.reshape(-1).long()
        else:
            rows = blocks = mask = torch.empty(0, dtype=torch.long, device=device)
            dec_lens = dec_tables = None
        prefills = []
        for i in torch.nonzero(~is_decode & (q_lens > 0)).flatten().tolist():
            seq_len = int(seq_lens[i])
            prefills.append((int(qsl[i]), int(qsl[i + 1]), seq_len,
                             table[i, : (seq_len + bs - 1) // bs].long()))
        slots = metadata.slot_mapping[: metadata.num_actual_tokens]
        metadata.plan = _Plan(rows, num_decodes, blocks, mask, prefills, dec_lens, dec_tables,
                              slots_valid=bool((slots >= 0).all()))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        n = metadata.num_actual_tokens
        plan: _Plan = metadata.plan
        write_kv_cache(key[:n], value[:n], kv_cache, metadata.slot_mapping[:n],
                       all_valid=plan.slots_valid)
        out = torch.empty_like(query)
        gqa = self.num_heads != self.num_kv_heads
        kernel = self._kernel_for(kv_cache) if plan.decode_tables is not None else None
        if plan.num_decodes and kernel is not None:
            rows = plan.decode_rows
            q = query[: plan.num_decodes] if rows is None else query[rows]
            attn = torch.empty_like(q)
            kernel(q.contiguous(), kv_cache, plan.decode_seq_lens, plan.decode_tables,
                   self.scale, attn)
            if rows is None:
                out[: plan.num_decodes] = attn
            else:
                out[rows] = attn
        elif plan.num_decodes:
            rows = plan.decode_rows
            # All-decode: rows 0..n-1; rows past them are CUDA-graph padding, not decodes.
            q = query[: plan.num_decodes] if rows is None else query[rows]  # [b, heads, dim]
            b = q.shape[0]
            k = self._gather(kv_cache[0], plan.decode_blocks, b)
            v = self._gather(kv_cache[1], plan.decode_blocks, b)
            attn = F.scaled_dot_product_attention(
                q[:, :, None, :], k, v, attn_mask=plan.decode_mask, scale=self.scale,
                enable_gqa=gqa,
            )[:, :, 0, :]
            if rows is None:
                out[:b] = attn
            else:
                out[rows] = attn
        group = self.num_heads // self.num_kv_heads
        for start, end, seq_len, blocks in plan.prefills:
            q = query[start:end].transpose(0, 1)[None]  # [1, heads, q_len, dim]
            q_len = end - start
            if q_len == seq_len:  # nothing cached before this chunk
                k, v = key[start:end].transpose(0, 1), value[start:end].transpose(0, 1)
                mask, causal = None, True
            else:
                k = self._gather(kv_cache[0], blocks, 1)[0, :, :seq_len]
                v = self._gather(kv_cache[1], blocks, 1)[0, :, :seq_len]
                q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
                mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
                causal = False
            if gqa:  # SDPA's fused CPU kernel takes 4-D inputs with as many K/V heads as Q
                k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
            attn = F.scaled_dot_product_attention(
                q, k[None], v[None], attn_mask=mask, is_causal=causal, scale=self.scale
            )
            out[start:end] = attn[0].transpose(0, 1)
        return out

    @staticmethod
    def _gather(cache: torch.Tensor, blocks: torch.Tensor, batch: int) -> torch.Tensor:
        """[batch, kv_heads, blocks * block_size, dim] view of the given blocks' contents."""
        gathered = cache.index_select(0, blocks)  # [batch * nblk, bs, kv_heads, dim]
        return gathered.view(batch, -1, *cache.shape[2:]).transpose(1, 2)
