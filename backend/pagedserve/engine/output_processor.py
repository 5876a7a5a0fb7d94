"""Turns per-step token updates into RequestOutputs: text, stop strings, logprobs, metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import EngineCoreOutput
from pagedserve.core.scheduler_output import PromptLogprobsChunk
from pagedserve.engine.loggers import RequestLogger
from pagedserve.engine.stats import EngineCounters
from pagedserve.errors import RequestError
from pagedserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.tokenizer.detokenizer import IncrementalDetokenizer


@dataclass
class _Completion:
    """One completion's output-side state (its tokens live on the core Request)."""

    request: Request
    detokenizer: Optional[IncrementalDetokenizer] = None
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    sent_tokens: int = 0  # for DELTA outputs
    sent_logprobs: int = 0
    last_token_time: Optional[float] = None  # for the inter-token latency

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _RequestState:
    """A user request: its prompt, its ``n`` completions, and its timing."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[_Completion]
    metrics: RequestMetrics
    num_finished: int = 0
    changed: set[int] = field(default_factory=set)  # completions updated since the last output
    # Asked for prompt logprobs: one entry per prompt token so far (None for the first); they
    # are shown once complete (with DELTA outputs once, then []).
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    prompt_logprobs_sent: bool = False

    def __post_init__(self) -> None:
        self.streaming = self.params.output_kind != RequestOutputKind.FINAL_ONLY

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.completions)


class OutputProcessor:
    """Owns the output-side state of every live request.

    Text is produced incrementally only when it is needed before the end: for streamed
    outputs, or to find stop strings. Otherwise it is decoded once, when a completion finishes.
    """

    def __init__(
        self,
        tokenizer: Any,
        request_logger: Optional[RequestLogger] = None,
        counters: Optional[EngineCounters] = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}
        self.request_logger = request_logger
        self.counters = counters if counters is not None else EngineCounters()

    def add_request(
        self,
        request_id: str,
        prompt: Optional[str],
        prompt_token_ids: list[int],
        params: SamplingParams,
        children: list[Request],
        arrival_time: float,
    ) -> None:
        streaming = params.output_kind != RequestOutputKind.FINAL_ONLY
        completions = []
        for child in children:
            completion = _Completion(child)
            if streaming or params.stop:
                completion.detokenizer = self._detokenizer(prompt_token_ids, params)
            if params.logprobs is not None:
                completion.logprobs, completion.cumulative_logprob = [], 0.0
            completions.append(completion)
        self.states[request_id] = _RequestState(
            request_id, prompt, prompt_token_ids, params, completions,
            RequestMetrics(arrival_time=arrival_time, num_prompt_tokens=len(prompt_token_ids)),
            prompt_logprobs=None if params.prompt_logprobs is None else [None],
        )

    def _detokenizer(self, prompt_token_ids: list[int], params: SamplingParams):
        return IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )

    def has_request(self, request_id: str) -> bool:
        return request_id in self.states

    def process(
        self, core_outputs: list[EngineCoreOutput]
    ) -> tuple[list[RequestOutput], list[str], list[tuple[list[str], RequestError]]]:
        """Returns the outputs to deliver, the core request ids a stop string finished, and
        the requests whose own processing failed, as (their core request ids, the error).

        A failure in one request's text, stop strings or logprobs ends only that request:
        it is forgotten here, and the caller ends its core requests."""
        now = time.monotonic()
        touched: dict[str, _RequestState] = {}
        stopped_ids: list[str] = []
        failed: list[tuple[list[str], RequestError]] = []
        states = self.states
        counters = self.counters
        generated = 0
        gaps: list[float] = []  # inter-token latencies, one per token after a completion's first
        for out in core_outputs:
            request = out.request
            state = states.get(request.parent_id)
            if state is None:
                continue
            try:  # free unless it raises
                if out.prompt_logprobs is not None:
                    self._add_prompt_logprobs(state, out.prompt_logprobs)
                    if not out.new_token_ids:
                        continue  # a prompt chunk: nothing to show until its first token
                completion = state.completions[request.index]
                if (completion.detokenizer is not None and self._update_text(completion, out)
                        and not out.finished):
                    stopped_ids.append(request.request_id)
                num_new = len(out.new_token_ids)
                if completion.logprobs is not None and out.new_logprobs is not None:
                    for entry in out.new_logprobs[:num_new]:
                        completion.logprobs.append(self._logprob_entry(*entry))
                        completion.cumulative_logprob += entry[1][0]
                metrics = state.metrics
                if metrics.first_token_time is None:
                    metrics.first_token_time = now
                    counters.prompt_tokens += metrics.num_prompt_tokens
                metrics.last_token_time = now
                metrics.num_generation_tokens += num_new
                generated += num_new
                if completion.last_token_time is not None:
                    gaps.append(now - completion.last_token_time)
                completion.last_token_time = now
                if out.finished and completion.finish_reason is None:
                    completion.finish_reason = request.status.finish_reason
                    completion.stop_reason = request.stop_reason
            except Exception as e:
                failed.append(self._fail(state, e))
                touched.pop(state.request_id, None)
                continue
            if completion.finished:
                state.num_finished += 1
            if state.streaming or state.finished:
                state.changed.add(request.index)
                touched[state.request_id] = state
        # Latencies before tokens, so a reader on another thread never sees tokens without them.
        counters.inter_token_latency.observe_many(gaps)
        counters.generation_tokens += generated
        outputs = []
        for state in touched.values():
            try:
                output = self._make_output(state, now)
            except Exception as e:
                failed.append(self._fail(state, e))
                continue
            if output is not None:
                outputs.append(output)
        return outputs, stopped_ids, failed

    def _update_text(self, completion: _Completion, out: EngineCoreOutput) -> bool:
        """Decodes a step's new tokens; returns whether a stop string ended the completion.

        Several tokens at once (accepted drafts) with stop strings are decoded one by one,
        so that a stop string completed inside the run ends the output at that token, as it
        would have without speculation: the tokens after it leave the request and ``out``."""
        request, detokenizer = out.request, completion.detokenizer
        tokens = out.new_token_ids
        if out.finished and self._drops_last_token(request):
            tokens = tokens[:-1]
        if len(tokens) <= 1 or not detokenizer.has_stop_strings:
            matched = detokenizer.update(tokens, final=out.finished) is not None
        else:
            matched = False
            for i, token in enumerate(tokens):
                last = i == len(tokens) - 1
                if detokenizer.update([token], final=out.finished and last) is not None:
                    matched = True
                    drop = len(out.new_token_ids) - 1 - i
                    if drop:
                        request.truncate_output(request.num_output_tokens - drop)
                        out.new_token_ids = out.new_token_ids[:i + 1]
                    break
        if matched:
            completion.finish_reason = "stop"
            completion.stop_reason = detokenizer.matched_stop
        return matched

    def _fail(self, state: _RequestState, error: Exception) -> tuple[list[str], RequestError]:
        self.states.pop(state.request_id, None)
        core_ids = [c.request.request_id for c in state.completions]
        return core_ids, RequestError(state.request_id, "output processing", error)

    def drop(self, request_id: str) -> Optional[_RequestState]:
        """Forgets a request without an output (it failed); returns its state, if known."""
        return self.states.pop(request_id, None)

    def _add_prompt_logprobs(self, state: _RequestState, chunk: PromptLogprobsChunk) -> None:
        entries = state.prompt_logprobs
        if entries is None or chunk.first_position != len(entries) - 1:
            # Positions are scored once each, in order (see Request.num_scored_prompt_tokens).
            raise RuntimeError(
                f"prompt logprobs from position {chunk.first_position} arrived after "
                f"{None if entries is None else len(entries) - 1} positions"
            )
        lists = chunk.lists
        for ids, lps, rank in zip(lists.token_ids, lists.logprobs, lists.ranks):
            entries.append(self._logprob_entry(ids, lps, rank))

    def _prompt_logprobs_output(
        self, state: _RequestState, delta: bool
    ) -> Optional[list[Optional[dict[int, Logprob]]]]:
        """What an output shows (vLLM's rule): None unless asked; the whole list once it is
        complete, and with DELTA outputs only in the first output after that ([] otherwise)."""
        entries = state.prompt_logprobs
        if entries is None:
            return None
        if state.prompt_logprobs_sent or len(entries) < len(state.prompt_token_ids):
            return []
        if delta:
            state.prompt_logprobs_sent = True
            state.prompt_logprobs = []
        return entries

    def _logprob_entry(self, ids: list[int], lps: list[float], rank: int) -> dict[int, Logprob]:
        # The sampled token first, then the top-k by rank (the sampled one may repeat there).
        entry = {ids[0]: Logprob(lps[0], rank, self.tokenizer.decode([ids[0]]))}
        for k, (tid, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
            if tid not in entry:
                entry[tid] = Logprob(lp, k, self.tokenizer.decode([tid]))
        return entry

    @staticmethod
    def _drops_last_token(request: Request) -> bool:
        # An EOS or stop token ends the text without appearing in it (vLLM's rule).
        return (
            request.status == RequestStatus.FINISHED_STOPPED
            and not request.sampling_params.include_stop_str_in_output
        )

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """Finishes a user request as aborted; returns its final output (None if unknown)."""
        state = self.states.get(request_id)
        if state is None:
            return None
        for i, completion in enumerate(state.completions):
            if not completion.finished:
                completion.finish_reason = "abort"
                state.num_finished += 1
                state.changed.add(i)
        return self._make_output(state, time.monotonic())

    def _make_output(self, state: _RequestState, now: float) -> Optional[RequestOutput]:
        kind = state.params.output_kind
        finished = state.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if finished:
            state.metrics.finished_time = now
            scheduled = [c.request.scheduled_time for c in state.completions
                         if c.request.scheduled_time is not None]
            state.metrics.first_scheduled_time = min(scheduled, default=None)
            del self.states[state.request_id]
        delta = kind == RequestOutputKind.DELTA
        if not delta:
            indices = range(len(state.completions))
        elif len(state.changed) == 1:
            indices = state.changed
        else:
            indices = sorted(state.changed)
        state.changed = set()
        completions = [self._completion_output(state.completions[i], i, delta) for i in indices]
        first = state.completions[0].request
        output = RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=state.metrics,
            num_cached_tokens=max(first.num_cached_tokens, 0),
            prompt_logprobs=self._prompt_logprobs_output(state, delta),
        )
        if finished and self.request_logger is not None:
            self.request_logger.log_finished(output)
        return output

    def _completion_output(self, c: _Completion, index: int, delta: bool) -> CompletionOutput:
        tokens = c.request.output_token_ids
        if c.detokenizer is None:  # decoded once, at the end
            c.detokenizer = self._detokenizer(c.request.prompt_token_ids,
                                              c.request.sampling_params)
            keep = tokens[:-1] if tokens and self._drops_last_token(c.request) else tokens
            c.detokenizer.update(keep, final=True)
        text = c.detokenizer.get_next_output_text(c.finished, delta)
        if delta:
            token_ids = tokens[c.sent_tokens:]
            logprobs = c.logprobs[c.sent_logprobs:] if c.logprobs is not None else None
            c.sent_tokens = len(tokens)
            c.sent_logprobs = len(c.logprobs) if c.logprobs is not None else 0
        else:
            token_ids = list(tokens)
            logprobs = list(c.logprobs) if c.logprobs is not None else None
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=c.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
