"""What the scheduler hands the model runner each step (a diff), and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pagedserve.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen (new, or resumed after preemption): its full state."""

    req_id: str
    token_ids: list[int]  # every known token: prompt, then outputs so far
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: frozenset[int]  # what min_tokens must hold back
    seed: Optional[int]  # per-request generator seed, or None
    # prompt_logprobs: the top-k (-1: none), and the first prompt position still to score
    # (positions before it were scored before a preemption).
    num_prompt_logprobs: int = -1
    prompt_logprobs_from: int = 0


@dataclass
class SchedulerOutput:
    """One step's work. Requests run in ``num_scheduled_tokens`` order; a request the runner
    already holds only reports its new blocks. Rows of ``finished_req_ids`` are dropped first."""

    scheduled_new_reqs: list[NewRequestData]
    new_block_ids: dict[str, list[int]]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)
    num_preempted: int = 0
    # Speculative decoding: the draft tokens scheduled after each request's next token (they
    # are among its num_scheduled_tokens), and how many the runner should draft per request
    # for the next step once this one's tokens are known (0: none).
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    num_lookahead_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class LogprobsLists:
    """Per sampled token: its logprob first, then the top-k (ids, logprobs), and its rank."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


@dataclass
class PromptLogprobsChunk:
    """One step's prompt logprobs of one request: entry ``i`` scores prompt token
    ``first_position + i + 1`` (the prompt token first, then the top-k, as LogprobsLists)."""

    first_position: int
    lists: LogprobsLists


@dataclass
class ModelRunnerOutput:
    """Tokens this step emitted, for the requests whose scheduled tokens reached the end of
    what is known (prefill done or decode); partial prefill chunks sample nothing. A request
    emits one token, or with speculation its accepted drafts and one more. Requests that asked
    for prompt logprobs get those of the prompt positions this step computed.

    ``logprobs`` has one entry per emitted token, request after request. ``spec_token_ids``
    holds, per request, the drafts proposed for its next step (after the emitted tokens)."""

    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    logprobs: Optional[LogprobsLists] = None
    prompt_logprobs: Optional[dict[str, PromptLogprobsChunk]] = None
    spec_token_ids: Optional[list[list[int]]] = None


EMPTY_RUNNER_OUTPUT = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
