"""Paged attention in plain torch: the CPU backend, and the reference for the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

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
class _DecodePlan:
    """Gather indices shared by all layers for the single-token rows of one forward."""

    rows: torch.Tensor  # [n] query rows that are single-token decodes
    slots: torch.Tensor  # [n, max_ctx] cache slots to gather (0 where masked)
    mask: torch.Tensor  # [n, 1, 1, max_ctx] True where the position is past the context
    prefill: list[tuple[int, int, int, torch.Tensor]]  # (start, end, seq_len, slots) per prefill


class TorchAttentionBackend(AttentionBackend):
    """Paged attention for the CPU: decodes batched through one padded gather, prefills each
    through SDPA. ``prepare`` builds the gather plan once per forward for all layers."""

    name = "torch"

    def prepare(self, metadata: AttentionMetadata) -> None:
        block_table = metadata.block_table
        block_size = self.block_size
        qsl = metadata.query_start_loc_cpu if metadata.query_start_loc_cpu is not None else (
            metadata.query_start_loc.cpu()
        )
        seq_lens_cpu = metadata.seq_lens_cpu if metadata.seq_lens_cpu is not None else (
            metadata.seq_lens.cpu()
        )
        q_lens = (qsl[1:] - qsl[:-1])[: metadata.num_reqs]
        seq_lens_cpu = seq_lens_cpu[: metadata.num_reqs]
        is_decode = q_lens == 1
        device = block_table.device
        dec_idx = torch.nonzero(is_decode).flatten()
        if len(dec_idx):
            dec_seq = seq_lens_cpu[dec_idx]
            max_ctx = int(dec_seq.max())
            pos = torch.arange(max_ctx)
            tables = block_table[dec_idx.to(device), : (max_ctx + block_size - 1) // block_size]
            slots = tables.long()[:, pos // block_size] * block_size + (pos % block_size)
            past = (pos[None, :] >= dec_seq[:, None]).to(device)
            slots = slots.masked_fill(past, 0)
            rows = qsl[dec_idx].to(device)
            mask = past[:, None, None, :]
        else:
            rows = slots = mask = torch.empty(0, dtype=torch.long, device=device)
        prefill = []
        for i in torch.nonzero(~is_decode & (q_lens > 0)).flatten().tolist():
            seq_len = int(seq_lens_cpu[i])
            prefill.append(
                (int(qsl[i]), int(qsl[i + 1]), seq_len,
                 context_slots(block_table[i], seq_len, block_size))
            )
        metadata.plan = _DecodePlan(rows, slots, mask, prefill)

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
        plan: _DecodePlan = metadata.plan
        flat = kv_cache.flatten(1, 2)
        out = torch.empty_like(query)
        group = self.num_heads // self.num_kv_heads
        if len(plan.rows):
            q = query[plan.rows]  # [b, heads, dim]
            b = q.shape[0]
            k = flat[0][plan.slots]  # [b, ctx, kv_heads, dim]
            v = flat[1][plan.slots]
            q = q.view(b, self.num_kv_heads, group, self.head_dim)
            scores = torch.einsum("bhgd,bchd->bhgc", q, k) * self.scale
            scores.masked_fill_(plan.mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
            attn = torch.einsum("bhgc,bchd->bhgd", probs, v)
            out[plan.rows] = attn.reshape(b, self.num_heads, self.head_dim)
        for start, end, seq_len, slots in plan.prefill:
            q = query[start:end].transpose(0, 1)  # [heads, q, dim]
            k = flat[0][slots].transpose(0, 1)  # [kv_heads, ctx, dim]
            v = flat[1][slots].transpose(0, 1)
            q_len = end - start
            if q_len == seq_len:
                mask, causal = None, True
            else:
                q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
                mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
                causal = False
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                enable_gqa=group > 1,
            )
            out[start:end] = attn.transpose(0, 1)
        return out
