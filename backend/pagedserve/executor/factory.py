"""The executor that the engine arguments ask for."""

from __future__ import annotations

from pagedserve.config import EngineConfig
from pagedserve.executor.base import Executor
from pagedserve.executor.mp_executor import MultiprocExecutor
from pagedserve.models.model_config import ModelConfig


def make_executor(config: EngineConfig, model_config: ModelConfig) -> Executor:
    """The executor ``config.args`` asks for (distributed_executor_backend, auto resolved:
    uni for one rank, mp for several); ``model_config`` is already split over
    tensor_parallel_size ranks."""
    if config.args.executor_backend == "mp":
        return MultiprocExecutor(config, model_config)
    return Executor(config, model_config)
