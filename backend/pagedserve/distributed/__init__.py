"""Tensor parallelism's collectives: one model spread over ranks that talk through
torch.distributed (gloo on the CPU, NCCL on GPUs). Imports only torch and the standard library."""

from pagedserve.distributed.group import (
    SINGLE_RANK,
    CollectiveError,
    TensorParallelGroup,
    init_tensor_parallel,
    rank_slice,
)

__all__ = ["SINGLE_RANK", "CollectiveError", "TensorParallelGroup", "init_tensor_parallel",
           "rank_slice"]
