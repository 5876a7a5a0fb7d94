"""CUDA graphs for pure-decode steps: capture once per batch size, replay with new inputs."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from pagedserve.attention.base import AttentionBackend, AttentionMetadata
from pagedserve.worker.step_buffers import StepBuffers

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512


def graphs_unusable(device: torch.device, enforce_eager: bool,
                    attn: AttentionBackend) -> Optional[str]:
    """Why decode steps must run eagerly here, or None when CUDA graphs may replay them."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type!r}"
    if enforce_eager:
        return "enforce_eager is set"
    if not attn.cuda_graph_safe:
        return f"the {attn.name!r} attention backend cannot be replayed in a CUDA graph"
    return None


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (at most 512)."""
    limit = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4, 8) if s <= limit]
    sizes += list(range(16, limit + 1, 8))
    if limit not in sizes:
        sizes.append(-(-limit // 8) * 8 if limit > 8 else limit)
    return sorted(set(sizes))


class CudaGraphRunner:
    """Owns the captured decode graphs and their shared memory pool.

    The graphs read the model runner's step buffers, so its input preparation is all a replay
    needs. A decode step of ``n`` requests replays the smallest graph of size ``>= n``;
    rows past ``n`` are padding whose slot is -1 (nothing written) and whose context is one
    token. Attention kernels read each row's length from ``seq_lens``, so one capture serves
    every context length up to max_model_len.
    """

    def __init__(
        self,
        model: nn.Module,
        attn: AttentionBackend,
        buffers: StepBuffers,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.attn = attn
        self.buffers = buffers
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_size = self.sizes[-1]
        self.max_model_len = max_model_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # Kept alive: tensors a backend's prepare() made are read by the graphs by address.
        self.metadata: dict[int, AttentionMetadata] = {}

    def size_for(self, num_reqs: int) -> Optional[int]:
        """The graph that serves a decode batch of ``num_reqs``, or None (run eagerly)."""
        if num_reqs > self.max_size:
            return None
        return next(s for s in self.sizes if s >= num_reqs)

    def _metadata(self, size: int) -> AttentionMetadata:
        buf = self.buffers
        return AttentionMetadata(
            num_actual_tokens=size,
            num_reqs=size,
            query_start_loc=buf.query_start_loc[1][: size + 1],
            seq_lens=buf.seq_lens[1][:size],
            block_table=buf.block_table[:size],
            slot_mapping=buf.slot_mapping[1][:size],
            max_query_len=1,
            # Sized for the longest context: the kernels bound each row by its own seq_len.
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=torch.arange(size + 1, dtype=torch.int32),
            seq_lens_cpu=torch.full((size,), self.max_model_len, dtype=torch.int32),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        buf = self.buffers
        # Inputs that are safe to run: one token per row, attending to one slot, writing none.
        n = self.max_size
        buf.input_ids[1][:n].zero_()
        buf.positions[1][:n].zero_()
        buf.slot_mapping[1][:n].fill_(-1)
        buf.seq_lens[1][:n].fill_(1)
        buf.query_start_loc[1][: n + 1].copy_(torch.arange(n + 1, dtype=torch.int32))
        buf.block_table.zero_()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        # Largest first, so the smaller graphs fit in the memory the largest reserved.
        for size in reversed(self.sizes):
            meta = self._metadata(size)
            self.attn.prepare(meta)
            args = (buf.input_ids[1][:size], buf.positions[1][:size], self.kv_caches, meta)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: compile kernels, allocate workspaces
                    self.model(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self.model(*args)
            self.graphs[size], self.outputs[size], self.metadata[size] = graph, out, meta
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (sizes %s)", len(self.sizes), self.sizes)

    def replay(self, size: int) -> torch.Tensor:
        """Runs the graph of ``size`` on what the step buffers hold; returns its hidden states."""
        self.graphs[size].replay()
        return self.outputs[size]
