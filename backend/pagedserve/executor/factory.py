"""The executor that the engine arguments ask for."""

from __future__ import annotations

from pagedserve.config import EngineConfig
from pagedserve.executor.base import Executor
from pagedserve.executor.mp_executor import MultiprocExecutor
from pagedserve.models.model_config import ModelConfig


def make_executor(config: EngineConfig, model_config: ModelConfig) -> Executor:
    """The executor ``config.executor_backend`` names (distributed_executor_backend, auto
    resolved); ``model_config`` is already split over tensor_parallel_size ranks."""
    if config.executor_backend == "ray":
        # Imported here: ray is an optional dependency, and slow to import.
        from pagedserve.executor.ray_executor import RayExecutor

        return RayExecutor(config, model_config)
    if config.executor_backend == "mp":
        return MultiprocExecutor(config, model_config)
    return Executor(config, model_config)
