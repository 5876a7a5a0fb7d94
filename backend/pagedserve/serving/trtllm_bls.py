"""The tensorrt_llm_bls model: TensorRT-LLM's request in, the llm model through BLS, out again.

Threads, each with one job:

* Triton's thread calls ``execute``, which validates each request (every batch item, before
  anything is generated) and hands its items to the worker pool;
* one worker per batch item sends the llm request (streaming when the client streams), turns
  each llm response into TensorRT-LLM responses and sends them; a BLS response iterator blocks,
  hence a thread each;
* the cancellation thread asks each in-flight request's client whether it cancelled, and stops
  the llm requests of those that did (``abort_channel``), within one engine step of noticing.
"""

from __future__ import annotations

import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pagedserve.serving.abort_channel import ABORT_PARAMETER, new_request_id
from pagedserve.serving.contract import InvalidRequest
from pagedserve.serving.error_sender import ErrorSender
from pagedserve.serving.trtllm import (
    INPUT_NAMES,
    TrtllmRequest,
    TrtllmTranslator,
    split_batch,
)
from pagedserve.serving.trtllm_outputs import (
    TrtllmResponses,
    is_final,
    llm_inputs,
    llm_outputs,
)

# Cancellation polling: every is_cancelled() is an IPC round trip (~75 us), so the period per
# request grows with the number in flight to keep the total near MAX_POLLS_PER_S; a lone
# request is asked every MIN_POLL_S, about one engine step.
MIN_POLL_S = 0.02
MAX_POLLS_PER_S = 500.0
# Concurrent batch items (threads, each mostly blocked on its llm stream).
MAX_WORKERS = 1024
# The llm model's own (serving/handler.py; importing it would load torch here).
CANCELLED = ("Request was cancelled", "CANCELLED")
UNLOADING = ("The model is being unloaded", "UNAVAILABLE")


@dataclass(eq=False)
class _Item:
    """One batch item: its llm request, once sent."""

    request: TrtllmRequest
    responses: TrtllmResponses
    llm_request_id: str = field(default_factory=new_request_id)
    issued: bool = False
    started: bool = False  # an llm output arrived
    finished: bool = False
    abort_sent: bool = False


@dataclass(eq=False)
class _Call:
    """One client request from execute() until its final response is sent."""

    sender: Any  # pb_utils.InferenceResponseSender
    items: list[_Item]
    arrival: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False  # the final response was sent; later outputs are dropped
    last_poll: float = field(default_factory=time.monotonic)

    @property
    def remaining(self) -> int:
        return sum(not item.finished for item in self.items)


class TrtllmBls:
    """Owns the BLS model's work: the worker pool, the in-flight requests and their
    cancellation. ``llm_model`` names the llm model the requests go to."""

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
        self._pool = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="pagedserve-bls")
        self._inflight: dict[int, _Call] = {}
        self._inflight_lock = threading.Lock()
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
            with self._inflight_lock:
                self._inflight[id(call)] = call
            for item in items:
                self._pool.submit(self._serve_item, call, item)

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
            translated.append(_Item(parsed, TrtllmResponses(parsed, index if batched else None)))
        return translated

    def finalize(self, grace_s: float = 5.0) -> None:
        self._stopping.set()
        deadline = time.monotonic() + grace_s
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        for call in self._calls():
            self._close(call, UNLOADING)
        self._poller.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._errors.stop()

    # ---- worker threads --------------------------------------------------------------------

    def _serve_item(self, call: _Call, item: _Item) -> None:
        with call.lock:
            if call.closed:
                return
            item.issued = True
        llm_request = self.pb.InferenceRequest(
            model_name=self.llm_model,
            inputs=[self.pb.Tensor(n, a) for n, a in llm_inputs(item.request).items()],
            requested_output_names=llm_outputs(item.request),
            request_id=item.llm_request_id,
        )
        try:
            for response in llm_request.exec(decoupled=True):
                if call.closed:
                    self._abort_once(call, item)  # the cancellation came while the request started
                    continue
                if response.has_error():
                    self._close(call, _llm_error(self.pb, response.error(), item.started))
                    continue
                item.started = True
                self._forward(call, item, self._tensors(response))
        except Exception as e:  # the llm model is gone, or a bug here: end the request
            self.log_error(f"pagedserve: tensorrt_llm_bls: {traceback.format_exc()}")
            self._close(call, (f"Error generating stream: {e}", "INTERNAL"))
        finally:
            with call.lock:
                item.finished = True
                done = call.remaining == 0
            if done:
                if not call.closed:  # the llm stream ended without a final response
                    self._close(call, ("Error generating stream: the llm stream ended early",
                                       "INTERNAL"))
                self._forget(call)

    def _tensors(self, response: Any) -> dict[str, np.ndarray]:
        return {t.name(): t.as_numpy() for t in response.output_tensors()}

    def _forward(self, call: _Call, item: _Item, llm: dict[str, np.ndarray]) -> None:
        final_for_item = is_final(llm)
        responses = item.responses.convert(llm)
        with call.lock:
            if call.closed:
                return
            if final_for_item:
                item.finished = True
            final = final_for_item and call.remaining == 0
            flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            for k, tensors in enumerate(responses):
                last = final and k == len(responses) - 1
                out = [self.pb.Tensor(name, array) for name, array in tensors.items()]
                call.sender.send(self.pb.InferenceResponse(output_tensors=out),
                                 flags=flags if last else 0)
            if final:
                call.closed = True

    # ---- cancellation ----------------------------------------------------------------------

    def _poll_cancellation(self) -> None:
        while not self._stopping.wait(MIN_POLL_S):
            calls = self._calls()
            period = max(MIN_POLL_S, len(calls) / MAX_POLLS_PER_S)
            now = time.monotonic()
            for call in calls:
                if now - call.last_poll >= period and self._client_cancelled(call):
                    self._close(call, CANCELLED)

    @staticmethod
    def _client_cancelled(call: _Call) -> bool:
        """Asks Triton whether the client cancelled. Never after the final response: Triton
        frees the request's response factory then, and asking would read freed memory."""
        with call.lock:
            if call.closed:
                return False
            call.last_poll = time.monotonic()
            try:
                return call.sender.is_cancelled()
            except Exception:  # the sender is already closed: nothing left to cancel
                return False

    def _close(self, call: _Call, why: tuple[str, str]) -> None:
        """Ends the client's request with an error response (no-op once it has ended), and
        stops the llm requests still running for it."""
        with call.lock:
            if call.closed:
                return
            call.closed = True
            running = [item for item in call.items if item.issued and not item.finished]
        self._errors.send(call.sender, *why, call.arrival)
        for item in running:
            self._abort_once(call, item)

    def _abort_once(self, call: _Call, item: _Item) -> None:
        with call.lock:
            if item.abort_sent:
                return
            item.abort_sent = True
        request = self.pb.InferenceRequest(
            model_name=self.llm_model,
            inputs=[],
            requested_output_names=[],
            parameters={ABORT_PARAMETER: item.llm_request_id},
        )
        try:
            for _ in request.exec(decoupled=True):
                pass
        except Exception as e:
            self.log_error(f"pagedserve: tensorrt_llm_bls: aborting an llm request: {e!r}")

    # ---- helpers ---------------------------------------------------------------------------

    def _calls(self) -> list[_Call]:
        with self._inflight_lock:
            return list(self._inflight.values())

    def _forget(self, call: _Call) -> None:
        with self._inflight_lock:
            self._inflight.pop(id(call), None)


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
