"""Where a speculative engine's step time goes: forward, sampling/verification, proposing."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ProposalRecord:
    """One proposer call: requests asked, requests given drafts, the most drafts asked per
    request (k), seconds."""

    num_requests: int
    num_with_drafts: int
    k: int
    seconds: float


@dataclass
class SpecTiming:
    """Owns cumulative seconds per phase of the runner's steps (for the benchmark's time
    split) and the proposer calls not yet handed to the speculation controller."""

    forward: float = 0.0
    sample: float = 0.0  # sampling, or verification with drafts
    propose: float = 0.0
    pending: list[ProposalRecord] = field(default_factory=list)

    def observe_proposal(self, num_requests: int, num_with_drafts: int, k: int,
                         seconds: float) -> None:
        self.propose += seconds
        self.pending.append(ProposalRecord(num_requests, num_with_drafts, k, seconds))

    def take_proposals(self) -> list[ProposalRecord]:
        records, self.pending = self.pending, []
        return records
