"""The mp executor: rank 0 in the engine's process, ranks 1..tp-1 in worker processes on this
machine (started with spawn); the steps, failures and shutdown are multi_rank's."""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any, Optional

import torch

from pagedserve.config import EngineConfig
from pagedserve.executor.mp_worker import worker_main
from pagedserve.executor.multi_rank import (
    MultiRankExecutor,
    RankWorkers,
    free_port,
    refuse_second_group,
)
from pagedserve.executor.rank import STARTUP_TIMEOUT_S
from pagedserve.models.model_config import ModelConfig


class _Workers(RankWorkers):
    """The worker processes, with the Events they set once their imports are done."""

    def __init__(self, processes: list[multiprocessing.process.BaseProcess],
                 started: list[Any]) -> None:
        super().__init__(len(processes))
        self.processes = processes
        self.started = started

    def wait_started(self) -> None:
        """Waits until every worker has imported what it needs, failing at once if one dies
        first (else the rendezvous would wait out its whole timeout)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for event in self.started:
            while not event.wait(0.1):
                dead = self.first_dead()
                if dead is not None:
                    raise RuntimeError(dead)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tensor-parallel workers did not start within "
                                       f"{STARTUP_TIMEOUT_S} s")

    def first_dead(self, wait_s: float = 0.0) -> Optional[str]:
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

    def _end(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.exitcode is None:
                p.kill()
                p.join()


class MultiprocExecutor(MultiRankExecutor):
    """Rank 0 here, the other ranks in spawned worker processes (see the module's doc)."""

    _workers: _Workers

    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        world = config.args.tensor_parallel_size
        refuse_second_group(world)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        spawn = multiprocessing.get_context("spawn")
        started = [spawn.Event() for _ in range(1, world)]
        workers = _Workers([
            spawn.Process(
                target=worker_main, name=f"pagedserve-tp-rank{rank}", daemon=True,
                args=(config, model_config, rank, init_method, torch.get_num_threads(),
                      os.getpid(), started[rank - 1]),
            )
            for rank in range(1, world)
        ], started)
        for p in workers.processes:
            p.start()
        super().__init__(config, model_config, workers, init_method)

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' ids, rank 1 first."""
        return [p.pid for p in self._workers.processes]
