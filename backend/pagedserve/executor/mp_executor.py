"""The mp executor: rank 0 in the engine's process, ranks 1..tp-1 in worker processes on this
machine (started with spawn), all joined by torch.distributed (gloo on the CPU, NCCL on GPUs).

Each step rank 0 broadcasts the SchedulerOutput to the workers over the control channel, then
every rank runs it: the ranks' collectives meet inside the model. Only rank 0 samples; its
tokens ride to the workers with the next step's message (see rank.py), so a step costs one
control broadcast besides the model's own collectives. A worker that dies fails the next step
at once (its liveness is checked before each command, and gloo reports the closed connection
within a step); one that hangs fails it after distributed_timeout_seconds."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist

from pagedserve.config import EngineConfig
from pagedserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedserve.executor import control
from pagedserve.executor.base import Executor
from pagedserve.executor.mp_worker import worker_main
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

_STOP_GRACE_S = 5.0  # a worker told to stop gets this long before it is killed
_DEATH_NOTICE_S = 1.0  # after a failed collective: how long a dying worker may take to exit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Workers:
    """The worker processes and whether they may still be talked to; what shutdown (or the
    finalizer, when the executor is dropped without one) needs, and nothing that refers
    back to the executor."""

    def __init__(self, processes: list[multiprocessing.process.BaseProcess]) -> None:
        self.processes = processes
        self.channel: Optional[control.ControlChannel] = None
        self.healthy = True

    def first_dead(self, wait_s: float = 0.0) -> Optional[str]:
        """Says which worker has exited, waiting up to ``wait_s`` for one to; None if all
        are alive."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, p in enumerate(self.processes, start=1):
                if p.exitcode is not None:
                    how = (f"killed by signal {-p.exitcode}" if p.exitcode < 0
                           else f"exit code {p.exitcode}")
                    return f"tensor-parallel worker rank {rank} (pid {p.pid}) died ({how})"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def stop(self) -> None:
        """Asks the workers to stop if they can still hear it, kills any that do not, and
        leaves torch.distributed; idempotent."""
        told = False
        if self.healthy and self.channel is not None and self.first_dead() is None:
            # A worker that went away meanwhile is killed below.
            with contextlib.suppress(Exception):
                self.channel.send(control.STOP, timeout_s=_STOP_GRACE_S)
                told = True
        self.healthy = False
        # Out of step, the workers cannot hear a stop: they are killed at once.
        deadline = time.monotonic() + (_STOP_GRACE_S if told else 0.0)
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.exitcode is None:
                p.kill()
                p.join()
        self.channel = None
        if self.processes and dist.is_initialized():  # one rank never set it up
            dist.destroy_process_group()


class MultiprocExecutor(Executor):
    """Rank 0 here, the other ranks in spawned worker processes (see the module's doc)."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        args = config.args
        world = args.tensor_parallel_size
        if world > 1 and dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already set up in this process (another engine with "
                "tensor_parallel_size > 1 is alive?): shut it down before starting this one"
            )
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        spawn = multiprocessing.get_context("spawn")
        started = [spawn.Event() for _ in range(1, world)]
        self._workers = _Workers([
            spawn.Process(
                target=worker_main, name=f"pagedserve-tp-rank{rank}", daemon=True,
                args=(config, model_config, rank, init_method, torch.get_num_threads(),
                      os.getpid(), started[rank - 1]),
            )
            for rank in range(1, world)
        ])
        for p in self._workers.processes:
            p.start()
        # Stops the workers when the executor is dropped without shutdown() (and at exit).
        self._finalizer = weakref.finalize(self, self._workers.stop)
        try:
            self._wait_started(started)
            tp = join_ranks(world, 0, init_method, args.distributed_timeout_seconds)
            if world > 1:
                self._workers.channel = control.ControlChannel(
                    args.distributed_timeout_seconds)
            runner = build_rank_runner(config, model_config, tp)
        except BaseException as e:
            dead = self._workers.first_dead(_DEATH_NOTICE_S)
            self.shutdown()
            if dead is not None:
                raise RuntimeError(f"starting the tensor-parallel ranks failed: {dead}") from e
            raise
        super().__init__(config, model_config, runner)
        self._sampled: Optional[RankZeroTokens] = None  # the workers take them next step

    def _wait_started(self, started: list[Any]) -> None:
        """Waits until every worker has imported what it needs, failing at once if one dies
        first (else the rendezvous would wait out its whole timeout)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for event in started:
            while not event.wait(0.1):
                dead = self._workers.first_dead()
                if dead is not None:
                    raise RuntimeError(dead)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tensor-parallel workers did not start within "
                                       f"{STARTUP_TIMEOUT_S} s")

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' ids, rank 1 first."""
        return [p.pid for p in self._workers.processes]

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
            dead = workers.first_dead(_DEATH_NOTICE_S)
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

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        output = self._on_all_ranks(control.EXECUTE, (sched, self._sampled),
                                    lambda: self.runner.execute_model(sched))
        self._sampled = rank_zero_tokens(self.runner, output)
        return output

    def launch(self, sched: SchedulerOutput) -> Optional[LaunchedStep]:
        if self._workers.processes:
            raise RuntimeError("async scheduling is off with tensor_parallel_size > 1")
        return super().launch(sched)

    def shutdown(self) -> None:
        self._finalizer()
