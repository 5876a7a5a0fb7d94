"""Each running request's own acceptance, resting on the engine's pooled one (no torch here).

Requests of one workload differ a lot: at batch 1 on held-out code, four prompts drafted by one
draft model had mean acceptance lengths of 2.30, 3.94, 2.30 and 2.52 with three drafts. An
estimate pooled over all requests, measured on a request whose drafts did not pay, kept
drafting off for the next one, whose drafts would have paid 1.67x, until probes had moved the
pool. So each request's acceptance at position j is its own drafts there plus
``prior_weight`` drafts at the pooled acceptance: a new request is priced at the pool, and
within a few drafting steps at what its own drafts show. Its own counts fade with the steps
since they were observed, as the pool's do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class BatchAcceptance:
    """A batch's acceptance, per request and position, and the drafts each estimate rests on
    (the pool's counted as ``prior_weight``)."""

    acceptance: np.ndarray
    weight: np.ndarray

    def expected_tokens(self, errors: float = 0.0) -> list[float]:
        """Per k = 0..max_num_drafts, the mean over the requests of the tokens each emits in
        a step with k drafts (1 + a0 + a0 a1 + ... at its own acceptance, ``errors`` standard
        errors of the batch's mean up)."""
        a = self.acceptance
        if errors:
            a = np.minimum(a + errors * self._standard_error(), 1.0)
        # (sum / count, not mean: numpy's mean costs microseconds more, every step)
        total = np.cumprod(a, axis=1).cumsum(axis=1).sum(axis=0)
        return [1.0, *(total / len(a) + 1.0).tolist()]

    def hoped(self) -> list[float]:
        """Per position, the batch's mean acceptance two standard errors up: what a probe
        may find. A batch of many requests hopes for little more than their mean (their
        errors average out), a single new one for much more than the pool."""
        mean = self.acceptance.sum(axis=0) / len(self.acceptance)
        return np.minimum(mean + 2.0 * self._standard_error(), 1.0).tolist()

    def _standard_error(self) -> np.ndarray:
        """Per position, the standard error of the batch's mean acceptance."""
        a, count = self.acceptance, len(self.acceptance)
        return np.sqrt((a * (1.0 - a) / self.weight).sum(axis=0)) / count


class RequestAcceptance:
    """Owns each running request's draft counts per position (a row of two arrays, from
    ``admit`` or ``observe`` until ``forget``) and gives a batch's acceptance from them
    (``price``). Every operation is a few array operations whatever the batch's size."""

    def __init__(self, max_num_drafts: int, prior_weight: float, step_horizon: int) -> None:
        self.max_num_drafts = max_num_drafts
        self.prior_weight = prior_weight
        self._step_fade = 1.0 - 1.0 / step_horizon
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        # Per slot and position: drafts that reached it, and those accepted there, as of the
        # controller's step in ``_step``.
        self._reached = np.zeros((0, max_num_drafts))
        self._accepted = np.zeros((0, max_num_drafts))
        self._step = np.zeros(0)
        self._positions = np.arange(max_num_drafts)

    def __len__(self) -> int:
        return len(self._slots)

    def admit(self, request_ids: Sequence[str], step: int) -> tuple[np.ndarray, int]:
        """The requests' slots, starting to count for those not seen before (how many: the
        second value)."""
        slots = self._slots
        new = [rid for rid in request_ids if rid not in slots]
        for rid in new:
            if not self._free:
                self._grow()
            slot = slots[rid] = self._free.pop()
            self._reached[slot] = 0.0
            self._accepted[slot] = 0.0
            self._step[slot] = step
        return np.fromiter(map(slots.__getitem__, request_ids), dtype=np.int64,
                           count=len(request_ids)), len(new)

    def observe(self, request_ids: Sequence[str], num_drafts: Sequence[int],
                num_accepted: Sequence[int], step: int) -> None:
        """One verification each of the requests' ``num_drafts`` drafts, ``num_accepted`` of
        them accepted, at the controller's ``step``."""
        if not request_ids:
            return
        slots, _ = self.admit(request_ids, step)
        drafts = np.asarray(num_drafts)
        accepted = np.asarray(num_accepted)
        # Position j was reached when drafts 0..j-1 were all accepted.
        reached = np.minimum(accepted, drafts - 1) + 1
        fade = self._step_fade ** (step - self._step[slots])[:, None]
        pos = self._positions[None, :]
        self._reached[slots] = self._reached[slots] * fade + (pos < reached[:, None])
        self._accepted[slots] = self._accepted[slots] * fade + (pos < accepted[:, None])
        self._step[slots] = step

    def forget(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)

    def price(self, slots: np.ndarray, pooled: Sequence[float], step: int) -> BatchAcceptance:
        """The acceptance of the requests in ``slots`` (from ``admit``), each counting its own
        drafts (faded by the steps since) and the pool's ``prior_weight``."""
        fade = (self._step_fade ** (step - self._step[slots]))[:, None]
        weight = self._reached[slots] * fade + self.prior_weight
        pool = self.prior_weight * np.asarray(pooled, dtype=float)
        return BatchAcceptance((self._accepted[slots] * fade + pool) / weight, weight)

    def _grow(self) -> None:
        old = len(self._step)
        size = max(2 * old, 8)
        for name in ("_reached", "_accepted"):
            grown = np.zeros((size, self.max_num_drafts))
            grown[:old] = getattr(self, name)
            setattr(self, name, grown)
        self._step = np.concatenate([self._step, np.zeros(size - old)])
        self._free.extend(range(size - 1, old - 1, -1))
