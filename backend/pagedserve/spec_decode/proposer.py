"""The proposer interface the model runner drafts through, and the n-gram proposer on it."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from pagedserve.spec_decode.ngram_proposer import NgramConfig, propose


class DraftSource(Protocol):
    """What a proposer reads: the runner's per-row token histories."""

    token_ids: np.ndarray  # [rows, max_model_len]
    num_tokens: np.ndarray  # [rows]


class Proposer(Protocol):
    """Drafts up to ``k`` tokens for each of ``rows`` from what the batch knows (every token
    of those rows is known when it is called). Returns ``(drafts [n, k] int64, counts [n])``;
    ``drafts[i, counts[i]:]`` is padding."""

    def propose(self, batch: DraftSource, rows: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]: ...


class NgramBatchProposer:
    """Prompt lookup over the rows' histories (see ngram_proposer); owns its lookup bounds."""

    def __init__(self, config: NgramConfig) -> None:
        self.config = config

    def propose(self, batch: DraftSource, rows: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
        lengths = batch.num_tokens[rows]
        if not len(rows):
            return np.empty((0, k), np.int64), np.zeros(0, np.int64)
        histories = batch.token_ids[rows, : int(lengths.max())]
        c = self.config
        return propose(histories, lengths, k, c.prompt_lookup_min, c.prompt_lookup_max)
