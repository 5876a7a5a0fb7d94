"""A worker rank of the Ray executor: one tensor-parallel rank (1..tp-1) in a Ray actor, on
whichever node of the cluster its placement-group bundle landed. The rank's life is the mp
worker's (rank.serve_worker_rank); only its start differs."""

from __future__ import annotations

import os

import ray

from pagedserve.config import EngineConfig
from pagedserve.executor.rank import serve_worker_rank
from pagedserve.models.model_config import ModelConfig


class RankActor:
    """The actor's class (made remote by the executor): ``where`` once it runs, then one
    long ``serve`` call that returns when rank 0 sends STOP. Ray ends the actor with its
    owner, the engine's process (a non-detached actor), so no rank outlives the engine."""

    def where(self) -> tuple[int, str, list[str]]:
        """This process's pid, its node's IP address and the GPUs Ray gave it."""
        return os.getpid(), ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]

    def serve(self, config: EngineConfig, model_config: ModelConfig, rank: int,
              init_method: str, num_threads: int) -> None:
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU: config.devices says 0.
        serve_worker_rank(config, model_config, rank, init_method, num_threads)
