"""What the paged proposers (the draft model, EAGLE-3 heads) share: a drafting model's own KV
cache addressed by the target's block tables plus per-row scratch blocks, the attention
metadata of a ragged drafting forward and of its one-token steps, and dense linears for small
drafters on the CPU.

Scratch blocks. Drafting k tokens writes the drafter's KV up to ``k - 1`` positions past a row's
last known token, but the scheduler has only allocated the blocks of the tokens it scheduled, so
those positions may lie past the row's blocks (when the target accepted every draft near a
block's end). Capping k by that room would cut drafts on a good share of the steps where drafting
works best; writing nothing there (slot -1) would leave the drafter's attention reading keys it
never wrote. So positions past a row's blocks go to scratch blocks of the drafter's cache that
belong to that batch row alone (``ceil(k / block_size)`` of them, after the target's block ids:
no write ever lands in a block the row does not own). What is written there is never kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch

from pagedserve.attention.base import AttentionBackend, AttentionMetadata
from pagedserve.attention.selector import get_attention_backend
from pagedserve.config import EngineConfig
from pagedserve.layers.linear import LinearBase, UnquantizedLinearMethod, onednn_unpack
from pagedserve.models.model_config import ModelConfig


def use_dense_linears(model: torch.nn.Module) -> None:
    """Runs ``model``'s unquantized linear layers and LM head as plain dense matmuls (MKL)
    instead of oneDNN's packed ones. At a draft model's sizes (hidden 96 here) oneDNN's fixed
    cost per call (~30 us on this project's CPUs) is several times the matmul's: dense is as
    fast or faster at every row count up to 512, and a drafting forward makes ~9 such calls."""
    for module in model.modules():
        packed = getattr(module, "onednn_weight", None)
        if packed is None:
            continue
        if isinstance(module, LinearBase):
            if not isinstance(module.linear_method, UnquantizedLinearMethod):
                continue
            module.weight = torch.nn.Parameter(
                onednn_unpack(packed, module.input_size, packed.dtype), requires_grad=False)
        elif getattr(module, "weight", None) is None:  # an LM head keeps its dense weight
            continue
        module.onednn_weight = None


def drafter_attention(config: EngineConfig, model_config: ModelConfig, device: torch.device,
                      kv_cache_dtype: torch.dtype) -> AttentionBackend:
    """The attention backend of a drafting model (its own heads and head_dim; the engine's
    backend choice, block size and KV-cache dtype)."""
    mc = model_config
    return get_attention_backend(
        config.args.attention_backend, device,
        num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
        scale=mc.head_dim ** -0.5, block_size=config.block_size, kv_cache_dtype=kv_cache_dtype,
    )


class PagedBatch(Protocol):
    """What a paged proposer reads from the runner's batch: the rows' tokens, their block
    tables, and their serial numbers (bumped whenever a row is given to a request)."""

    token_ids: np.ndarray  # [rows, max_model_len]
    num_tokens: np.ndarray  # [rows]
    num_computed: np.ndarray  # [rows]: tokens whose target KV is (being) written
    block_table: np.ndarray  # [rows, max_blocks_per_req]
    num_blocks: np.ndarray  # [rows]
    serial: np.ndarray  # [rows]


@dataclass
class ScratchBlocks:
    """Where each batch row's scratch blocks are in a drafter's cache: ``per_row`` blocks per
    row, after the target's ``first`` block ids (see the module docstring)."""

    per_row: int
    first: int = 0  # the target's num_blocks, once the cache is allocated

    @classmethod
    def for_drafts(cls, max_drafts: int, block_size: int) -> ScratchBlocks:
        return cls(-(-max_drafts // block_size))

    def total_blocks(self, num_target_blocks: int, max_rows: int) -> int:
        """Sets ``first``; the drafter's cache size in blocks."""
        self.first = num_target_blocks
        return num_target_blocks + max_rows * self.per_row

    def block_table(self, batch: PagedBatch, rows: np.ndarray, last_position: np.ndarray,
                    block_size: int) -> np.ndarray:
        """The rows' block tables up to each one's last written position: their own blocks,
        then their scratch blocks."""
        width = int(last_position.max()) // block_size + 1
        table = batch.block_table[rows, :width].astype(np.int64)
        past = np.arange(width)[None, :] - batch.num_blocks[rows][:, None].astype(np.int64)
        scratch = (self.first + rows[:, None] * self.per_row
                   + np.minimum(past, self.per_row - 1))
        return np.where(past >= 0, scratch, table)


def ragged_metadata(positions: np.ndarray, table: np.ndarray, query_lens: np.ndarray,
                    seq_lens: np.ndarray, block_size: int,
                    device: torch.device) -> tuple[AttentionMetadata, np.ndarray]:
    """The attention metadata of one drafting forward over a ragged batch (row i:
    ``query_lens[i]`` tokens at ``positions``, ending at context length ``seq_lens[i]``, its
    KV at ``table[i]``), and the flat index of each row's last token."""
    owner = np.repeat(np.arange(len(query_lens)), query_lens)
    slots = table[owner, positions // block_size] * block_size + positions % block_size
    qsl = np.zeros(len(query_lens) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=qsl[1:])
    qsl_cpu = torch.from_numpy(qsl)
    seq_lens_cpu = torch.from_numpy(seq_lens.astype(np.int32))
    meta = AttentionMetadata(
        num_actual_tokens=len(positions),
        num_reqs=len(query_lens),
        query_start_loc=qsl_cpu.to(device),
        seq_lens=seq_lens_cpu.to(device),
        block_table=torch.from_numpy(table.astype(np.int32)).to(device),
        slot_mapping=torch.from_numpy(slots).to(device),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
        query_start_loc_cpu=qsl_cpu,
        seq_lens_cpu=seq_lens_cpu,
    )
    return meta, qsl[1:].astype(np.int64) - 1


def time_drafting_steps(step: Callable[[np.ndarray, np.ndarray], object], sizes: list[int],
                        max_model_len: int, num_blocks: int, block_size: int,
                        device: torch.device, repeats: int = 3) -> list[tuple[int, float]]:
    """Seconds of one drafting step over n requests for each n of ``sizes`` (``step(positions,
    table)``: one token per request and its draft, metadata included, writing nothing), each
    at a context of half max_model_len (at most 512 positions), the best of ``repeats``: the
    seed of the speculation controller's price of a draft position."""
    context = max(1, min(max_model_len // 2, 512, num_blocks * block_size))
    blocks = np.arange(-(-context // block_size), dtype=np.int64)
    timings = []
    for n in sizes:
        positions = np.full(n, context - 1, dtype=np.int64)
        table = np.tile(blocks, (n, 1))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            step(positions, table)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        timings.append((n, best))
    return timings


def ragged_arange(counts: np.ndarray) -> np.ndarray:
    """0..counts[0]-1, 0..counts[1]-1, ... concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


class DecodeSteps:
    """Owns the inputs and attention metadata of a drafter's one-token steps over a fixed set
    of rows (row i's first step at ``positions[i]``, its KV at ``table[i]``, which covers its
    last step): built once by ``ragged_metadata``, then moved one position on per step in place
    (positions, context lengths, slots), since every such step has the same shape.

    ``context_start`` (per row, a block boundary; default 0) is the first position a row
    attends to: an EAGLE-3 head whose keys and values before it are missing or stale. The
    attention then sees the row's blocks from that one on (a shorter context), while the rotary
    embedding still gets the true positions (the cached keys were rotated at theirs, so the
    scores are unchanged)."""

    def __init__(self, positions: np.ndarray, table: np.ndarray, block_size: int,
                 device: torch.device, context_start: Optional[np.ndarray] = None) -> None:
        n = len(positions)
        self.block_size = block_size
        self.positions = positions.astype(np.int64)  # a copy: advanced in place
        # Positions as the attention metadata counts them: from each row's context start.
        self._context = self.positions
        if context_start is not None and context_start.any():
            first = context_start.astype(np.int64) // block_size
            columns = np.minimum(np.arange(table.shape[1])[None, :] + first[:, None],
                                 table.shape[1] - 1)
            table = np.take_along_axis(table, columns, axis=1)
            self._context = self.positions - first * block_size
        self.table = table
        ones = np.ones(n, dtype=np.int64)
        self.meta, _ = ragged_metadata(self._context, table, ones, self._context + 1,
                                       block_size, device)
        self.positions_t = torch.from_numpy(self.positions).to(device)
        self._positions_shared = self.positions_t.device.type == "cpu"  # a view of positions
        self._rows = np.arange(n)

    def advance(self) -> None:
        """The next step: every row one position further."""
        meta, bs = self.meta, self.block_size
        self.positions += 1
        if self._context is not self.positions:
            self._context += 1
        context = self._context
        slots = self.table[self._rows, context // bs] * bs + context % bs
        meta.slot_mapping.copy_(torch.from_numpy(slots))
        if not self._positions_shared:
            self.positions_t.copy_(torch.from_numpy(self.positions))
        meta.seq_lens_cpu.add_(1)
        if meta.seq_lens is not meta.seq_lens_cpu:
            meta.seq_lens.add_(1)
        meta.max_seq_len += 1
