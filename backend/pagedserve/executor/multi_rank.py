"""What the executors with worker ranks share (mp: processes, ray: Ray actors): rank 0 in the
engine's process drives ranks 1..tp-1 over the control channel, all joined by
torch.distributed (gloo on the CPU, NCCL on GPUs).

Each step rank 0 broadcasts the SchedulerOutput to the workers over the control channel, then
every rank runs it: the ranks' collectives meet inside the model. Only rank 0 samples (and
proposes and verifies drafts, which reach the workers in the step that verifies them); its
tokens ride to the workers with the next step's message (see rank.py), so a step costs one
control broadcast besides the model's own collectives. With async scheduling that message
leaves before the step's tokens reach rank 0's host: they go to the workers' devices within
the step instead (one more collective, rank.SampledTokenShare). A worker that dies fails the
next step at once (its liveness is checked before each command, and gloo reports the closed
connection within a step); one that hangs fails it after distributed_timeout_seconds. How
workers are started, watched and stopped is the ``RankWorkers`` subclass's business."""

from __future__ import annotations

import contextlib
import socket
import weakref
from collections.abc import Callable
from typing import Any, Optional, TypeVar

import torch.distributed as dist

from pagedserve.config import EngineConfig
from pagedserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedserve.executor import control
from pagedserve.executor.base import Executor
from pagedserve.executor.rank import (
    STARTUP_TIMEOUT_S,
    RankZeroTokens,
    build_rank_runner,
    join_ranks,
    rank_zero_tokens,
)
from pagedserve.models.model_config import ModelConfig
from pagedserve.worker.model_runner import LaunchedStep

T = TypeVar("T")

STOP_GRACE_S = 5.0  # a worker told to stop gets this long before it is killed


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``host`` now: where rank 0 meets the others."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def refuse_second_group(world_size: int) -> None:
    """torch.distributed has one default group per process: a second engine with several
    ranks in this process cannot have its own."""
    if world_size > 1 and dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already set up in this process (another engine with "
            "tensor_parallel_size > 1 is alive?): shut it down before starting this one"
        )


class RankWorkers:
    """Ranks 1..tp-1, started, and whether they may still be talked to: what the executor's
    steps and shutdown (or the finalizer, when the executor is dropped without one) need,
    and nothing that refers back to the executor. Subclasses say how their workers are
    waited for, watched and ended."""

    # After a failed collective: how long a dying worker may take to be seen dead.
    death_notice_s = 1.0

    def __init__(self, size: int) -> None:
        self.size = size  # how many worker ranks (tp - 1)
        self.channel: Optional[control.ControlChannel] = None
        self.healthy = True

    def wait_started(self) -> None:
        """Returns once every worker runs its rank (before the ranks meet), raising at once
        if one fails first."""

    def first_dead(self, wait_s: float = 0.0) -> Optional[str]:
        """Says which worker has ended (rank, where, why), waiting up to ``wait_s`` for one
        to; None if all are alive. Must not block past ``wait_s``."""
        raise NotImplementedError

    def _end(self, grace_s: float) -> None:
        """Gives the workers ``grace_s`` to end by themselves, then ends the rest for good."""
        raise NotImplementedError

    def stop(self) -> None:
        """Asks the workers to stop if they can still hear it, ends any that do not, and
        leaves torch.distributed; idempotent."""
        told = False
        if self.healthy and self.channel is not None and self.first_dead() is None:
            # A worker that went away meanwhile is ended below.
            with contextlib.suppress(Exception):
                self.channel.send(control.STOP, timeout_s=STOP_GRACE_S)
                told = True
        self.healthy = False
        # Out of step, the workers cannot hear a stop: they are ended at once.
        self._end(STOP_GRACE_S if told else 0.0)
        self.channel = None
        if self.size and dist.is_initialized():  # one rank never set it up
            dist.destroy_process_group()


class MultiRankExecutor(Executor):
    """Rank 0 here, the others in ``workers`` (see the module's doc). Subclasses start the
    workers, joining ``init_method``, then call this constructor, which owns them from then
    on: it stops them when the executor is shut down or dropped, or its start fails."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, workers: RankWorkers,
                 init_method: str) -> None:
        args = config.args
        self._workers = workers
        # Stops the workers when the executor is dropped without shutdown() (and at exit).
        self._finalizer = weakref.finalize(self, workers.stop)
        try:
            workers.wait_started()
            tp = join_ranks(args.tensor_parallel_size, 0, init_method,
                            args.distributed_timeout_seconds)
            if workers.size:
                workers.channel = control.ControlChannel(args.distributed_timeout_seconds)
            runner = build_rank_runner(config, model_config, tp)
        except BaseException as e:
            dead = workers.first_dead(workers.death_notice_s)
            self.shutdown()
            if dead is not None:
                raise RuntimeError(f"starting the tensor-parallel ranks failed: {dead}") from e
            raise
        super().__init__(config, model_config, runner)
        self._sampled: Optional[RankZeroTokens] = None  # the workers take them next step

    def _on_all_ranks(self, command: str, argument: Any, local: Callable[[], T],
                      timeout_s: Optional[float] = None) -> T:
        """Sends ``command`` to the workers and runs rank 0's part (``local``). A failure
        leaves the executor unusable and names a worker that died, if one did."""
        workers = self._workers
        if not workers.healthy:
            raise RuntimeError("the tensor-parallel ranks are out of step after an earlier "
                               "failure")
        dead = workers.first_dead()
        if dead is not None:
            workers.healthy = False
            raise RuntimeError(dead)
        try:
            if workers.channel is not None:
                workers.channel.send(command, argument, timeout_s)
            return local()
        except Exception as e:
            workers.healthy = False
            dead = workers.first_dead(workers.death_notice_s)
            if dead is not None:
                raise RuntimeError(f"{dead}: {type(e).__name__}: {e}") from e
            if isinstance(e, (TimeoutError, dist.DistError)):  # all alive: one hangs
                raise RuntimeError(
                    "a tensor-parallel collective failed or waited longer than "
                    f"distributed_timeout_seconds ({self.config.args.distributed_timeout_seconds}"
                    f" s); is a worker hung? {type(e).__name__}: {e}") from e
            raise

    def _start_up(self, command: str, argument: Any, local: Callable[[], T]) -> T:
        """A start-up command: the workers may still be loading their part of the model."""
        return self._on_all_ranks(command, argument, local, STARTUP_TIMEOUT_S)

    def determine_num_blocks(self) -> int:
        def local() -> int:
            try:
                own = self.runner.determine_num_blocks()
            except ValueError:
                if self._workers.channel is not None:
                    # The workers wait for it.
                    self._workers.channel.min_over_ranks(-1, STARTUP_TIMEOUT_S)
                raise
            if self._workers.channel is None:
                return own
            smallest = self._workers.channel.min_over_ranks(own, STARTUP_TIMEOUT_S)
            if smallest < 0:
                raise ValueError("a tensor-parallel worker's KV cache does not hold one "
                                 "request of max_model_len (its log says why)")
            return smallest

        return self._start_up(control.NUM_BLOCKS, None, local)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._start_up(control.INIT_KV_CACHE, num_blocks,
                       lambda: self.runner.initialize_kv_cache(num_blocks))

    def capture_graphs(self) -> None:
        self._start_up(control.CAPTURE_GRAPHS, None, self.runner.capture_graphs)

    def time_forwards(self) -> list[tuple[int, float]]:
        # Every rank runs the forwards: their collectives meet.
        return self._on_all_ranks(control.TIME_FORWARDS, None, self.runner.time_forwards)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        output = self._on_all_ranks(control.EXECUTE, (sched, self._sampled),
                                    lambda: self.runner.execute_model(sched))
        self._sampled = rank_zero_tokens(self.runner, output)
        return output

    def launch(self, sched: SchedulerOutput) -> Optional[LaunchedStep]:
        # The workers launch it too, and take its tokens within it (SampledTokenShare).
        return self._on_all_ranks(control.LAUNCH, sched, lambda: self.runner.launch(sched))

    def shutdown(self) -> None:
        self._finalizer()
