"""The attention-backend interface: how a model layer reads and writes the paged KV cache.

KV cache layout, per layer: one tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = keys, 1 = values). Token ``t`` of a request lives in slot
``block_table[i, t // block_size] * block_size + t % block_size``; ``slot_mapping`` holds that slot
for every scheduled token, or -1 for a padded row that must not be written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class AttentionMetadata:
    """One forward's batch as attention sees it: requests in order, their tokens flattened.

    Request ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``; those are its
    positions ``seq_lens[i] - q_len_i ... seq_lens[i] - 1``, so a prefill chunk attends causally
    within itself and to everything cached before it.
    """

    num_actual_tokens: int  # rows past this are padding (CUDA-graph batches)
    num_reqs: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, on the device
    seq_lens: torch.Tensor  # [num_reqs] int32, context length including this step's tokens
    block_table: torch.Tensor  # [num_reqs, max_blocks_per_req] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = do not write
    max_query_len: int
    max_seq_len: int
    # Host copies, for backends that plan on the CPU (torch reference, FlashInfer).
    query_start_loc_cpu: Optional[torch.Tensor] = None
    seq_lens_cpu: Optional[torch.Tensor] = None
    # Per-backend plan (e.g. FlashInfer wrappers, padded gather indices); built by prepare().
    plan: Optional[object] = None

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Owns one way of computing paged attention; one instance serves every layer of a model
    (per-layer state, the KV-cache scales, lives in each layer's ``attention.layer.Attention``)."""

    name: str = "abstract"
    # Whether a decode step through this backend can be captured in a CUDA graph and replayed
    # with new inputs: prepare() must run outside the graph, and forward() may only read the
    # metadata's tensors and plan in place (no host syncs, no tensors rebuilt per step). A
    # backend that has not been shown to be safe says False, and the runner runs it eagerly.
    cuda_graph_safe: bool = False

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.block_size = block_size

    def prepare(self, metadata: AttentionMetadata) -> None:
        """Called once per forward before the layers run; may fill ``metadata.plan``."""

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Writes this step's keys/values into their slots, then attends. An fp8 ``kv_cache``
        stores ``key / k_scale`` and ``value / v_scale`` and is read back times the scales;
        for any other cache the scales are ignored."""
