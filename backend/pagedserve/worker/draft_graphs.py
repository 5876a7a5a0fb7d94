"""CUDA graphs for a draft model's one-token steps: the k - 1 steps after its catch-up feed
one draft per row, the same shape every time, which on a GPU is launch overhead more than work.
They replay the target's kind of decode graph (worker/cuda_graphs.py) over the draft's own step
buffers and KV caches."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from pagedserve.attention.base import AttentionBackend
from pagedserve.config import EngineConfig
from pagedserve.spec_decode.draft_model import DraftModelProposer
from pagedserve.worker.cuda_graphs import CudaGraphRunner, capture_sizes, graphs_unusable
from pagedserve.worker.step_buffers import StepBuffers


class DraftDecodeGraphs:
    """Owns a drafter's step buffers and its captured one-token graphs (one per batch size of
    worker.cuda_graphs.capture_sizes); ``run`` replays the smallest that holds its rows."""

    def __init__(
        self,
        model: nn.Module,
        attn: AttentionBackend,
        kv_caches: list[torch.Tensor],
        max_rows: int,
        max_model_len: int,
        max_blocks: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        largest = capture_sizes(max_rows)[-1]
        self.buffers = StepBuffers(largest, largest, 0, max_blocks, device)
        self.graphs = CudaGraphRunner(model, attn, self.buffers, kv_caches, max_rows,
                                      max_model_len, (1,))

    def capture(self) -> None:
        self.graphs.capture()

    def holds(self, num_rows: int) -> bool:
        return self.graphs.size_for(num_rows, 1) is not None

    def run(self, ids: torch.Tensor, positions: np.ndarray, table: np.ndarray) -> torch.Tensor:
        """The hidden states of one token per row (row i: ``ids[i]`` at ``positions[i]``, its
        blocks ``table[i]``, attending to positions up to its own); ``holds(rows)`` must be
        true."""
        n = len(positions)
        size = self.graphs.size_for(n, 1)
        assert size is not None, f"no draft graph holds {n} rows"
        buf, bs = self.buffers, self.block_size
        buf.wait_for_upload()  # the last step's copies must have left the host buffers
        host = buf.host
        host(buf.positions)[:n] = positions
        host(buf.positions)[n:size] = 0
        slots = host(buf.slot_mapping)
        slots[:n] = table[np.arange(n), positions // bs] * bs + positions % bs
        slots[n:size] = -1  # padding rows write nothing
        host(buf.query_start_loc)[: size + 1] = np.arange(size + 1)
        seq_lens = host(buf.seq_lens)
        seq_lens[:n] = positions + 1
        seq_lens[n:size] = 1
        width = table.shape[1]
        buf.block_table_host(n, width)[:] = table
        buf.upload(size, size, 0, n, width)
        buf.input_ids[1][:n].copy_(ids)
        buf.input_ids[1][n:size].zero_()
        return self.graphs.replay(size, 1)[:n]


def capture_draft_graphs(draft: DraftModelProposer,
                         config: EngineConfig) -> Optional[DraftDecodeGraphs]:
    """The draft model's one-token graphs, captured (after its KV caches exist), or None where
    its attention backend cannot be replayed."""
    if graphs_unusable(draft.device, config.args.enforce_eager, draft.attn) is not None:
        return None
    graphs = DraftDecodeGraphs(
        draft.model, draft.attn, draft.kv_caches, config.max_num_seqs, config.max_model_len,
        config.max_blocks_per_req + draft.scratch.per_row, draft.block_size, draft.device)
    graphs.capture()
    return graphs
