"""CUDA graphs for uniform decode steps: capture once per batch size and query length (1, and
1 + k with speculation), replay with new inputs."""

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
    needs. A step of ``n`` requests that each compute ``q`` tokens (a decode: q = 1; a decode
    verifying k drafts: q = 1 + k) replays the smallest graph of size ``>= n`` for that q;
    rows past ``n`` are padding whose slots are -1 (nothing written) and whose context is its
    own q tokens. Attention kernels read each row's length from ``seq_lens``, so one capture
    serves every context length up to max_model_len.
    """

    def __init__(
        self,
        model: nn.Module,
        attn: AttentionBackend,
        buffers: StepBuffers,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
        query_lens: tuple[int, ...] = (1,),
    ) -> None:
        self.model = model
        self.attn = attn
        self.buffers = buffers
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_size = self.sizes[-1]
        self.max_model_len = max_model_len
        self.query_lens = tuple(sorted(set(query_lens)))
        # By (batch size, query length).
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # The forward's output: hidden states, or (hidden, aux) for an EAGLE-3 head.
        self.outputs: dict[tuple[int, int], torch.Tensor | tuple[torch.Tensor, ...]] = {}
        # Kept alive: tensors a backend's prepare() made are read by the graphs by address.
        self.metadata: dict[tuple[int, int], AttentionMetadata] = {}

    def size_for(self, num_reqs: int, query_len: int = 1) -> Optional[int]:
        """The graph that serves ``num_reqs`` requests of ``query_len`` tokens each, or None
        (run eagerly)."""
        if num_reqs > self.max_size or query_len not in self.query_lens:
            return None
        return next(s for s in self.sizes if s >= num_reqs)

    def _metadata(self, size: int, query_len: int) -> AttentionMetadata:
        buf = self.buffers
        tokens = size * query_len
        return AttentionMetadata(
            num_actual_tokens=tokens,
            num_reqs=size,
            query_start_loc=buf.query_start_loc[1][: size + 1],
            seq_lens=buf.seq_lens[1][:size],
            block_table=buf.block_table[:size],
            slot_mapping=buf.slot_mapping[1][:tokens],
            max_query_len=query_len,
            # Sized for the longest context: the kernels bound each row by its own seq_len.
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=torch.arange(size + 1, dtype=torch.int32) * query_len,
            seq_lens_cpu=torch.full((size,), self.max_model_len, dtype=torch.int32),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        buf = self.buffers
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        # Largest first, so the smaller graphs fit in the memory the largest reserved.
        keys = sorted(((size, q) for size in self.sizes for q in self.query_lens),
                      key=lambda key: key[0] * key[1], reverse=True)
        for size, q in keys:
            # Inputs that are safe to run: q tokens per row attending to themselves, writing
            # nothing.
            n = size * q
            buf.input_ids[1][:n].zero_()
            buf.positions[1][:n].zero_()
            buf.slot_mapping[1][:n].fill_(-1)
            buf.seq_lens[1][:size].fill_(q)
            buf.query_start_loc[1][: size + 1].copy_(
                torch.arange(size + 1, dtype=torch.int32) * q)
            buf.block_table.zero_()
            meta = self._metadata(size, q)
            self.attn.prepare(meta)
            args = (buf.input_ids[1][:n], buf.positions[1][:n], self.kv_caches, meta)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: compile kernels, allocate workspaces
                    self.model(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self.model(*args)
            key = (size, q)
            self.graphs[key], self.outputs[key], self.metadata[key] = graph, out, meta
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (sizes %s, query lengths %s)",
                    len(self.graphs), self.sizes, self.query_lens)

    def replay(self, size: int,
               query_len: int = 1) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Runs the graph of ``size`` requests of ``query_len`` tokens on what the step buffers
        hold; returns its output (the model's forward's: overwritten by the next replay)."""
        key = (size, query_len)
        self.graphs[key].replay()
        return self.outputs[key]
