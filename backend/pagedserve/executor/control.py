"""The channel rank 0 drives the worker ranks through: one command per call, broadcast as a
pickled object on a gloo group of its own (torch.distributed's broadcast_object_list)."""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

# A worker waits for its next command as long as the engine stays idle: this group's waits
# never time out (a dead rank 0 closes the connection, and the worker also watches its
# parent); the model's own collectives keep distributed_timeout_seconds.
_IDLE_FOREVER = datetime.timedelta(days=3650)

# Commands, with their argument.
NUM_BLOCKS = "num_blocks"  # None; every rank then takes part in min_over_ranks
INIT_KV_CACHE = "init_kv_cache"  # the number of blocks
CAPTURE_GRAPHS = "capture_graphs"  # None
EXECUTE = "execute"  # the step's SchedulerOutput
STOP = "stop"  # None


class ControlChannel:
    """Rank 0 ``send``s (command, argument); every other rank ``receive``s it. Made by every
    rank together, after torch.distributed is set up."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo", timeout=_IDLE_FOREVER)

    def send(self, command: str, argument: Any = None) -> None:
        dist.broadcast_object_list([(command, argument)], src=0, group=self.group)

    def receive(self) -> tuple[str, Any]:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0, group=self.group)
        return message[0]

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's ``value``."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())
