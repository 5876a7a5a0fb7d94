"""The iteration-level scheduler: one token budget per step, running requests first."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

from pagedserve.core.kv_cache_manager import KVCacheManager, KVCacheStats
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler_output import (
    LogprobsLists,
    ModelRunnerOutput,
    NewRequestData,
    PromptLogprobsChunk,
    SchedulerOutput,
)
from pagedserve.spec_decode.controller import SpecDecodingStats, SpeculationController


@dataclass
class EngineCoreOutput:
    """What one step did to one request: the tokens it gained and whether it finished."""

    request: Request
    new_token_ids: list[int]
    # Per new token: (ids, logprobs, rank), as in LogprobsLists.
    new_logprobs: Optional[list[tuple[list[int], list[float], int]]] = None
    finished: bool = False
    # Prompt logprobs computed this step; they come before the step's token, if any.
    prompt_logprobs: Optional[PromptLogprobsChunk] = None


@dataclass
class SchedulerStats:
    """A snapshot of the queues and the KV cache, for EngineStats."""

    num_running: int
    num_waiting: int
    num_preemptions_total: int
    kv: KVCacheStats
    spec_decoding: Optional[SpecDecodingStats] = None


class Scheduler:
    """Owns the waiting queue and the running list.

    Each step hands ``max_num_batched_tokens`` to running requests in order (a decode token,
    or the next prompt chunk), then admits waiting requests FCFS while the budget, the
    ``max_num_seqs`` cap and the free blocks allow. A request simply needs
    ``num_tokens - num_computed_tokens`` more tokens computed; phases do not exist. When blocks
    run out the newest running request is preempted (its blocks freed, recomputed later).

    With speculative decoding a running request's drafts are scheduled after its next token
    (``num_tokens_with_spec``); the drafts the target rejects roll ``num_computed_tokens``
    back (their KV slots are simply overwritten later), and drafts never enter the prefix
    cache, which holds only the request's known tokens.

    Scheduled tokens count as computed as soon as they are scheduled, and a token the step
    will sample is a placeholder until its value arrives. So the next step can be scheduled
    while this one still runs (async scheduling): a decode's input is then the placeholder,
    which the runner fills on the device.
    """

    def __init__(
        self,
        kv_manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
        speculation: Optional[SpeculationController] = None,
    ) -> None:
        self.kv = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests the runner still holds a row for but must drop before the next step.
        self._finished_ids: set[str] = set()
        self.num_preemptions_total = 0
        # Speculative decoding: how many tokens to draft, and the acceptance counts.
        self.speculation = speculation
        self.spec_stats = SpecDecodingStats()

    # ---- admission and removal ----------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """Ends requests (abort, stop string), frees their blocks; unknown ids are ignored."""
        finished = []
        for rid in request_ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free(request)
            self._forget(request)
            finished.append(request)
        return finished

    def _free(self, request: Request) -> None:
        self.kv.free(request)
        self._finished_ids.add(request.request_id)

    def _forget(self, request: Request) -> None:
        """A finished request's own acceptance goes with it."""
        if self.speculation is not None:
            self.speculation.forget_request(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_block_ids: dict[str, list[int]] = {}
        new_reqs: list[NewRequestData] = []
        kv = self.kv
        num_preempted = 0
        spec_tokens: dict[str, list[int]] = {}

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_output_placeholders and request.length_reached_with_placeholders:
                i += 1  # finishes on its in-flight token
                continue
            num_known = request.num_tokens_with_placeholders - request.num_computed_tokens
            drafts = request.spec_token_ids
            if drafts:
                drafts = drafts[:max(min(request.max_num_drafts(), budget - num_known), 0)]
            num_new = min(num_known + len(drafts), budget)
            scheduled = True
            while (added := kv.allocate_slots(request, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                num_preempted += 1
                if victim is request:  # it was the newest: nothing left to preempt after it
                    scheduled = False
                    break
            if not scheduled:
                break
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            if added:
                new_block_ids[request.request_id] = added
            if drafts:
                spec_tokens[request.request_id] = drafts
            request.num_drafts_in_flight = len(drafts)
            request.spec_token_ids = []
            self._advance(request, num_new)
            i += 1

        while (
            self.waiting and budget > 0 and not num_preempted
            and len(self.running) < self.max_num_seqs
        ):
            request = self.waiting[0]
            if request.num_output_placeholders:
                break  # preempted with a token in flight: resumes once it has arrived
            hits, num_hit = kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            if kv.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            if request.num_cached_tokens < 0:  # scheduled for the first time
                request.num_cached_tokens = num_hit
                request.scheduled_time = time.monotonic()
                kv.record_prefix_query(request.num_prompt_tokens, num_hit)
            request.num_computed_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            new_reqs.append(self._new_request_data(request))
            self._advance(request, num_new)

        finished, self._finished_ids = self._finished_ids, set()
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            new_block_ids=new_block_ids,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=self.max_num_batched_tokens - budget,
            finished_req_ids=finished,
            num_preempted=num_preempted,
            scheduled_spec_decode_tokens=spec_tokens,
            num_lookahead_tokens=(
                0 if self.speculation is None else self._num_drafts(i, len(new_reqs))
            ),
        )

    def _num_drafts(self, num_decoding: int, num_new: int) -> int:
        """The speculation controller's k for the next step, told what it prices with: the
        mean context of the ``num_decoding`` running requests this step decodes (the first
        ones; with speculation none is skipped, async scheduling being off) and the tokens
        the proposer has not seen of those and of the ``num_new`` requests it started (new
        prompts, steps without drafts), and which requests run (each priced at its own
        acceptance). Only with speculation: a pass over the batch that plain decoding does
        not pay for."""
        running = self.running
        decoding = running[:num_decoding]
        context = sum(r.num_computed_tokens for r in decoding) / max(len(decoding), 1)
        backlog = sum(r.num_tokens - r.num_proposer_tokens
                      for r in (*decoding, *running[len(running) - num_new:]))
        return self.speculation.num_drafts(
            len(running), any(r.max_num_drafts() for r in running), context, backlog,
            [r.request_id for r in running])

    @staticmethod
    def _advance(request: Request, num_new: int) -> None:
        request.num_computed_tokens += num_new
        if request.num_computed_tokens >= request.num_tokens_with_placeholders:
            request.num_output_placeholders += 1  # this step samples its next token

    def _new_request_data(self, request: Request) -> NewRequestData:
        params = request.sampling_params
        return NewRequestData(
            req_id=request.request_id,
            token_ids=list(request.all_token_ids),
            num_prompt_tokens=request.num_prompt_tokens,
            sampling_params=params,
            block_ids=self.kv.block_ids(request.request_id),
            num_computed_tokens=request.num_computed_tokens,
            eos_token_ids=request.eos_token_ids | request.stop_token_ids,
            seed=None if params.seed is None else params.seed + request.index,
            num_prompt_logprobs=request.num_prompt_logprobs,
            prompt_logprobs_from=request.num_scored_prompt_tokens,
        )

    def _preempt(self, request: Request) -> None:
        if request.num_prompt_logprobs >= 0:
            # Every prompt position computed so far has been (or is being) scored: the
            # resumed request skips them, and may find their blocks cached.
            request.num_scored_prompt_tokens = max(
                request.num_scored_prompt_tokens,
                min(request.num_computed_tokens, request.num_prompt_positions),
            )
        self._free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_proposer_tokens = 0  # its rows' proposer state goes with its blocks
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    def update_from_output(self, runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Appends a step's tokens and finishes what should stop. With async scheduling this
        runs after the next step was scheduled: a request may meanwhile have been preempted
        (its token still counts) or finished (its token is dropped).

        A request's tokens are appended one at a time, as without speculation: a stop inside
        a run of accepted drafts ends the output there. Its rejected drafts roll
        ``num_computed_tokens`` back; the next step's drafts are kept for its scheduling."""
        requests = self.requests
        outputs: list[EngineCoreOutput] = []
        logprobs: Optional[LogprobsLists] = runner_output.logprobs
        prompt_chunks = runner_output.prompt_logprobs
        drafts = runner_output.spec_token_ids
        spec_stats = self.spec_stats
        # Requests whose drafts this step verified: drafts, accepted (for the controller).
        verified: list[str] = []
        verified_drafts: list[int] = []
        verified_accepted: list[int] = []
        stopped_requests: list[Request] = []
        first_logprob = 0  # index of the request's first token in ``logprobs``
        for i, (rid, tokens) in enumerate(
            zip(runner_output.req_ids, runner_output.sampled_token_ids)
        ):
            start, first_logprob = first_logprob, first_logprob + len(tokens)
            request = requests.get(rid)
            if request is None:
                continue  # finished or aborted while the step ran
            request.num_output_placeholders -= 1
            num_drafts, request.num_drafts_in_flight = request.num_drafts_in_flight, 0
            if num_drafts:
                # Drafts past the accepted ones were computed for nothing: their KV slots
                # are overwritten by the tokens that come next.
                request.num_computed_tokens -= num_drafts - (len(tokens) - 1)
                spec_stats.observe(num_drafts, len(tokens) - 1)
                verified.append(rid)
                verified_drafts.append(num_drafts)
                verified_accepted.append(len(tokens) - 1)
            preempted = request.status == RequestStatus.PREEMPTED
            stopped = False
            num_kept = 0
            for token in tokens:
                request.append_output_token(token)
                num_kept += 1
                if request.check_stop(token):
                    stopped = True
                    break
            new_logprobs = None
            if logprobs is not None:
                new_logprobs = [
                    (logprobs.token_ids[j], logprobs.logprobs[j], logprobs.ranks[j])
                    for j in range(start, start + num_kept)
                ]
            outputs.append(EngineCoreOutput(
                request, tokens if num_kept == len(tokens) else tokens[:num_kept],
                new_logprobs, stopped,
                None if prompt_chunks is None else prompt_chunks.get(rid),
            ))
            if stopped:
                del requests[rid]
                stopped_requests.append(request)
                if preempted:  # its blocks are already free
                    self.waiting.remove(request)
                else:
                    self.running.remove(request)
                    self._free(request)
            elif drafts is not None and not preempted:
                request.spec_token_ids = drafts[i]
                request.num_proposer_tokens = request.num_tokens
        if prompt_chunks:  # partial prefill chunks: prompt logprobs without a token
            sampled = set(runner_output.req_ids)
            for rid, chunk in prompt_chunks.items():
                request = requests.get(rid)
                if request is not None and rid not in sampled:
                    outputs.append(EngineCoreOutput(request, [], prompt_logprobs=chunk))
        if self.speculation is not None and spec_stats.changed:
            self.speculation.observe_acceptance(spec_stats)
            self.speculation.observe_requests(verified, verified_drafts, verified_accepted)
        for request in stopped_requests:
            self._forget(request)
        return outputs

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions_total=self.num_preemptions_total,
            kv=self.kv.stats(self.running),
            spec_decoding=None if self.speculation is None else self.spec_stats.snapshot(),
        )
