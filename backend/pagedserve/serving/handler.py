"""Serves one Triton request on the event loop: parse, generate, respond, cancel, account.

Error mapping follows the Triton conventions clients rely on: bad input (a malformed request,
or a ValueError from the engine before the first output, e.g. a prompt that is too long, or
sampling parameters the engine could not apply) is INVALID_ARG (HTTP 400); a dead engine, or
none while a failed one is replaced, is UNAVAILABLE (503); anything else, a request's own
failure inside the engine included, is vllm_backend's "Error generating stream: ..."
INTERNAL (500). A cancelled request is aborted in the engine (freeing its KV blocks) and ends
with a CANCELLED error response.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import traceback
from typing import Any, Callable, Optional

import numpy as np

from pagedserve.engine.async_engine import EngineDeadError, RequestError, merge_deltas
from pagedserve.serving.contract import INPUTS, InvalidRequest, parse_request
from pagedserve.serving.metrics import FinishedRequest
from pagedserve.serving.responder import Inflight, Responder
from pagedserve.serving.responses import ResponseBuilder

_INPUT_NAMES = tuple(spec["name"] for spec in INPUTS)
CANCELLED = ("Request was cancelled", "CANCELLED")
UNLOADING = ("The model is being unloaded", "UNAVAILABLE")
NO_ENGINE = ("Model is unavailable: its engine failed and is being replaced", "UNAVAILABLE")
# How long an aborted request's stream may take to end before its coroutine is cancelled.
ABORT_GRACE_S = 5.0


def read_inputs(pb_utils: Any, request: Any) -> dict[str, np.ndarray]:
    """The request's input tensors that are present, as numpy arrays."""
    tensors = {}
    for name in _INPUT_NAMES:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            tensors[name] = tensor.as_numpy()
    return tensors


class _Accounting:
    """What one request did, for the per-request metrics: its latest engine output (whose
    RequestMetrics carry the engine's timestamps and token count) and each completion's finish
    reason. Per-token metrics are the engine's own (EngineStats), not counted here."""

    def __init__(self, arrival: float, n: int) -> None:
        self.arrival = arrival
        self.n = n
        self.last: Any = None
        self.reasons: dict[int, str] = {}

    def output(self, output: Any) -> None:
        self.last = output
        for c in output.outputs:
            if c.finish_reason is not None:
                self.reasons[c.index] = c.finish_reason

    def finished(self, now: float) -> FinishedRequest:
        out = self.last
        m = out.metrics if out is not None else None
        first = m.first_token_time if m is not None else None
        scheduled = m.first_scheduled_time if m is not None else None
        last = m.last_token_time if m is not None else None
        return FinishedRequest(
            prompt_tokens=len(out.prompt_token_ids) if out is not None else 0,
            generation_tokens=m.num_generation_tokens if m is not None else 0,
            n=self.n,
            e2e_latency=now - self.arrival,
            time_to_first_token=None if first is None else first - self.arrival,
            queue_time=None if scheduled is None else scheduled - m.arrival_time,
            prefill_time=None if first is None or scheduled is None else first - scheduled,
            decode_time=None if first is None or last is None else last - first,
            inference_time=None if last is None or scheduled is None else last - scheduled,
            # A completion whose end the stream did not show was cut off with the request.
            finish_reasons=tuple(self.reasons.get(i, "abort") for i in range(self.n)),
        )


class RequestHandler:
    """Owns the per-request coroutine and the mapping of its outcomes to Triton responses."""

    def __init__(
        self,
        engine: Any,
        pb_utils: Any,
        responder: Responder,
        record: Optional[Callable[[FinishedRequest], None]],
        log_error: Callable[[str], None],
    ) -> None:
        self.engine = engine
        self.pb = pb_utils
        self.responder = responder
        self.record = record
        self.log_error = log_error
        self._ids = itertools.count()

    def new_state(self, request: Any, arrival: float) -> Inflight:
        state = Inflight(f"triton-{next(self._ids)}", request.get_response_sender(), arrival)
        self.responder.track(state)
        return state

    def cancel(self, state: Inflight, why: tuple[str, str] = CANCELLED) -> None:
        """Runs on the event loop: aborts the request in the engine, which frees its KV blocks
        and ends its stream (finish_reason "abort"); ``serve`` then sends the final response.

        ``why`` is the (message, code) of that response: CANCELLED, or UNAVAILABLE on unload.
        """
        if state.cancelled is not None:
            return
        state.cancelled = why
        if state.task is not None:  # otherwise serve() has not started and will see the flag
            asyncio.ensure_future(self._abort(state))

    async def _abort(self, state: Inflight) -> None:
        # Engine operations run in order, so this abort follows the request's own add.
        engine = self.engine
        if engine is not None and not engine.errored:  # a dead engine ended it already
            with contextlib.suppress(EngineDeadError):
                await engine.abort(state.request_id)
        done, _ = await asyncio.wait([state.task], timeout=ABORT_GRACE_S)
        if not done:  # the stream did not end: stop the coroutine (its generator aborts too)
            state.task.cancel()

    async def serve(self, state: Inflight, request: Any) -> None:
        state.task = asyncio.current_task()
        if state.cancelled is not None:  # cancelled before this coroutine started
            self.responder.send_error(state, *state.cancelled)
            return
        try:
            parsed = parse_request(read_inputs(self.pb, request), request.parameters())
        except InvalidRequest as e:
            self.responder.send_error(state, str(e), "INVALID_ARG")
            return
        engine = self.engine
        if engine is None:  # a failed engine is being replaced
            self.responder.send_error(state, *NO_ENGINE)
            return
        builder = ResponseBuilder(
            parsed, engine.tokenizer, frozenset(request.requested_output_names())
        )
        account = _Accounting(state.arrival, parsed.params.n)
        started = False
        last = None
        held = None  # a streamed delta not sent yet, while the responder is behind
        stream = engine.generate(parsed.prompt, parsed.params, state.request_id)
        try:
            async for output in stream:
                started = True
                last = output
                account.output(output)
                if state.cancelled is not None:
                    continue  # nothing more to the client; the stream ends with the abort
                if parsed.stream and not output.finished and state.backlogged:
                    # The previous response is still queued: fold this delta into the next
                    # one (one IPC send instead of two; the client sees the same text).
                    held = output if held is None else merge_deltas(held, output)
                    continue
                if held is not None:
                    output, held = merge_deltas(held, output), None
                if parsed.stream or output.finished:
                    self.responder.send(state, builder.build(output), final=output.finished)
            if state.cancelled is not None:
                self.responder.send_error(state, *state.cancelled)
            elif last is None or not last.finished:
                raise RuntimeError("the engine's stream ended without a finished output")
        except asyncio.CancelledError:
            if state.cancelled is None:
                raise
            if not engine.errored:
                await engine.abort(state.request_id)
            self.responder.send_error(state, *state.cancelled)
        except ValueError as e:
            if started:
                self._internal_error(state, e)
            else:
                self.responder.send_error(state, str(e), "INVALID_ARG")
                return
        except Exception as e:
            self._internal_error(state, e)
        if started and self.record is not None:
            self.record(account.finished(time.monotonic()))

    def _internal_error(self, state: Inflight, error: Exception) -> None:
        if isinstance(error, (EngineDeadError, RequestError)):
            # The engine logged the failure, with its traceback, once.
            self.log_error(f"pagedserve: {state.request_id}: error generating stream: {error}")
        else:
            self.log_error(f"pagedserve: error generating stream: {traceback.format_exc()}")
        code = "UNAVAILABLE" if isinstance(error, EngineDeadError) else "INTERNAL"
        self.responder.send_error(state, f"Error generating stream: {error}", code)
