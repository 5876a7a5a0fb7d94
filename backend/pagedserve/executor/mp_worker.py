"""A worker process of the mp executor: one tensor-parallel rank (1..tp-1) that runs every
command rank 0 sends until told to stop, or until its parent is gone."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.executor.rank import serve_worker_rank
from pagedserve.models.model_config import ModelConfig

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
    serve_worker_rank(config, model_config, rank, init_method, num_threads)
