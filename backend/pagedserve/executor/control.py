"""The channel rank 0 drives the worker ranks through: one command per call, broadcast as a
pickled object on a gloo group of its own (torch.distributed's broadcast_object_list), and the
loop every worker rank serves those commands with, whichever executor started it."""

from __future__ import annotations

import datetime
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from pagedserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

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
    rank together, after torch.distributed is set up.

    A send completes only once every worker has taken the message, and this group never
    times out: rank 0 sends from a thread of its own and gives up after ``timeout_s``
    (a worker that hangs between steps), leaving that thread blocked until the workers are
    killed."""

    def __init__(self, timeout_s: float) -> None:
        self.group = dist.new_group(backend="gloo", timeout=_IDLE_FOREVER)
        self.timeout_s = timeout_s
        self._outbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._sent: queue.SimpleQueue[Optional[BaseException]] = queue.SimpleQueue()
        self._sender: Optional[threading.Thread] = None

    def _send_forever(self) -> None:
        while True:
            message = self._outbox.get()
            try:
                dist.broadcast_object_list([message], src=0, group=self.group)
            except BaseException as e:  # handed to the caller, which raises it
                self._sent.put(e)
                return
            self._sent.put(None)

    def send(self, command: str, argument: Any = None,
             timeout_s: Optional[float] = None) -> None:
        """Hands the message to every worker; raises TimeoutError after ``timeout_s``
        (default: the channel's)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_forever, daemon=True,
                                            name="pagedserve-tp-control")
            self._sender.start()
        self._outbox.put((command, argument))
        try:
            error = self._sent.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(
                f"tensor-parallel workers did not take the {command!r} command within "
                f"{timeout_s} s") from None
        if error is not None:
            raise error

    def receive(self) -> tuple[str, Any]:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0, group=self.group)
        return message[0]

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's ``value``."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


def serve_commands(channel: ControlChannel, runner: ModelRunner, rank: int) -> None:
    """A worker rank's part of every command rank 0 sends, until it sends STOP."""
    while True:
        command, argument = channel.receive()
        if command == EXECUTE:
            runner.execute_model(argument)
            runner.take_failures()  # rank 0 reports them; here they only must not pile up
        elif command == NUM_BLOCKS:
            try:
                num_blocks = runner.determine_num_blocks()
            except ValueError:
                logger.exception("tensor-parallel rank %d: sizing the KV cache failed", rank)
                num_blocks = -1
            channel.min_over_ranks(num_blocks)
        elif command == INIT_KV_CACHE:
            runner.initialize_kv_cache(argument)
        elif command == CAPTURE_GRAPHS:
            runner.capture_graphs()
        elif command == STOP:
            return
        else:
            raise ValueError(f"tensor-parallel rank {rank} got an unknown command {command!r}")
