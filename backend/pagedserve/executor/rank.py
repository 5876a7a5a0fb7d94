"""One tensor-parallel rank's ModelRunner, in whichever process runs it."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Optional

import torch
import torch.distributed as dist

from pagedserve.config import EngineConfig
from pagedserve.distributed import TensorParallelGroup, init_tensor_parallel
from pagedserve.executor import control
from pagedserve.models.model_config import ModelConfig
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.sampler import Sampler, SamplerOutput

# How long the ranks may take to meet and to load their parts of the model (a large checkpoint
# takes minutes); a step's collectives have distributed_timeout_seconds.
STARTUP_TIMEOUT_S = 600.0


def join_ranks(world_size: int, rank: int, init_method: str,
               collective_timeout_s: float) -> TensorParallelGroup:
    """Joins torch.distributed (waiting up to STARTUP_TIMEOUT_S for the other ranks) and
    returns the group the model's collectives run on, whose waits end after
    ``collective_timeout_s``. Every rank calls it."""
    init_tensor_parallel(world_size, rank, init_method, timeout_s=STARTUP_TIMEOUT_S)
    if world_size == 1:
        return TensorParallelGroup()
    group = dist.new_group(timeout=datetime.timedelta(seconds=collective_timeout_s))
    return TensorParallelGroup(rank, world_size, group)


class RankZeroSampler:
    """Samples as ``sampler`` does, then replaces the tokens by rank 0's (broadcast): every
    rank samples from the same gathered logits, but an unseeded random draw may differ
    between processes, and each rank's batch must hold the tokens the engine saw. The
    logprobs stay each rank's own; only rank 0's are returned."""

    def __init__(self, sampler: Sampler, tp: TensorParallelGroup) -> None:
        self.sampler = sampler
        self.tp = tp

    def __call__(self, logits: torch.Tensor, metadata: object) -> SamplerOutput:
        out = self.sampler(logits, metadata)
        return dataclasses.replace(out, sampled=self.tp.broadcast(out.sampled.contiguous()))


def build_rank_runner(config: EngineConfig, model_config: ModelConfig,
                      tp: TensorParallelGroup) -> ModelRunner:
    """``tp``'s rank of the model, sampling rank 0's tokens when there are several ranks."""
    runner = ModelRunner(config, model_config, tp=tp)
    if tp.world_size > 1:
        runner.sampler = RankZeroSampler(runner.sampler, tp)
    return runner


def serve_worker_rank(config: EngineConfig, model_config: ModelConfig, rank: int,
                      init_method: str, num_threads: int, cuda_device: Optional[int]) -> None:
    """A worker rank's life once its process runs (an mp worker process or a Ray actor): join
    the ranks, build its runner, serve rank 0's commands until told to stop, leave.
    ``cuda_device`` is the GPU it runs on (on CUDA), ``num_threads`` as many as rank 0 uses."""
    torch.set_num_threads(num_threads)
    if config.device == "cuda" and cuda_device is not None:
        torch.cuda.set_device(cuda_device)
    args = config.args
    tp = join_ranks(args.tensor_parallel_size, rank, init_method,
                    args.distributed_timeout_seconds)
    channel = control.ControlChannel(args.distributed_timeout_seconds)
    runner = build_rank_runner(config, model_config, tp)
    control.serve_commands(channel, runner, rank)
    dist.destroy_process_group()
