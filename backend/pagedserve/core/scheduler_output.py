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

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class LogprobsLists:
    """Per sampled request: the sampled token's logprob first, then the top-k (ids, logprobs),
    and the sampled token's rank."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


@dataclass
class ModelRunnerOutput:
    """Tokens sampled this step, for the requests whose scheduled tokens reached the end of
    what is known (prefill done or decode); partial prefill chunks sample nothing."""

    req_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: Optional[LogprobsLists] = None


EMPTY_RUNNER_OUTPUT = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
