"""The channel rank 0 drives the worker ranks through: one command per call, pickled into a
buffer that one gloo broadcast hands to every worker (a group of its own, beside the model's)."""

from __future__ import annotations

import datetime
import pickle
import struct
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

# A worker waits for its next command as long as the engine stays idle: this group's waits
# never time out (a dead rank 0 closes the connection, and the worker also watches its
# parent); rank 0 bounds its own waits with timeout_s, and the model's collectives keep
# distributed_timeout_seconds.
_IDLE_FOREVER = datetime.timedelta(days=3650)

# One broadcast of this many bytes carries a command: a decode step's diff of a few hundred
# requests fits (about 50 bytes a request), so a step costs one collective; a larger message
# (new requests' prompts) sends its remainder in a second one, whose size the first gives.
CAPACITY = 64 * 1024
_HEADER = struct.Struct("<q")  # the pickled message's length

# Commands, with their argument.
NUM_BLOCKS = "num_blocks"  # None; every rank then takes part in min_over_ranks
INIT_KV_CACHE = "init_kv_cache"  # the number of blocks
CAPTURE_GRAPHS = "capture_graphs"  # None
TIME_FORWARDS = "time_forwards"  # None (the speculation controller's start-up timings)
EXECUTE = "execute"  # (the step's SchedulerOutput, rank 0's tokens of the step before or None)
LAUNCH = "launch"  # the step's SchedulerOutput (async scheduling: its tokens come within it)
STOP = "stop"  # None


class ControlChannel:
    """Rank 0 ``send``s (command, argument); every other rank ``receive``s it. Made by every
    rank together, after torch.distributed is set up.

    A send returns once its broadcast is under way (gloo's own threads finish it while rank 0
    goes on with its part of the step); the next send, or ``flush``, first waits for it to
    complete, up to ``timeout_s``: a worker that hangs between steps is found there, or by the
    model's next collective, whichever times out first."""

    def __init__(self, timeout_s: float) -> None:
        self.group = dist.new_group(backend="gloo", timeout=_IDLE_FOREVER)
        self.timeout_s = timeout_s
        self._buffer = torch.zeros(CAPACITY, dtype=torch.uint8)
        self._view = self._buffer.numpy()  # the same bytes, written and read in place
        self._in_flight: list[tuple[dist.Work, str]] = []
        self._spill: Optional[torch.Tensor] = None  # kept alive while its broadcast runs

    def flush(self, timeout_s: Optional[float] = None) -> None:
        """Waits until every worker has taken the messages sent so far; raises TimeoutError
        after ``timeout_s`` (default: the channel's)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        while self._in_flight:
            work, command = self._in_flight[0]
            _wait(work, timeout_s, f"tensor-parallel workers did not take the {command!r} "
                                   f"command within {timeout_s} s")
            self._in_flight.pop(0)
        self._spill = None

    def send(self, command: str, argument: Any = None,
             timeout_s: Optional[float] = None) -> None:
        """Starts handing the message to every worker, once the one before has arrived
        (waiting up to ``timeout_s`` for that, default: the channel's)."""
        self.flush(timeout_s)
        data = pickle.dumps((command, argument), protocol=pickle.HIGHEST_PROTOCOL)
        first = min(len(data), CAPACITY - _HEADER.size)
        _HEADER.pack_into(self._view, 0, len(data))
        self._view[_HEADER.size:_HEADER.size + first] = np.frombuffer(data, np.uint8, first)
        self._in_flight.append(
            (dist.broadcast(self._buffer, src=0, group=self.group, async_op=True), command))
        if first < len(data):
            self._spill = torch.frombuffer(bytearray(data[first:]), dtype=torch.uint8)
            self._in_flight.append(
                (dist.broadcast(self._spill, src=0, group=self.group, async_op=True), command))

    def receive(self) -> tuple[str, Any]:
        dist.broadcast(self._buffer, src=0, group=self.group)
        (size,) = _HEADER.unpack_from(self._view)
        if size <= CAPACITY - _HEADER.size:  # unpickling copies out what it keeps
            return pickle.loads(self._view[_HEADER.size:_HEADER.size + size])
        rest = torch.empty(size - (CAPACITY - _HEADER.size), dtype=torch.uint8)
        dist.broadcast(rest, src=0, group=self.group)
        return pickle.loads(self._view[_HEADER.size:].tobytes() + rest.numpy().tobytes())

    def min_over_ranks(self, value: int, timeout_s: Optional[float] = None) -> int:
        """The smallest of every rank's ``value``; rank 0 waits up to ``timeout_s`` (default:
        the channel's) for the others."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        t = torch.tensor([value], dtype=torch.int64)
        work = dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group, async_op=True)
        _wait(work, timeout_s, f"tensor-parallel workers did not report their KV cache size "
                               f"within {timeout_s} s")
        return int(t.item())


def _wait(work: dist.Work, timeout_s: float, message: str) -> None:
    try:
        work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        # gloo says a wait ran out only in its message; a closed connection is not a timeout.
        if "timed out" in str(e):
            raise TimeoutError(message) from e
        raise
