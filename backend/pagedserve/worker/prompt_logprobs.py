"""Prompt logprobs (vLLM's ``prompt_logprobs``): for each prompt position, the logprob and rank
of the next prompt token and the top-k, computed from a step's hidden states.

Only the requests that asked pay for it, and never for the whole prompt's vocabulary-wide
logits at once: the positions are scored a slice of rows at a time, so a step holds at most
``SLICE_ELEMENTS`` logits beyond what sampling holds. With chunked prefill each chunk scores
its own positions (the last position of a chunk scores the first token of the next one, which
the prompt already holds); the prompt's last position is the sampling position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.core.scheduler_output import LogprobsLists, PromptLogprobsChunk
from pagedserve.worker.sampler import gather_logprobs

# Logits (fp32) held at once while scoring prompt positions: 32 MiB, e.g. 256 rows of a 32k
# vocabulary. The log-softmax and the rank comparison take about as much again.
SLICE_ELEMENTS = 1 << 23


def slice_rows(vocab_size: int) -> int:
    """Prompt positions scored together."""
    return max(1, SLICE_ELEMENTS // vocab_size)


@dataclass
class PromptLogprobsPlan:
    """Which of a step's flattened tokens to score, for the requests that asked: request
    ``i`` owns the next ``counts[i]`` entries of ``token_index`` and ``targets``."""

    req_ids: list[str]
    first_positions: list[int]  # the prompt position of each request's first entry
    counts: list[int]
    num_logprobs: list[int]  # the top-k each request asked for
    token_index: np.ndarray  # [N] int64: rows of the step's hidden states
    targets: np.ndarray  # [N] int64: the prompt token each of those rows scores


@dataclass
class PromptLogprobsTensors:
    """A plan's results: ids and logprobs ``[N, k+1]`` (the prompt token first, then the top
    ``k`` of the widest request), ranks ``[N]``; on the host once the step is collected."""

    plan: PromptLogprobsPlan
    token_ids: torch.Tensor
    logprobs: torch.Tensor
    ranks: torch.Tensor

    def to_chunks(self) -> dict[str, PromptLogprobsChunk]:
        """Per request, its entries as lists (each cut to the top-k that request asked for)."""
        plan = self.plan
        ids, lps, ranks = self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()
        widest = self.token_ids.shape[1]
        chunks: dict[str, PromptLogprobsChunk] = {}
        start = 0
        for rid, first, count, k in zip(
            plan.req_ids, plan.first_positions, plan.counts, plan.num_logprobs
        ):
            end = start + count
            if k + 1 == widest:
                lists = LogprobsLists(ids[start:end], lps[start:end], ranks[start:end])
            else:
                lists = LogprobsLists([row[:k + 1] for row in ids[start:end]],
                                      [row[:k + 1] for row in lps[start:end]],
                                      ranks[start:end])
            chunks[rid] = PromptLogprobsChunk(first, lists)
            start = end
        return chunks


def compute_prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    plan: PromptLogprobsPlan,
    vocab_size: int,
) -> PromptLogprobsTensors:
    """Scores the plan's rows of ``hidden`` (the step's hidden states), ``slice_rows`` at a
    time, from the model's raw logits."""
    device = hidden.device
    index = torch.from_numpy(plan.token_index).to(device)
    targets = torch.from_numpy(plan.targets).to(device)
    n, width = len(plan.token_index), max(plan.num_logprobs) + 1
    token_ids = torch.empty((n, width), dtype=torch.int64, device=device)
    logprobs = torch.empty((n, width), dtype=torch.float32, device=device)
    ranks = torch.empty(n, dtype=torch.int64, device=device)
    step = slice_rows(vocab_size)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        logits = compute_logits(hidden.index_select(0, index[rows]))
        token_ids[rows], logprobs[rows], ranks[rows] = gather_logprobs(
            logits, targets[rows], width - 1
        )
        del logits
    return PromptLogprobsTensors(plan, token_ids, logprobs, ranks)
