"""One sequence being generated, as the scheduler sees it (no torch here)."""

from __future__ import annotations

import enum
import time
from typing import Optional, Union

from pagedserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Where a request is in its life: queued, running, preempted, or how it finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Finished states come last so that ``status > PREEMPTED`` means finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> Optional[str]:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """Owns one sequence's tokens and progress: ``num_computed_tokens`` of ``num_tokens`` are in
    the KV cache; the scheduler's only rule is to close that gap, a prompt chunk or a decode
    token at a time. ``n > 1`` completions are separate Requests that share a ``parent_id``.
    """

    __slots__ = (
        "request_id", "parent_id", "index", "prompt_token_ids", "output_token_ids",
        "all_token_ids", "sampling_params", "eos_token_ids", "stop_token_ids", "max_tokens",
        "min_tokens", "num_computed_tokens", "num_cached_tokens", "status", "stop_reason",
        "block_hashes", "arrival_time", "num_preemptions", "cache_salt",
        "num_output_placeholders", "scheduled_time", "num_prompt_logprobs",
        "num_scored_prompt_tokens", "spec_token_ids", "num_drafts_in_flight",
        "num_proposer_tokens", "draftable",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        *,
        parent_id: Optional[str] = None,
        index: int = 0,
        arrival_time: Optional[float] = None,
        cache_salt: Optional[str] = None,
    ) -> None:
        self.request_id = request_id
        self.parent_id = parent_id if parent_id is not None else request_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset() if sampling_params.ignore_eos else eos_token_ids
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids)
        room = max_model_len - len(prompt_token_ids)
        self.max_tokens = min(sampling_params.max_tokens or room, room)
        self.min_tokens = sampling_params.min_tokens
        self.num_computed_tokens = 0
        # Tokens sampled by steps still on the device, not yet appended (async scheduling).
        self.num_output_placeholders = 0
        self.num_cached_tokens = -1  # set when first scheduled
        self.status = RequestStatus.WAITING
        self.stop_reason: Union[int, str, None] = None
        self.block_hashes: list[int] = []
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.scheduled_time: Optional[float] = None  # when first scheduled (time.monotonic)
        self.num_preemptions = 0
        # Hashes chain from the salt, so only requests with the same salt share blocks.
        self.cache_salt = cache_salt
        # prompt_logprobs: the top-k asked for (-1: none). The first completion computes them
        # for the whole request. Positions below num_scored_prompt_tokens have been scored by
        # an earlier run (before a preemption), so a resumed request may find those cached.
        self.num_prompt_logprobs = (
            sampling_params.prompt_logprobs
            if sampling_params.prompt_logprobs is not None and index == 0 else -1
        )
        self.num_scored_prompt_tokens = 0
        # Speculative decoding: drafts proposed for the next step (not yet part of the
        # sequence), and how many of them the step in flight is verifying.
        self.spec_token_ids: list[int] = []
        self.num_drafts_in_flight = 0
        # Its tokens the proposer had when it last drafted for it: a draft model catches up
        # on the others first (the speculation controller prices that).
        self.num_proposer_tokens = 0
        # Which words a draft completes depends on the drafts before it: a request with bad
        # words of several tokens is not speculated.
        self.draftable = not any(len(w) > 1 for w in sampling_params.bad_words_token_ids or ())

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_prompt_positions(self) -> int:
        """Prompt positions whose logits score a prompt token (every one but the last)."""
        return len(self.prompt_token_ids) - 1

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drops the output tokens past the first ``num_output_tokens`` (a stop string was
        completed inside a run of accepted drafts, which the output must end with)."""
        drop = self.num_output_tokens - num_output_tokens
        if drop > 0:
            del self.output_token_ids[-drop:]
            del self.all_token_ids[-drop:]
            self.num_computed_tokens = min(self.num_computed_tokens, self.num_tokens)

    def max_num_drafts(self) -> int:
        """The most drafts the next step may verify: its tokens may not run past max_tokens
        (hence max_model_len), and a min_tokens bound may not fall inside the run, where the
        stop tokens' ban would apply to some positions and not others."""
        if not self.draftable:
            return 0
        num_out = self.num_output_tokens + self.num_output_placeholders
        limit = self.max_tokens - num_out - 1
        if num_out < self.min_tokens:
            limit = min(limit, self.min_tokens - num_out - 1)
        return max(limit, 0)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def length_reached_with_placeholders(self) -> bool:
        """Whether the tokens still in flight already take the sequence to its length limit:
        it will finish on them, so scheduling it again would only compute a token to drop."""
        return self.num_output_tokens + self.num_output_placeholders >= self.max_tokens

    def check_stop(self, token_id: int) -> bool:
        """Decides, after ``token_id`` was appended, whether the sequence is done (vLLM's order:
        length, then min_tokens, EOS, stop token ids). ``max_tokens`` is already capped by
        the room max_model_len leaves after the prompt."""
        num_out = len(self.output_token_ids)
        if num_out >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        if num_out < self.min_tokens:
            return False
        if token_id in self.eos_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            return True
        if token_id in self.stop_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            self.stop_reason = token_id
            return True
        return False

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )
