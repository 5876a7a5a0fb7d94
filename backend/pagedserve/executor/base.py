"""The interface LLMEngine runs the model through, and the one-process executor (uni)."""

from __future__ import annotations

from typing import Optional

from pagedserve.config import EngineConfig
from pagedserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedserve.errors import RequestError
from pagedserve.models.model_config import ModelConfig
from pagedserve.worker.model_runner import LaunchedStep, ModelRunner
from pagedserve.worker.spec_timing import SpecTiming


class Executor:
    """Runs the model for the engine: sizing and allocating the KV cache, capturing graphs,
    and each scheduled step. ``runner`` is rank 0's ModelRunner, in this process; its tokens
    are the ones that count. This base class is the one-rank executor (uni): every call goes
    straight to ``runner``, exactly as the engine called the runner before the seam."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig,
                 runner: Optional[ModelRunner] = None) -> None:
        self.config = config
        self.runner = runner if runner is not None else ModelRunner(config, model_config)

    # ---- start-up ------------------------------------------------------------------------

    def determine_num_blocks(self) -> int:
        """KV cache blocks every rank can hold (the minimum over ranks)."""
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def capture_graphs(self) -> None:
        self.runner.capture_graphs()

    def time_forwards(self) -> list[tuple[int, float]]:
        return self.runner.time_forwards()

    # ---- steps ---------------------------------------------------------------------------

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Runs one step on every rank and returns rank 0's tokens."""
        return self.runner.execute_model(sched)

    def launch(self, sched: SchedulerOutput) -> Optional[LaunchedStep]:
        """Queues one step without waiting for its tokens (async scheduling)."""
        return self.runner.launch(sched)

    def collect(self, launched: LaunchedStep) -> ModelRunnerOutput:
        return self.runner.collect(launched)

    @property
    def failures(self) -> dict[str, RequestError]:
        """Requests whose own work failed in the latest step (see ModelRunner.failures)."""
        return self.runner.failures

    def take_failures(self) -> dict[str, RequestError]:
        return self.runner.take_failures()

    @property
    def spec_timing(self) -> SpecTiming:
        return self.runner.spec_timing

    # ---- the end -------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stops whatever runs the other ranks; idempotent. Nothing to stop with one rank."""

