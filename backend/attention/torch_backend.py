"""Paged attention in plain torch: the CPU backend, and the reference for the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from pagedserve.attention.base import AttentionBackend, AttentionMetadata


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Stores each token's key/value at its slot; rows whose slot is -1 are skipped."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    keep = slot_mapping >= 0
    if not bool(keep.all()):
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


class TorchAttentionBackend(AttentionBackend):
    """Paged attention for the CPU. Decodes are batched: their blocks are gathered whole (one
    index_select per layer, not one per token) and attended with one masked SDPA call.
    Prefill chunks go one at a time through causal SDPA; a chunk with no cached prefix reads
    its own new keys and values without touching the cache. ``prepare`` builds the gather plan
    once per forward for all layers."""

    name = "torch"

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
            positions = torch.arange(max_blocks * bs)
            mask = (positions[None, :] < dec_seq[:, None])[:, None, None, :].to(device)
            blocks = tables.reshape(-1).long()
        else:
            rows = blocks = mask = torch.empty(0, dtype=torch.long, device=device)
        prefills = []
        for i in torch.nonzero(~is_decode & (q_lens > 0)).flatten().tolist():
            seq_len = int(seq_lens[i])
            prefills.append((int(qsl[i]), int(qsl[i + 1]), seq_len,
                             table[i, : (seq_len + bs - 1) // bs].long()))
        metadata.plan = _Plan(rows, num_decodes, blocks, mask, prefills)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        n = metadata.num_actual_tokens
        write_kv_cache(key[:n], value[:n], kv_cache, metadata.slot_mapping[:n])
        plan: _Plan = metadata.plan
        out = torch.empty_like(query)
        gqa = self.num_heads != self.num_kv_heads
        if plan.num_decodes:
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
        for start, end, seq_len, blocks in plan.prefills:
            q = query[start:end].transpose(0, 1)  # [heads, q_len, dim]
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
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=gqa
            )
            out[start:end] = attn.transpose(0, 1)
        return out

    @staticmethod
    def _gather(cache: torch.Tensor, blocks: torch.Tensor, batch: int) -> torch.Tensor:
        """[batch, kv_heads, blocks * block_size, dim] view of the given blocks' contents."""
        gathered = cache.index_select(0, blocks)  # [batch * nblk, bs, kv_heads, dim]
        return gathered.view(batch, -1, *cache.shape[2:]).transpose(1, 2)
