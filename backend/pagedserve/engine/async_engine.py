"""The streaming engine for servers: ``async for output in engine.generate(...)``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any, Callable, Optional

from pagedserve.config import EngineArgs
from pagedserve.engine.llm_engine import EngineStats, LLMEngine, PromptType
from pagedserve.errors import EngineDeadError, RequestError
from pagedserve.executor.rank import select_device
from pagedserve.outputs import RequestOutput
from pagedserve.placement import UNPLACED, InstancePlacement
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["AsyncLLMEngine", "EngineDeadError", "RequestError", "merge_deltas"]

logger = logging.getLogger(__name__)

_STATS_INTERVAL_S = 0.05


class _OutputCollector:
    """One request's undelivered output. When the consumer falls behind, new outputs fold
    into the pending one (delta outputs concatenate, cumulative ones supersede), so a slow
    reader gets fewer, larger outputs instead of an ever longer queue (as vLLM does)."""

    def __init__(self, delta: bool) -> None:
        self._delta = delta
        self._pending: Any = None
        self._ready = asyncio.Event()

    def put(self, item: Any) -> None:
        pending = self._pending
        if pending is None or isinstance(item, BaseException):
            self._pending = item
        elif not isinstance(pending, BaseException):
            self._pending = merge_deltas(pending, item) if self._delta else item
        self._ready.set()

    async def get(self) -> Any:
        while self._pending is None:
            await self._ready.wait()
            self._ready.clear()
        item, self._pending = self._pending, None
        return item


def merge_deltas(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """``old`` extended by ``new``, both delta outputs of one request (``old`` is reused)."""
    by_index = {c.index: c for c in old.outputs}
    for c in new.outputs:
        prev = by_index.get(c.index)
        if prev is None:
            old.outputs.append(c)
            continue
        prev.text += c.text
        prev.token_ids = prev.token_ids + c.token_ids
        if prev.logprobs is not None and c.logprobs is not None:
            prev.logprobs = prev.logprobs + c.logprobs
        prev.cumulative_logprob = c.cumulative_logprob
        prev.finish_reason, prev.stop_reason = c.finish_reason, c.stop_reason
    old.outputs.sort(key=lambda c: c.index)
    old.finished, old.metrics = new.finished, new.metrics
    if new.prompt_logprobs:  # delta outputs carry them once, whole
        old.prompt_logprobs = new.prompt_logprobs
    return old


class AsyncLLMEngine:
    """Owns an LLMEngine and the thread that steps it.

    Every engine operation (adding, aborting, stepping) runs on that one thread, in order, so
    the engine needs no locks and the caller's event loop stays free while the model runs.
    Outputs travel back to per-request asyncio queues, one loop callback per step.

    A request whose own work fails raises its RequestError from ``generate``; the others go
    on. A failure no request explains stops the thread: every stream raises EngineDeadError
    at once, later calls raise it too, and ``on_dead`` (if given) is called with it, on the
    engine thread, after the streams were failed.
    """

    def __init__(
        self,
        args: EngineArgs,
        on_dead: Optional[Callable[[EngineDeadError], None]] = None,
        placement: InstancePlacement = UNPLACED,
    ) -> None:
        self.engine = LLMEngine(args, placement)
        self._on_dead = on_dead
        self.tokenizer = self.engine.tokenizer
        self._ops: queue.SimpleQueue[tuple[Callable, tuple, concurrent.futures.Future]] = (
            queue.SimpleQueue()
        )
        self._wakeup = threading.Event()
        self._queues: dict[str, _OutputCollector] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stats = self.engine.get_stats()
        self._stats_time = 0.0
        self._dead: Optional[EngineDeadError] = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncLLMEngine:
        return cls(args)

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    # ---- public API ------------------------------------------------------------------------

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: Optional[SamplingParams],
        request_id: str,
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; raises ValueError on bad input before any output.

        Stopping the iteration early (break, aclose, task cancellation) aborts the request.
        """
        self._bind_loop()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        delta = (
            sampling_params is not None
            and sampling_params.output_kind == RequestOutputKind.DELTA
        )
        outputs = _OutputCollector(delta)
        self._queues[request_id] = outputs
        try:
            await self._call(
                self.engine.add_request, request_id, prompt, sampling_params, time.monotonic()
            )
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        finished = False
        try:
            while True:
                output = await outputs.get()
                if isinstance(output, BaseException):
                    raise output
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished and self._dead is None:
                self._submit(self.engine.abort_request, [request_id])

    async def abort(self, request_id: str) -> None:
        """Stops a request and frees its blocks; its stream ends with finish_reason "abort"."""
        self._bind_loop()
        await self._call(self._abort_and_deliver, request_id)

    @property
    def errored(self) -> bool:
        """Whether the engine stopped on an error (vLLM's name)."""
        return self._dead is not None

    @property
    def dead_error(self) -> Optional[EngineDeadError]:
        return self._dead

    async def check_health(self) -> None:
        """Raises EngineDeadError once the engine has stopped on an error (vLLM's name)."""
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))

    def get_stats(self) -> EngineStats:
        """The latest snapshot, refreshed by the engine thread (never older than ~50 ms
        while busy, and current once it goes idle)."""
        return self._stats

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():  # else it still steps: the workers go at exit
            self.engine.shutdown()

    # ---- the loop side -------------------------------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop.is_closed():
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("AsyncLLMEngine must be used from one event loop at a time")
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))

    def _submit(self, fn: Callable, *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._ops.put((fn, args, future))
        self._wakeup.set()
        if self._dead is not None:  # the thread may have drained the queue before this put
            self._fail_pending_ops(self._dead)
        return future

    async def _call(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.wrap_future(self._submit(fn, *args))

    def _deliver(
        self, outputs: list[RequestOutput], errors: Optional[list[RequestError]] = None
    ) -> None:
        for output in outputs:
            target = self._queues.get(output.request_id)
            if target is not None:
                target.put(output)
        if errors:
            for error in errors:
                target = self._queues.get(error.request_id)
                if target is not None:
                    target.put(error)

    def _fail_all(self, dead: EngineDeadError) -> None:
        for target in self._queues.values():
            target.put(EngineDeadError(str(dead)))  # one each: a raise writes its traceback

    # ---- the engine thread ---------------------------------------------------------------

    def _abort_and_deliver(self, request_id: str) -> None:
        outputs = self.engine.abort_request([request_id])
        if outputs:
            self._post(self._deliver, outputs)

    def _post(self, fn: Callable, *args: Any) -> None:
        """Runs ``fn(*args)`` on the bound event loop. A loop that has closed has nobody left
        waiting on it (its streams ended with it, and their aborts are queued): what it is
        sent is dropped and the engine goes on; a closed loop must not kill the engine."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # closed, even since any check
                self._loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        engine = self.engine
        dead: Optional[EngineDeadError] = None
        try:
            # The current CUDA device is per thread: this one steps the model on rank 0's.
            select_device(engine.config, 0)
            while not self._stopping:
                self._run_ops()
                if not engine.has_unfinished_requests():
                    self._refresh_stats(force=True)
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                outputs = engine.step()
                errors = engine.take_request_errors() if engine.request_errors else None
                if outputs or errors:
                    self._post(self._deliver, outputs, errors)
                self._refresh_stats(force=False)
        except BaseException as e:  # no request explains it: fail every stream at once
            # As text: a record holding the traceback would keep the engine's memory alive.
            logger.error("pagedserve: the engine failed; every request in flight fails\n%s",
                         traceback.format_exc())
            # Only the message is kept: the traceback would keep the engine's memory alive.
            dead = engine.dead_error or EngineDeadError(f"the engine failed: {e!r}")
        if dead is not None:  # outside the except block, so that no traceback is alive
            self._die(dead)

    def _die(self, dead: EngineDeadError) -> None:
        self._dead = dead
        self._post(self._fail_all, dead)
        self._fail_pending_ops(dead)
        if self._on_dead is not None:
            try:
                self._on_dead(dead)
            except Exception:
                logger.exception("pagedserve: the engine's on_dead callback failed")

    def _run_ops(self) -> None:
        done: list[tuple[concurrent.futures.Future, Any]] = []
        while True:
            try:
                fn, args, future = self._ops.get_nowait()
            except queue.Empty:
                break
            if not future.set_running_or_notify_cancel():
                continue
            try:
                done.append((future, fn(*args)))
            except Exception as e:  # bad input: the caller gets it, the engine goes on
                future.set_exception(e)
        if done:
            # Refresh before answering, so a caller sees the effect (e.g. freed blocks) at once.
            self._refresh_stats(force=True)
            for future, result in done:
                future.set_result(result)

    def _fail_pending_ops(self, dead: EngineDeadError) -> None:
        while True:
            try:
                _, _, future = self._ops.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineDeadError(str(dead)))

    def _refresh_stats(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._stats_time >= _STATS_INTERVAL_S:
            self._stats = self.engine.get_stats()
            self._stats_time = now
