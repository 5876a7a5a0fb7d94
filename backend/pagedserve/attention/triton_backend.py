"""Paged attention through our Triton kernels: reshape_and_cache, then one unified launch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.attention.base import AttentionBackend, AttentionMetadata


@dataclass
class _TritonPlan:
    """The metadata tensors as the kernels want them (int32, on the device), sliced to the real
    requests once per forward rather than in every layer."""

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


class TritonAttentionBackend(AttentionBackend):
    """The default backend on CUDA: a single kernel serves any mix of prefill chunks and decodes
    (split-KV for long-context decode), so one forward costs two launches per layer. An fp8
    cache is quantized by the write kernel and dequantized inside the attention kernel."""

    name = "triton"
    # prepare() slices the runner's step buffers into views and forward() launches kernels that
    # read them, so a replay sees each step's values (tests/gpu: graphs equal eager).
    cuda_graph_safe = True

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, block_size)
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"the triton attention backend needs a power-of-two head_dim >= 16, "
                             f"got {head_dim}")
        if block_size & (block_size - 1):
            raise ValueError(f"the triton attention backend needs a power-of-two block_size, "
                             f"got {block_size}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads "
                             f"{num_kv_heads}")
        # Imported here so that merely naming the backend never imports Triton.
        from pagedserve_kernels import ops

        self._ops = ops

    def prepare(self, metadata: AttentionMetadata) -> None:
        n = metadata.num_reqs
        block_table = _int32(metadata.block_table[:n])
        if block_table.stride(-1) != 1:
            block_table = block_table.contiguous()
        metadata.plan = _TritonPlan(
            query_start_loc=_int32(metadata.query_start_loc[: n + 1]),
            seq_lens=_int32(metadata.seq_lens[:n]),
            block_table=block_table,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        plan: _TritonPlan = metadata.plan
        n = metadata.num_actual_tokens
        self._ops.reshape_and_cache(key[:n], value[:n], kv_cache, metadata.slot_mapping[:n],
                                    k_scale, v_scale)
        return self._ops.unified_attention(
            query, kv_cache, plan.query_start_loc, plan.seq_lens, plan.block_table,
            self.scale, metadata.max_query_len, metadata.max_seq_len, num_actual_tokens=n,
            k_scale=k_scale, v_scale=v_scale,
        )
