"""Finding the rows behind a failed sampling call, so that only their requests fail.

Sampling runs as one batched call, so an exception there names no request. This runs only
after such a failure (never on the normal path): each row is sampled on its own to find those
that fail alone, a greedy row proves the sampler itself still works, and the other rows are
then sampled together. Seeded generators are rewound before each try (the failed call may
already have drawn from them), so those rows draw exactly what they would have drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import numpy as np
import torch

from pagedserve.worker.sampler import Sampler, SamplerOutput, SamplingMetadata

MetadataFor = Callable[[np.ndarray], SamplingMetadata]
Rewind = Callable[[np.ndarray], None]


def greedy_metadata() -> SamplingMetadata:
    """Metadata of one plain greedy row: no penalties, bans, generators or logprobs."""
    return SamplingMetadata(
        temperature=None, all_greedy=True, all_random=False, top_k=None, top_p=None,
        min_p=None, generators={}, output_counts=None, seen_mask=None,
        repetition_penalty=None, presence_penalty=None, frequency_penalty=None,
        banned_rows=None, banned_tokens=None, max_num_logprobs=-1,
    )


def sample_isolating(
    sampler: Sampler,
    logits: torch.Tensor,
    rows: np.ndarray,
    metadata_for: MetadataFor,
    rewind: Rewind,
    failure: BaseException,
) -> tuple[Optional[SamplerOutput], np.ndarray, dict[int, BaseException]]:
    """After ``failure`` sampling ``rows`` (one per ``logits`` row): returns the sampled output
    of the rows that work on their own (None if none does), their positions in ``rows``, and
    the exception of each row that fails alone, by batch row. ``rewind(rows)`` puts those
    rows' seeded generators back to where they were before the step.

    Re-raises ``failure`` when no row explains it: none fails alone, or all do and a plain
    greedy row fails too (the sampler or the device is broken, not a request).
    """
    bad: dict[int, BaseException] = {}
    for i in range(len(rows)):
        rewind(rows[i:i + 1])
        try:
            sampler(logits[i:i + 1], metadata_for(rows[i:i + 1]))
        except Exception as e:
            bad[i] = e
    if not bad:
        raise failure
    if len(bad) == len(rows):
        try:
            sampler(logits[:1], greedy_metadata())
        except Exception:
            raise failure from None
    keep = np.array([i for i in range(len(rows)) if i not in bad], dtype=np.int64)
    out = None
    if len(keep):
        rewind(rows[keep])
        out = sampler(logits[torch.from_numpy(keep).to(logits.device)], metadata_for(rows[keep]))
    return out, keep, {int(rows[i]): e for i, e in bad.items()}
