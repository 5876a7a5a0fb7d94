"""CUDA graphs for pure-decode steps: capture once per batch size, replay with new inputs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from pagedserve.attention.base import AttentionMetadata

if TYPE_CHECKING:
    from pagedserve.worker.model_runner import ForwardInputs, ModelRunner

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (at most 512)."""
    limit = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4, 8) if s <= limit]
    sizes += list(range(16, limit + 1, 8))
    if limit not in sizes:
        sizes.append(-(-limit // 8) * 8 if limit > 8 else limit)
    return sorted(set(sizes))


class CudaGraphRunner:
    """Owns the captured decode graphs, their static input buffers and their shared pool.

    A decode step of ``n`` requests replays the smallest graph of size ``>= n``: rows past
    ``n`` are padding whose slot is -1 (nothing written) and whose context is one token.
    Attention kernels read each row's true length from ``seq_lens``, so one capture serves
    every context length up to max_model_len.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        config = runner.config
        self.sizes = capture_sizes(config.max_num_seqs)
        self.max_size = self.sizes[-1]
        device = runner.device
        n, blocks = self.max_size, config.max_blocks_per_req
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(n, blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.metadata: dict[int, AttentionMetadata] = {}
        self.max_model_len = config.max_model_len

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_actual_tokens=size,
            num_reqs=size,
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_table=self.block_table[:size],
            slot_mapping=self.slot_mapping[:size],
            max_query_len=1,
            # Sized for the longest context: the kernels bound each row by its own seq_len.
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=torch.arange(size + 1, dtype=torch.int32),
            seq_lens_cpu=torch.full((size,), self.max_model_len, dtype=torch.int32),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        runner = self.runner
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        # Largest first, so the smaller graphs fit in the memory the largest reserved.
        for size in reversed(self.sizes):
            meta = self._metadata(size)
            runner.attn.prepare(meta)
            args = (self.input_ids[:size], self.positions[:size], runner.kv_caches, meta)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: compile kernels, allocate workspaces
                    runner.model(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = runner.model(*args)
            self.graphs[size], self.outputs[size], self.metadata[size] = graph, out, meta
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (sizes %s)", len(self.sizes), self.sizes)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (
            meta.max_query_len == 1
            and meta.num_reqs <= self.max_size
            and meta.num_actual_tokens == meta.num_reqs
        )

    def run(self, inputs: ForwardInputs) -> torch.Tensor:
        meta = inputs.metadata
        n = meta.num_reqs
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        width = meta.block_table.shape[1]
        self.block_table[:n, :width].copy_(meta.block_table)
        if size > n:  # padding rows: write nothing, attend to one (harmless) slot
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(1)
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
        self.graphs[size].replay()
        return self.outputs[size][:n]
