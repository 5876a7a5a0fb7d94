"""Each running request's own acceptance, resting on the engine's pooled one (no torch here).

Requests of one workload differ a lot: at batch 1 on held-out code, four prompts drafted by one
draft model had mean acceptance lengths of 2.30, 3.94, 2.30 and 2.52 with three drafts. An
estimate pooled over all requests, measured on a request whose drafts did not pay, kept
drafting off for the next one, whose drafts would have paid 1.67x, until probes had moved the
pool. So each request's acceptance at position j is its own drafts there plus
``prior_weight`` drafts at the pooled acceptance: a new request is priced at the pool, and
within a few drafting steps at what its own drafts show. Its own counts fade as the pool's do,
with each draft that reaches a position and with the steps since it last had drafts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class _Counts:
    reached: np.ndarray  # per position: drafts of this request that reached it (fading)
    accepted: np.ndarray  # ... and were accepted there
    step: int  # the controller's step when they were last observed


class RequestAcceptance:
    """Owns each running request's draft counts per position (from ``admit`` or ``observe``
    until ``forget``) and prices a batch from them: its mean tokens per drafted request for each k,
    and the acceptance a probe may hope for."""

    def __init__(self, max_num_drafts: int, prior_weight: float, draft_horizon: int,
                 step_horizon: int) -> None:
        self.max_num_drafts = max_num_drafts
        self.prior_weight = prior_weight
        self._draft_fade = 1.0 - 1.0 / draft_horizon
        self._step_fade = 1.0 - 1.0 / step_horizon
        self._counts: dict[str, _Counts] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def admit(self, request_ids: Sequence[str], step: int) -> int:
        """Starts counting for those of the requests not seen before; returns how many."""
        counts, k = self._counts, self.max_num_drafts
        new = 0
        for rid in request_ids:
            if rid not in counts:
                counts[rid] = _Counts(np.zeros(k), np.zeros(k), step)
                new += 1
        return new

    def observe(self, request_id: str, num_drafts: int, num_accepted: int, step: int) -> None:
        """One verification of ``num_drafts`` drafts of the request, ``num_accepted`` of them
        accepted, at the controller's ``step``."""
        counts = self._counts.get(request_id)
        if counts is None:
            k = self.max_num_drafts
            counts = self._counts[request_id] = _Counts(np.zeros(k), np.zeros(k), step)
        reached = min(num_accepted, num_drafts - 1) + 1
        fade = self._step_fade ** (step - counts.step)
        counts.reached *= fade
        counts.accepted *= fade
        counts.reached[:reached] = counts.reached[:reached] * self._draft_fade + 1.0
        counts.accepted[:reached] *= self._draft_fade
        counts.accepted[:num_accepted] += 1.0
        counts.step = step

    def forget(self, request_id: str) -> None:
        self._counts.pop(request_id, None)

    def expected_tokens(self, request_ids: Sequence[str], pooled: Sequence[float],
                        step: int) -> np.ndarray:
        """Per k = 0..max_num_drafts, the mean over the requests of the tokens each emits in a
        step with k drafts (1 + a0 + a0 a1 + ... at its own acceptance)."""
        acceptance, _, rows = self._estimates(request_ids, np.asarray(pooled, dtype=float), step)
        tokens = np.ones((len(acceptance), self.max_num_drafts + 1))
        np.cumsum(np.cumprod(acceptance, axis=1), axis=1, out=tokens[:, 1:])
        tokens[:, 1:] += 1.0
        return rows @ tokens / max(rows.sum(), 1.0)

    def hoped_acceptance(self, request_ids: Sequence[str], pooled: Sequence[float],
                         step: int) -> np.ndarray:
        """Per position, the batch's mean acceptance two standard errors up: what a probe may
        find. Each request's estimate counts its own drafts and the pool's ``prior_weight``;
        a batch of many requests hopes for little more than their mean (their errors
        average out), a single new one for much more than the pool."""
        acceptance, weight, rows = self._estimates(request_ids, np.asarray(pooled, dtype=float),
                                                   step)
        count = max(rows.sum(), 1.0)
        mean = rows @ acceptance / count
        variance = rows @ (acceptance * (1.0 - acceptance) / weight) / count**2
        return np.minimum(mean + 2.0 * np.sqrt(variance), 1.0)

    def _estimates(self, request_ids: Sequence[str], pooled: np.ndarray,
                   step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per request with drafts of its own, then one row for those without: the acceptance
        per position, the drafts it rests on (the pool's counted as ``prior_weight``) and how
        many requests the row stands for."""
        own = [c for c in map(self._counts.get, request_ids) if c is not None]
        reached = np.zeros((len(own) + 1, self.max_num_drafts))
        accepted = np.zeros_like(reached)
        if own:
            fade = self._step_fade ** (step - np.array([c.step for c in own], dtype=float))
            reached[:-1] = np.array([c.reached for c in own]) * fade[:, None]
            accepted[:-1] = np.array([c.accepted for c in own]) * fade[:, None]
        weight = reached + self.prior_weight
        rows = np.ones(len(own) + 1)
        rows[-1] = len(request_ids) - len(own)
        return (accepted + self.prior_weight * pooled) / weight, weight, rows
