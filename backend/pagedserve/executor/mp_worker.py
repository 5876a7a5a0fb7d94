"""A worker process of the mp executor: one tensor-parallel rank (1..tp-1) that runs every
command rank 0 sends until told to stop, or until its parent is gone."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from pagedserve.config import EngineConfig
from pagedserve.executor import control
from pagedserve.executor.rank import (
    STARTUP_TIMEOUT_S,
    build_rank_runner,
    join_ranks,
    select_device,
    take_rank_zero_tokens,
)
from pagedserve.models.model_config import ModelConfig

logger = logging.getLogger(__name__)

_PARENT_POLL_S = 0.5


def _exit_with_parent(parent_pid: int) -> None:
    """Ends this process once the engine's process is gone (killed, or it exited without
    shutting down), so that no worker outlives it: its pid is then no longer our parent."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="pagedserve-parent-watch", daemon=True).start()


def worker_main(config: EngineConfig, model_config: ModelConfig, rank: int, init_method: str,
                num_threads: int, parent_pid: int, started: Any) -> None:
    """The worker's whole life: join the group, build the rank's runner, serve commands.
    ``started`` (a multiprocessing Event) is set once the imports are done."""
    _exit_with_parent(parent_pid)
    started.set()
    torch.set_num_threads(num_threads)  # as many as the engine's own rank uses
    args = config.args
    select_device(config, rank)  # rank r on config.devices[r]
    tp = join_ranks(args.tensor_parallel_size, rank, init_method,
                    args.distributed_timeout_seconds)
    channel = control.ControlChannel(args.distributed_timeout_seconds)
    runner = build_rank_runner(config, model_config, tp)
    while True:
        command, argument = channel.receive()
        if command == control.EXECUTE:
            sched, rank_zero_tokens = argument
            take_rank_zero_tokens(runner, rank_zero_tokens)
            runner.execute_model(sched)
            runner.take_failures()  # rank 0 reports them; here they only must not pile up
        elif command == control.NUM_BLOCKS:
            try:
                num_blocks = runner.determine_num_blocks()
            except ValueError:
                logger.exception("tensor-parallel rank %d: sizing the KV cache failed", rank)
                num_blocks = -1
            channel.min_over_ranks(num_blocks, STARTUP_TIMEOUT_S)
        elif command == control.INIT_KV_CACHE:
            runner.initialize_kv_cache(argument)
        elif command == control.CAPTURE_GRAPHS:
            runner.capture_graphs()
        elif command == control.STOP:
            break
        else:
            raise ValueError(f"tensor-parallel rank {rank} got an unknown command {command!r}")
    dist.destroy_process_group()
