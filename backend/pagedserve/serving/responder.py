"""The thread that talks back to Triton: sends responses and polls clients for cancellation.

``InferenceResponseSender.send`` and ``is_cancelled`` are IPC round trips to the server
process. Doing them here, not on the event loop, lets the loop hand the next outputs out while
earlier ones are still being sent, and keeps cancellation polling off the loop entirely.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from pagedserve.serving.error_sender import ERROR_DELAY_S, ErrorSender

# How often an in-flight request's client is asked whether it cancelled. Each is_cancelled()
# is an IPC round trip (measured: ~75 us, ~40 us of it CPU in this process), so with hundreds
# of requests in flight a shorter period costs real throughput; the engine aborts the request
# within this period plus one step.
CANCEL_POLL_S = 0.5


@dataclass(eq=False)
class Inflight:
    """One Triton request from execute() until its final response is sent."""

    request_id: str
    sender: Any  # pb_utils.InferenceResponseSender
    arrival: float
    # Set on the event loop thread only: why the request is being stopped early, as the
    # (message, TritonError code name) of its final response.
    cancelled: Optional[tuple[str, str]] = None
    task: Any = None  # the asyncio.Task serving it, once started
    last_poll: float = 0.0
    cancel_seen: bool = False  # set on the responder thread only
    # Responses handed to the responder and responses it has sent; each has one writer (the
    # event loop, the responder thread), so their difference is safe to read anywhere.
    num_queued: int = 0
    num_sent: int = 0
    # Sent by a BLS model (tensorrt_llm_bls): python_backend r24.10 loses a BLS response's
    # error unless it is the first response (its shared-memory copy carries no request id, so
    # the caller's iterator never ends); such a request ends with a bare final flag instead,
    # which the caller reports as a stream that ended early.
    bls_caller: bool = False

    @property
    def backlogged(self) -> bool:
        return self.num_queued > self.num_sent


@dataclass
class _Outgoing:
    state: Inflight
    tensors: Optional[dict[str, np.ndarray]]
    error: Optional[tuple[str, str]]  # (message, TritonError code name)
    final: bool


class Responder:
    """Owns the response thread and the set of in-flight requests it polls for cancellation.

    ``on_cancelled(state)`` is called (on this thread) once for a request whose client has
    cancelled; it must hand the cancellation to the event loop.
    """

    def __init__(
        self,
        pb_utils: Any,
        on_cancelled: Callable[[Inflight], None],
        log_error: Callable[[str], None],
    ) -> None:
        self._pb = pb_utils
        self._on_cancelled = on_cancelled
        self._log_error = log_error
        self._queue: queue.SimpleQueue[Optional[_Outgoing]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._inflight: dict[int, Inflight] = {}
        self._drained = threading.Condition(self._lock)
        self._last_sweep = 0.0
        self._errors = ErrorSender(pb_utils, log_error)
        self._thread = threading.Thread(
            target=self._run, name="pagedserve-responder", daemon=True
        )
        self._thread.start()

    # ---- called from other threads ---------------------------------------------------------

    def track(self, state: Inflight) -> None:
        state.last_poll = time.monotonic()
        with self._lock:
            self._inflight[id(state)] = state

    def send(self, state: Inflight, tensors: dict[str, np.ndarray], final: bool) -> None:
        state.num_queued += 1
        self._queue.put(_Outgoing(state, tensors, None, final))

    def send_error(self, state: Inflight, message: str, code: str) -> None:
        """A final error response; ``code`` names a TritonError code (INVALID_ARG, ...).

        A rejection that would follow its request within ERROR_DELAY_S is held back that long
        (Triton 2.51 crashes on fast errors on some gRPC streams: serving/error_sender.py)."""
        if state.num_queued == 0 and time.monotonic() - state.arrival < ERROR_DELAY_S:
            # Sent by another thread, but never polled again: its first poll would be due
            # CANCEL_POLL_S after arrival, and it leaves _inflight now.
            self._errors.send(state.sender, message, code, state.arrival)
            self._done(state)
            return
        self._queue.put(_Outgoing(state, None, (message, code), True))

    def num_inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def inflight(self) -> list[Inflight]:
        with self._lock:
            return list(self._inflight.values())

    def wait_drained(self, timeout: float) -> bool:
        with self._drained:
            return self._drained.wait_for(lambda: not self._inflight, timeout=timeout)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._errors.stop()

    # ---- the thread ------------------------------------------------------------------------

    def _response(self, item: _Outgoing) -> Any:
        pb = self._pb
        if item.error is not None:
            message, code = item.error
            return pb.InferenceResponse(
                error=pb.TritonError(message, getattr(pb.TritonError, code))
            )
        tensors = [pb.Tensor(name, array) for name, array in item.tensors.items()]
        return pb.InferenceResponse(output_tensors=tensors)

    def _deliver(self, item: _Outgoing) -> None:
        flags = self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if item.final else 0
        try:
            if item.error is not None and item.state.bls_caller and item.state.num_sent:
                item.state.sender.send(flags=flags)  # see Inflight.bls_caller
            else:
                item.state.sender.send(self._response(item), flags=flags)
        except Exception as e:  # e.g. the client is gone; the request still has to end
            self._log_error(f"pagedserve: sending a response failed: {e!r}")
        if item.tensors is not None:
            item.state.num_sent += 1
        if item.final:
            self._done(item.state)

    def _done(self, state: Inflight) -> None:
        """The request's final response is sent (or handed on): no more polling for it."""
        with self._lock:
            self._inflight.pop(id(state), None)
            if not self._inflight:
                self._drained.notify_all()

    def _poll(self, now: float) -> None:
        if now - self._last_sweep < CANCEL_POLL_S / 2:
            return
        self._last_sweep = now
        with self._lock:
            due = [s for s in self._inflight.values()
                   if not s.cancel_seen and now - s.last_poll >= CANCEL_POLL_S]
        for state in due:
            state.last_poll = now
            try:
                cancelled = state.sender.is_cancelled()
            except Exception:  # the sender is already closed: nothing left to cancel
                continue
            if cancelled:
                state.cancel_seen = True
                self._on_cancelled(state)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=CANCEL_POLL_S / 2)
            except queue.Empty:
                self._poll(time.monotonic())
                continue
            if item is None:
                return
            self._deliver(item)
            self._poll(time.monotonic())
