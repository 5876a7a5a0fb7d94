"""Error responses that are never sent sooner than ERROR_DELAY_S after their request arrived.

Why: Triton 2.51's gRPC frontend mishandles an error on a stream opened with the
``triton_grpc_error: true`` header: it closes the stream from the thread that delivers the
response, racing with its own stream bookkeeping (``HandleCancellation called even when the
context was not cancelled``, then SIGSEGV, or a gRPC assertion and abort). The faster the
error follows the request, the likelier the crash: a Python model rejecting each request
inside execute() brought the server down within 1-40 such streams (one bad request each,
non-decoupled) or 500-3,000 (decoupled; 4 or 32 clients, ~300 streams/s); with the rejections
20 ms late, 20,000 streams passed either way. Holding rejections back a little costs nothing
that matters (an error's latency) and keeps the server up. (Several requests in flight on
one such stream still crash 2.51 whatever the model does: server PR #8708, in 2.68, fixes
that.)
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Any, Callable

from pagedserve.serving.contract import InvalidRequest

# How long after its request's arrival an error response may be sent. Measured on 2 cores with
# 32 hostile clients at ~300 streams/s: 0 ms crashed the server within 3,000 streams; 20 ms
# survived 20,000.
ERROR_DELAY_S = 0.02


class ErrorSender:
    """Owns the thread that sends deferred error responses, in order of when they are due."""

    def __init__(self, pb_utils: Any, log_error: Callable[[str], None]) -> None:
        self._pb = pb_utils
        self._log_error = log_error
        self._due: list[tuple[float, int, Any, Any]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pagedserve-errors",
                                        daemon=True)
        self._thread.start()

    def send(self, sender: Any, message: str, code: str, arrival: float) -> None:
        """A final error response (``code`` names a TritonError code) for the request that
        arrived at ``arrival`` (time.monotonic())."""
        error = self._pb.TritonError(message, getattr(self._pb.TritonError, code))
        response = self._pb.InferenceResponse(error=error)
        due = arrival + ERROR_DELAY_S
        if time.monotonic() >= due:
            self._deliver(sender, response)
            return
        with self._wake:
            heapq.heappush(self._due, (due, next(self._order), sender, response))
            self._wake.notify()

    def respond_each(self, requests: list, outputs_of: Callable[[Any], list]) -> None:
        """One final response per request: ``outputs_of(request)``'s tensors, or, when that
        raises InvalidRequest, an INVALID_ARG naming the problem (held back like every error).
        The helper models' execute(); they answer through the response sender so that an
        error can be deferred."""
        now = time.monotonic()
        for request in requests:
            sender = request.get_response_sender()
            try:
                outputs = outputs_of(request)
            except InvalidRequest as e:
                self.send(sender, str(e), "INVALID_ARG", now)
                continue
            sender.send(self._pb.InferenceResponse(output_tensors=outputs),
                        flags=self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=5)

    def _deliver(self, sender: Any, response: Any) -> None:
        try:
            sender.send(response, flags=self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # e.g. the client is gone; nothing else to tell it
            self._log_error(f"pagedserve: sending an error response failed: {e!r}")

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and (
                    not self._due or self._due[0][0] > time.monotonic()
                ):
                    timeout = self._due[0][0] - time.monotonic() if self._due else None
                    self._wake.wait(timeout)
                if self._stopping and not self._due:
                    return
                _, _, sender, response = heapq.heappop(self._due)
            self._deliver(sender, response)
