"""Attention metadata for a hand-made step over a paged KV cache, for tests that drive a model
directly (no runner): the tensor-parallel ranks and the EAGLE-3 head's reference tests."""

from __future__ import annotations

import torch

from pagedserve.attention.base import AttentionMetadata


def step_metadata(q_lens: list[int], ctx_lens: list[int], tables: list[list[int]],
                  block_size: int) -> tuple[AttentionMetadata, torch.Tensor]:
    """A step of ``q_lens`` new tokens after ``ctx_lens`` cached ones, request i's blocks
    ``tables[i]``; returns it and the new tokens' positions."""
    positions = torch.cat([torch.arange(c, c + q) for q, c in zip(q_lens, ctx_lens)])
    owner = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    table = torch.tensor(tables, dtype=torch.int32)
    slots = table[owner, positions // block_size].long() * block_size + positions % block_size
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    seq_lens = torch.tensor([q + c for q, c in zip(q_lens, ctx_lens)], dtype=torch.int32)
    meta = AttentionMetadata(
        num_actual_tokens=int(qsl[-1]), num_reqs=len(q_lens), query_start_loc=qsl,
        seq_lens=seq_lens, block_table=table, slot_mapping=slots,
        max_query_len=max(q_lens), max_seq_len=int(seq_lens.max()),
        query_start_loc_cpu=qsl.clone(), seq_lens_cpu=seq_lens.clone(),
    )
    return meta, positions
