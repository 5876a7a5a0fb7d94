"""The tensorrt_llm_bls model: TensorRT-LLM's request in, the llm model through BLS, out again.

Each model instance serves one request at a time, and makes every BLS call on the thread that
Triton runs execute() on. Why: python_backend r24.10 deadlocks when several threads of one stub
use decoupled BLS response iterators. A thread waking in the iterator's ``__next__`` holds the
iterator's lock while it waits for the GIL; the stub's response thread holds the iterator map's
lock while it waits for that iterator's lock; a thread starting a BLS request holds the GIL
while it waits for the map's lock (seen under load: every thread of the stub waiting).
TensorRT-LLM's own tensorrt_llm_bls works the same way: its concurrency is its instance count
(``instance_group`` in config.pbtxt).

Threads, each with one job:

* Triton's thread runs execute(): validates the request (every batch item, before anything is
  generated), starts the llm request of each item (always streamed), and passes the llm's
  responses on, as TensorRT-LLM's, until the end; a cancellation seen on the way stops the llm
  requests (``abort_channel``) within an engine step;
* the cancellation thread asks the client whether it cancelled, every MIN_POLL_S, and raises a
  flag for execute(); it makes no BLS call;
* the error thread (``error_sender``) sends rejections.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pagedserve.serving.abort_channel import ABORT_PARAMETER, new_request_id
from pagedserve.serving.contract import InvalidRequest
from pagedserve.serving.error_sender import ErrorSender
from pagedserve.serving.trtllm import INPUT_NAMES, TrtllmTranslator, split_batch
from pagedserve.serving.trtllm_outputs import (
    TrtllmResponses,
    is_final,
    llm_inputs,
    llm_outputs,
)

# How often the client of the request in progress is asked whether it cancelled (an IPC round
# trip, ~75 us): about an engine step.
MIN_POLL_S = 0.02
# How long a finished BLS response iterator is kept referenced from Python. python_backend
# r24.10's stub also references it until its response thread has sent the iterator's cleanup
# (normally within a millisecond); if that reference were the last one, the iterator and its
# responses' numpy arrays would be freed on that thread without the GIL, corrupting the heap
# (seen as "malloc(): unaligned fastbin chunk detected" under load).
ITERATOR_GRACE_S = 5.0
# The llm model's own messages (serving/handler.py; importing it would load torch here).
CANCELLED = ("Request was cancelled", "CANCELLED")
UNLOADING = ("The model is being unloaded", "UNAVAILABLE")


@dataclass(eq=False)
class _Item:
    """One batch item and its llm request."""

    responses: TrtllmResponses
    llm_request_id: str = field(default_factory=new_request_id)
    iterator: Any = None  # the llm request's BLS response iterator, once sent
    started: bool = False  # an llm output arrived
    finished: bool = False  # the llm request's last response arrived
    aborted: bool = False  # the llm model was asked to stop it

    @property
    def running(self) -> bool:
        return self.iterator is not None and not self.finished and not self.aborted


@dataclass(eq=False)
class _Call:
    """One client request from execute() until its final response is sent."""

    sender: Any  # pb_utils.InferenceResponseSender
    items: list[_Item]
    arrival: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False  # the final response was sent; later llm outputs are dropped
    cancel_seen: bool = False  # set by the cancellation thread
    last_poll: float = field(default_factory=time.monotonic)


class TrtllmBls:
    """Owns one instance's work: the request in progress, its cancellation, the rejections.
    ``llm_model`` names the llm model the requests go to."""

    def __init__(
        self,
        pb_utils: Any,
        translator: TrtllmTranslator,
        llm_model: str,
        log_error: Callable[[str], None],
    ) -> None:
        self.pb = pb_utils
        self.translator = translator
        self.llm_model = llm_model
        self.log_error = log_error
        self._errors = ErrorSender(pb_utils, log_error)
        self._calls: dict[int, _Call] = {}
        self._calls_lock = threading.Lock()
        self._finished_iterators: collections.deque[tuple[float, Any]] = collections.deque()
        self._stopping = threading.Event()
        self._poller = threading.Thread(
            target=self._poll_cancellation, name="pagedserve-bls-cancel", daemon=True
        )
        self._poller.start()

    # ---- Triton's thread -------------------------------------------------------------------

    def execute(self, requests: list) -> None:
        now = time.monotonic()
        for request in requests:
            sender = request.get_response_sender()
            if self._stopping.is_set():
                self._errors.send(sender, *UNLOADING, now)
                continue
            try:
                items = self._translate(request)
            except InvalidRequest as e:
                self._errors.send(sender, str(e), "INVALID_ARG", now)
                continue
            call = _Call(sender, items, now)
            with self._calls_lock:
                self._calls[id(call)] = call
            try:
                self._serve(call)
            except Exception as e:  # the llm model is gone, or a bug here: end the request
                self.log_error(f"pagedserve: tensorrt_llm_bls: {traceback.format_exc()}")
                self._close(call, (f"Error generating stream: {e}", "INTERNAL"))
            finally:
                with self._calls_lock:
                    self._calls.pop(id(call), None)
                for item in call.items:
                    self._bury(item.iterator)

    def _translate(self, request: Any) -> list[_Item]:
        tensors = {}
        for name in INPUT_NAMES:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensors[name] = tensor.as_numpy()
        items = split_batch(tensors)
        batched = len(items) > 1
        translated = []
        for index, item in enumerate(items):
            try:
                parsed = self.translator.translate(item)
            except InvalidRequest as e:
                raise InvalidRequest(f"batch item {index}: {e}" if batched else str(e)) from None
            translated.append(_Item(TrtllmResponses(parsed, index if batched else None)))
        return translated

    def _serve(self, call: _Call) -> None:
        """Starts every item's llm request, then passes each item's responses on in turn (the
        engine generates them all meanwhile)."""
        for item in call.items:
            if call.cancel_seen:
                break
            item.iterator = self._send_llm_request(item)
        for item in call.items:
            if item.iterator is None:
                continue
            for response in item.iterator:
                if call.cancel_seen and not call.closed:
                    self._cancel(call)
                if response.has_error():
                    item.finished = True
                    self._close(call, _llm_error(self.pb, response.error(), item.started))
                    self._abort_running(call)
                    continue
                if call.closed:
                    continue  # cancelled or failed: the llm streams end with their aborts
                item.started = True
                self._forward(call, item, {t.name(): t.as_numpy()
                                           for t in response.output_tensors()})
        if not call.closed:  # an llm stream ended without its last response
            self._close(call, ("Error generating stream: the llm stream ended early",
                               "INTERNAL"))

    def _send_llm_request(self, item: _Item) -> Any:
        request = item.responses.request
        llm_request = self.pb.InferenceRequest(
            model_name=self.llm_model,
            inputs=[self.pb.Tensor(n, a) for n, a in llm_inputs(request).items()],
            requested_output_names=llm_outputs(request),
            request_id=item.llm_request_id,
        )
        return llm_request.exec(decoupled=True)

    def _forward(self, call: _Call, item: _Item, llm: dict[str, np.ndarray]) -> None:
        item.finished = is_final(llm)
        responses = item.responses.convert(llm)
        final = item.finished and item is call.items[-1]
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        with call.lock:  # no is_cancelled() once the final response is on its way
            for k, tensors in enumerate(responses):
                last = final and k == len(responses) - 1
                out = [self.pb.Tensor(name, array) for name, array in tensors.items()]
                call.sender.send(self.pb.InferenceResponse(output_tensors=out),
                                 flags=flags if last else 0)
            call.closed = final

    # ---- cancellation ----------------------------------------------------------------------

    def _cancel(self, call: _Call) -> None:
        self._close(call, CANCELLED)
        self._abort_running(call)

    def _close(self, call: _Call, why: tuple[str, str]) -> None:
        """Ends the client's request with an error response (no-op once it has ended)."""
        with call.lock:
            if call.closed:
                return
            call.closed = True
        self._errors.send(call.sender, *why, call.arrival)

    def _abort_running(self, call: _Call) -> None:
        """Asks the llm model to stop the call's llm requests still running."""
        for item in call.items:
            if not item.running:
                continue
            item.aborted = True
            request = self.pb.InferenceRequest(
                model_name=self.llm_model,
                inputs=[],
                requested_output_names=[],
                parameters={ABORT_PARAMETER: item.llm_request_id},
            )
            try:
                responses = request.exec(decoupled=True)
                for _ in responses:
                    pass
                self._bury(responses)
            except Exception as e:
                self.log_error(f"pagedserve: tensorrt_llm_bls: aborting an llm request: {e!r}")

    def _poll_cancellation(self) -> None:
        while not self._stopping.wait(MIN_POLL_S):
            self._release_iterators(time.monotonic() - ITERATOR_GRACE_S)
            with self._calls_lock:
                calls = list(self._calls.values())
            for call in calls:
                if not call.cancel_seen and _client_cancelled(call):
                    call.cancel_seen = True

    # ---- helpers ---------------------------------------------------------------------------

    def _bury(self, iterator: Any) -> None:
        if iterator is not None:
            self._finished_iterators.append((time.monotonic(), iterator))

    def _release_iterators(self, before: float) -> None:
        """Drops the finished response iterators older than ``before`` (with the GIL)."""
        while self._finished_iterators and self._finished_iterators[0][0] < before:
            self._finished_iterators.popleft()

    def finalize(self) -> None:
        self._stopping.set()
        self._poller.join(timeout=5)
        self._errors.stop()
        self._release_iterators(time.monotonic())


def _client_cancelled(call: _Call) -> bool:
    """Asks Triton whether the client cancelled. Never after the final response: Triton frees
    the request's response factory then, and asking would read freed memory."""
    with call.lock:
        if call.closed:
            return False
        call.last_poll = time.monotonic()
        try:
            return call.sender.is_cancelled()
        except Exception:  # the sender is already closed: nothing left to cancel
            return False


_CODES = ("INVALID_ARG", "CANCELLED", "UNAVAILABLE", "NOT_FOUND", "UNSUPPORTED",
          "ALREADY_EXISTS", "UNKNOWN", "INTERNAL")


def _llm_error(pb_utils: Any, error: Any, started: bool) -> tuple[str, str]:
    """(message, TritonError code name) of an llm response's error.

    python_backend r24.10 keeps only the message of a BLS response's error (its code reads
    INTERNAL; later releases keep it), so an INTERNAL code is read with the llm model's
    conventions: its own failures are vllm_backend's "Error generating stream: ...", a
    cancellation and an unload have their messages, and any other error before the first
    output rejects the request (INVALID_ARG, e.g. a prompt longer than max_model_len).
    """
    message = error.message()
    code = next((name for name in _CODES
                 if error.code() == getattr(pb_utils.TritonError, name, object())), "INTERNAL")
    if code != "INTERNAL" or message.startswith("Error generating stream"):
        return message, code
    if message == CANCELLED[0]:
        return CANCELLED
    if message == UNLOADING[0]:
        return UNLOADING
    return message, "INTERNAL" if started else "INVALID_ARG"

