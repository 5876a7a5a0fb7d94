"""The tensor-parallel group a model's layers talk through, and its set-up on torch.distributed.

A group of one rank is the default everywhere: its collectives return their input untouched, so
a model built without tensor parallelism runs exactly the code (and the numbers) it did before.
"""

from __future__ import annotations

import datetime
from typing import Any, Optional

import torch
import torch.distributed as dist


class CollectiveError(dist.DistError):
    """A collective of the model's ranks failed: a rank went away, or one did not join within
    the group's timeout. gloo reports both as a bare RuntimeError, which reads like any bug."""


class TensorParallelGroup:
    """The ranks one model is split over: this process's ``rank`` of ``world_size``, and the
    collectives its layers need. ``process_group`` is torch.distributed's group (None: the
    default group; unused with one rank)."""

    def __init__(self, rank: int = 0, world_size: int = 1,
                 process_group: Optional[Any] = None) -> None:
        if world_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a tensor-parallel group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group

    def __repr__(self) -> str:
        return f"TensorParallelGroup(rank={self.rank}, world_size={self.world_size})"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks (in place where there are several)."""
        if self.world_size == 1:
            return x
        try:
            dist.all_reduce(x, group=self.process_group)
        except RuntimeError as e:
            raise CollectiveError(f"all_reduce over {self.world_size} ranks failed: {e}") from e
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim``, in rank order."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        try:
            dist.all_gather(parts, x, group=self.process_group)
        except RuntimeError as e:
            raise CollectiveError(f"all_gather over {self.world_size} ranks failed: {e}") from e
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``src``'s ``x`` on every rank (received into ``x`` in place elsewhere)."""
        if self.world_size == 1:
            return x
        try:
            dist.broadcast(x, src=src, group=self.process_group)
        except RuntimeError as e:
            raise CollectiveError(f"broadcast over {self.world_size} ranks failed: {e}") from e
        return x


SINGLE_RANK = TensorParallelGroup()


def rank_slice(size: int, rank: int, world_size: int, what: str) -> tuple[int, int]:
    """(start, length) of ``rank``'s equal share of ``size`` items; ``what`` names them in the
    error when they do not divide."""
    if size % world_size:
        raise ValueError(
            f"tensor_parallel_size {world_size} does not divide {what} ({size})"
        )
    share = size // world_size
    return rank * share, share


def init_tensor_parallel(
    world_size: int,
    rank: int,
    init_method: str,
    backend: Optional[str] = None,
    timeout_s: float = 60.0,
) -> TensorParallelGroup:
    """Joins this process to torch.distributed's default group (``init_method`` e.g.
    ``tcp://127.0.0.1:PORT``) and returns its tensor-parallel group. ``backend`` defaults to
    NCCL where CUDA is available and gloo otherwise; a collective that waits longer than
    ``timeout_s`` fails instead of hanging. With NCCL each rank selects its GPU
    (torch.cuda.set_device) first. One rank needs no torch.distributed at all."""
    if world_size == 1:
        return SINGLE_RANK
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method=init_method, world_size=world_size, rank=rank,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    elif (dist.get_world_size(), dist.get_rank()) != (world_size, rank):
        raise ValueError(
            f"torch.distributed is already set up as rank {dist.get_rank()} of "
            f"{dist.get_world_size()}, not rank {rank} of tensor_parallel_size {world_size}"
        )
    return TensorParallelGroup(rank, world_size)
