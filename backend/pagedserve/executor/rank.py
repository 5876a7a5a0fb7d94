"""One tensor-parallel rank's ModelRunner, in whichever process runs it."""

from __future__ import annotations

import dataclasses

import torch

from pagedserve.config import EngineConfig
from pagedserve.distributed import TensorParallelGroup
from pagedserve.models.model_config import ModelConfig
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.sampler import Sampler, SamplerOutput


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
