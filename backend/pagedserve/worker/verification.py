"""A speculative step's sampling: the target's logits at each request's 1 + k positions in,
the emitted tokens (accepted drafts, then one recovered or bonus token) out, padded per row.

The rejection sampler does the verification; this module lays out its inputs from the
runner's flat batch and computes the emitted tokens' logprobs, all in batch tensor ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pagedserve.worker.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler
from pagedserve.worker.sampler import SamplerOutput, SamplingMetadata, gather_logprobs


@dataclass
class DraftLayout:
    """Where the drafts of the rows that sample sit: per sampling row its draft count, its
    drafts padded to ``[n, k_max]``, and its first logits row in the flat logits."""

    num_drafts: np.ndarray  # [n] int64
    draft_token_ids: np.ndarray  # [n, k_max] int64, PLACEHOLDER_TOKEN_ID past each count
    first_logit: np.ndarray  # [n] int64

    def select(self, mask: np.ndarray) -> DraftLayout:
        """The layout of the rows in ``mask`` (their first logits rows as they were)."""
        return DraftLayout(self.num_drafts[mask], self.draft_token_ids[mask],
                           self.first_logit[mask])


def layout_drafts(
    req_ids: list[Optional[str]], spec: dict[str, list[int]]
) -> DraftLayout:
    """The layout for the sampling rows ``req_ids`` (in order) given the step's scheduled
    drafts by request id."""
    n = len(req_ids)
    counts = np.fromiter((len(spec.get(r, ())) for r in req_ids), np.int64, n)
    k_max = int(counts.max()) if n else 0
    drafts = np.full((n, k_max), PLACEHOLDER_TOKEN_ID, dtype=np.int64)
    if k_max:
        flat = np.fromiter(
            (t for r in req_ids for t in spec.get(r, ())), np.int64, int(counts.sum())
        )
        owner = np.repeat(np.arange(n), counts)
        within = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
        drafts[owner, within] = flat
    return DraftLayout(counts, drafts, np.cumsum(counts + 1) - (counts + 1))


def verify(
    rejection_sampler: RejectionSampler,
    logits: torch.Tensor,
    layout: DraftLayout,
    meta: SamplingMetadata,
    with_logprobs: bool = True,
) -> SamplerOutput:
    """Verifies the drafts against ``logits`` (flat: each sampling row's 1 + k positions in
    order); ``sampled`` is ``[n, 1 + k_max]``, PLACEHOLDER_TOKEN_ID past each row's tokens.
    Logprobs, when asked (and ``with_logprobs``), are those of the raw logits at each emitted
    token's position, one row per emitted token."""
    device = logits.device
    num_drafts = torch.from_numpy(layout.num_drafts).to(device)
    drafts = torch.from_numpy(layout.draft_token_ids).to(device)
    result = rejection_sampler(drafts, num_drafts, logits, meta)
    out = SamplerOutput(sampled=result.token_ids)
    if with_logprobs and meta.max_num_logprobs >= 0:
        emitted = result.token_ids != PLACEHOLDER_TOKEN_ID
        first = torch.from_numpy(layout.first_logit).to(device)
        offsets = torch.arange(result.token_ids.shape[1], device=device)
        positions = (first[:, None] + offsets[None, :])[emitted]
        out.logprob_token_ids, out.logprobs, out.sampled_rank = gather_logprobs(
            logits[positions], result.token_ids[emitted], meta.max_num_logprobs
        )
    return out


def first_positions(logits: torch.Tensor, layout: DraftLayout) -> torch.Tensor:
    """Each sampling row's logits at its first position (where plain decoding samples): what
    is left to sample from when its drafts cannot be verified."""
    return logits[torch.from_numpy(layout.first_logit).to(logits.device)]
