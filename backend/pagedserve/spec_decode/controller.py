"""Adaptive speculation: how many tokens to draft per request, step by step (no torch here).

A step that verifies k drafts per request computes up to B(1 + k) tokens where plain decoding
computes B, and emits 1 + (accepted drafts) tokens per request where plain decoding emits 1.
Whether that pays depends on three measured things:

- the acceptance: per draft position j, how often draft j is accepted once drafts 0..j-1 were
  (so E(k) = 1 + a0 + a0 a1 + ... tokens per drafted request), pooled over all requests and,
  resting on that, each running request's own (acceptance.py: requests differ a lot), and how
  many requests get drafts at all (an n-gram proposer finds none without a match);
- the cost of a step of n tokens, t(n): flat while decoding is bound by reading the weights
  (small batches), growing with n once it is bound by compute (large batches). It is seeded by
  timing forwards at start-up and then follows the measured steps, those that verify drafts
  apart (b requests of 1 + k tokens cost more than b(1 + k) requests of one), each taken to a
  reference context and priced at the context of now (a step's time grows with its requests'
  context: ContextScaling);
- the proposer's cost at a batch of B requests and k drafts each (a draft model's k drafts
  are k forwards over the batch), seeded likewise by timing a drafting step at start-up.

Each step the controller picks the k (0..num_speculative_tokens) with the most tokens per second
and drafts nothing when no k beats plain decoding by ``_MIN_GAIN`` (by ``_KEEP_GAIN`` while it
drafts already), so a large batch runs as if speculation were off. Every ``_PROBE_INTERVAL``
steps it takes the other side once: a step with one draft while it drafts none (nothing is
learnt about acceptance otherwise, and the workload may have changed), a plain step while it
drafts (so that the cost of both is measured, not estimated).
Starting to draft after a pause, or on new requests, also costs the proposer a catch-up on the
tokens it has not seen (the scheduler counts them: a draft model runs on all of them, a dormant
EAGLE-3 head on a window): that call is measured apart, per token caught up on
(``ProposerCostModel.resume_seconds``), and spread over ``_RESUME_HORIZON`` drafting steps in the
choice to start. A probe made while it drafts none waits until that catch-up is a small share
of what it hopes to find (``_PROBE_SHARE``).
Every ``_QUICK_PROBE_INTERVAL`` steps it probes with more drafts: as many as would pay at an
acceptance as high as what was measured lets it be (``_drafts_worth_probing``), where that is
more than it drafts (the acceptance of the positions it skips is learnt too). A probe made
while it drafts none goes on for ``_PROBE_BURST`` steps (its first call is a resume; the
others price drafting as it goes on), and each one that finds drafting still not paying
doubles the wait for the next, up to ``_PROBE_INTERVAL``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from pagedserve.spec_decode.acceptance import BatchAcceptance, RequestAcceptance
from pagedserve.spec_decode.costs import _EMA, ContextScaling, ProposerCostModel, StepCostModel

# The acceptance per position counts the drafts of about this many recent verifications
# that reached it (older ones fade), plus _PRIOR_WEIGHT drafts at the prior: a running
# average weighting each new draft by _EMA rested on the last ~10 drafts, and at batch 4
# (up to 4 drafts a step) swung between 0.4 and 0.85 within a few steps of one workload,
# switching drafting off and on.
_ACCEPTANCE_HORIZON = 128
_PRIOR_WEIGHT = 4.0
# ... and they fade with the steps too, so that after a long pause without drafts the prior
# and the probes count again (each probe is one or a few drafts, ~1% of the weight otherwise:
# a workload whose drafts became good again would wait thousands of steps to be drafted for).
_ACCEPTANCE_STEPS = 256
# Prior acceptance per position before anything is measured: speculate where that pays
# even at an even chance per draft, then learn. Not more: a draft model that starts drafting
# must first catch up on every prompt, which at a large batch costs several steps for a gain
# that is not there.
_PRIOR_ACCEPTANCE = 0.5
_PRIOR_DRAFTED_FRACTION = 1.0
# A request's own acceptance rests on this many drafts at the pooled one (see acceptance.py):
# few enough that a probe's burst of drafts tells a new request's own, enough that one
# rejected draft does not stop drafting for it.
_REQUEST_PRIOR_WEIGHT = 4.0
# Speculate only when the best k is estimated at least this much faster than k = 0: the
# estimate of a step size not measured lately (start-up timings, calibrated) was seen off by up
# to ~10% on the CPU, which at a marginal gain turned speculation into a loss.
_MIN_GAIN = 1.10
# While it drafts, it goes on while the best k is estimated at least this much faster: the
# drafting step sizes are then the ones being measured, and each stop and restart costs a
# draft model a catch-up on the tokens it skipped (at batch 1, choices hovering around
# _MIN_GAIN switched drafting off and on every few steps).
_KEEP_GAIN = 1.02
# ... at an acceptance this many standard errors above the one measured for the batch's
# requests: a request is not judged on its first few drafts (at batch 1, one whose drafts
# gained 3-16% with k fixed stopped drafting after 4 steps of its own), while at large batches
# the mean of many requests moves little.
_KEEP_ERRORS = 1.0
_PROBE_INTERVAL = 64
# Every this many steps, a probe with the drafts that would pay at an optimistic acceptance,
# at least _QUICK_PROBE_GAIN faster, where those are more than pay now (so that the acceptance
# at those positions stays measured; see _drafts_worth_probing).
_QUICK_PROBE_INTERVAL = 8
_QUICK_PROBE_GAIN = 1.05
# Such a probe, made while drafting is off, drafts this many steps in a row: the first call
# is a resume (priced apart), the others price drafting as it goes on. Single-step probes were
# all resumes; a draft model at batch 1 kept the start-up price of three drafts, 1.4x what they
# cost, and stayed off where three drafts gave 1.4x.
_PROBE_BURST = 4
# A probe made while drafting is off also waits until the proposer's catch-up it starts with
# (``ProposerCostModel.resume_seconds``) is at most this share of what it hopes to find (its
# gain at the optimistic acceptance) over the steps since the last drafts. At batch 32 a draft
# model's catch-up on 32 prompts cost ~4 plain steps, for a gain hoped of a few percent, and
# probes 64 steps apart cost more than that; at batch 1, where the hope is 1.3x and more, and
# for a proposer that never catches up (n-gram), the schedule above is unchanged. (A draft
# model's catch-up on the steps skipped grows with the wait: where a step's share of it is
# more than this share of the hope, probes wait until the acceptance measured has faded.)
_PROBE_SHARE = 0.2
# A proposer's call with this many tokens per request it has not seen (steps without drafts,
# new requests' prompts) pays a catch-up (a draft model on all of them, an EAGLE-3 head on a
# window: see ProposerCostModel); starting to draft then is priced with it, spread over this
# many drafting steps. Fewer (a plain probe while drafting) cost the proposer little and are
# not priced.
_RESUME_AFTER = 8
_RESUME_HORIZON = 16


@dataclass
class SpecDecodingStats:
    """Cumulative counts of what verification did (vLLM's spec_decode counters): steps where
    a request had drafts (``num_drafts``), draft tokens, accepted tokens, and accepted tokens
    per draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Requests (with drafts) by number of drafts accepted / drafted: position j's counts are
    # sums over these, so a step costs one increment per request.
    accepted_hist: list[int] = field(default_factory=list)
    drafted_hist: list[int] = field(default_factory=list)
    # ... and by the last position their verification reached (the first rejected draft, or
    # the last draft): position j was reached when drafts 0..j-1 were all accepted.
    reached_hist: list[int] = field(default_factory=list)
    changed: bool = False  # observations since the controller last read them

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        for hist, value in ((self.accepted_hist, num_accepted), (self.drafted_hist, num_drafts),
                            (self.reached_hist, min(num_accepted, num_drafts - 1) + 1)):
            if value >= len(hist):
                hist.extend([0] * (value + 1 - len(hist)))
            hist[value] += 1
        self.changed = True

    @property
    def num_accepted_tokens_per_pos(self) -> list[int]:
        """Accepted drafts at each position j (requests that accepted more than j)."""
        return _tail_sums(self.accepted_hist)

    @property
    def num_draft_tokens_per_pos(self) -> list[int]:
        """Drafts at each position j (requests that drafted more than j)."""
        return _tail_sums(self.drafted_hist)

    @property
    def num_reached_per_pos(self) -> list[int]:
        """Requests whose verification reached position j (drafts 0..j-1 accepted)."""
        return _tail_sums(self.reached_hist)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verification step of a drafted request: 1 + accepted drafts (vLLM's)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def snapshot(self) -> SpecDecodingStats:
        return SpecDecodingStats(self.num_drafts, self.num_draft_tokens,
                                 self.num_accepted_tokens, list(self.accepted_hist),
                                 list(self.drafted_hist), list(self.reached_hist))


def _tail_sums(hist: list[int]) -> list[int]:
    out, running = [], 0
    for count in reversed(hist[1:]):
        running += count
        out.append(running)
    return out[::-1]


class SpeculationController:
    """Owns the choice of k per step from the measured acceptance, the proposer's cost and the
    step cost model (see the module docstring). ``adaptive=False`` always drafts
    ``max_num_drafts``; ``disable_by_batch_size`` (vLLM's) drafts nothing above that many
    running requests either way."""

    def __init__(
        self,
        max_num_drafts: int,
        adaptive: bool = True,
        disable_by_batch_size: Optional[int] = None,
        cost: Optional[StepCostModel] = None,
        propose_cost: Optional[ProposerCostModel] = None,
        verify_cost: Optional[StepCostModel] = None,
    ) -> None:
        self.max_num_drafts = max_num_drafts
        self.adaptive = adaptive
        self.disable_by_batch_size = disable_by_batch_size
        self.cost = cost if cost is not None else StepCostModel()
        # Steps that verify drafts, apart: b requests of 1 + k tokens are not b(1 + k)
        # requests of one (at batch 1 on the CPU, a verification of 4 tokens cost 1.6x a
        # plain step where 4 requests' decode cost 1.2x), and a size verified now and then
        # would otherwise keep the plain steps' price. Seeded with the same start-up
        # timings, its calibration learns what verifying adds; until one is measured, the
        # plain steps' curve prices it.
        self.verify_cost = verify_cost if verify_cost is not None else StepCostModel()
        # How a step's time grows with its context: both step cost models price steps at a
        # reference context, and a choice scales them to the context of now.
        self.context = ContextScaling()
        self.cost.scaling = self.verify_cost.scaling = self.context
        self._context = 0.0  # mean context of the step last scheduled (see num_drafts)
        self._prior = [_PRIOR_ACCEPTANCE] * max_num_drafts
        self.acceptance = list(self._prior)  # conditional, per position
        # Per position: recent drafts that reached it, and those accepted (both fading).
        self._reached_weight = [0.0] * max_num_drafts
        self._accepted_weight = [0.0] * max_num_drafts
        self._steps = 0  # choices made (one a step), and how many when acceptance was observed
        self._steps_observed = 0
        # Each running request's own acceptance, resting on the pooled one above.
        self.requests = RequestAcceptance(max_num_drafts, _REQUEST_PRIOR_WEIGHT,
                                          _ACCEPTANCE_STEPS)
        self.drafted_fraction = _PRIOR_DRAFTED_FRACTION
        # The proposer's time per draft position, for the whole batch, by batch size.
        self.propose_cost = propose_cost if propose_cost is not None else ProposerCostModel()
        self._seen_accepted: list[int] = []
        self._seen_reached: list[int] = []
        self._steps_since_probe = 0
        self._steps_since_deep_probe = 0
        # Steps between probes with every draft: doubled by each one made while drafting
        # did not pay, back to the quickest once it does (see num_drafts).
        self._deep_probe_interval = _QUICK_PROBE_INTERVAL
        # A probe made while drafting was off goes on this many more steps (with its drafts,
        # the last choice).
        self._burst_left = 0
        # Tokens of the running requests the proposer has not seen (see num_drafts).
        self._backlog = 0
        self._steps_without_drafts = 0  # in a row, up to the last choice
        self.last_choice = max_num_drafts
        # The acceptance of the batch of the last choice, each request at its own (None: the
        # requests were not named).
        self._batch: Optional[BatchAcceptance] = None
        self._hoped_tokens: Optional[list[float]] = None  # ... at the hoped acceptance
        self._drafting = False  # whether the last choice, probes aside, was to draft

    # ---- what was measured ---------------------------------------------------------------

    def observe_acceptance(self, stats: SpecDecodingStats) -> None:
        """Folds the counts since the last call into the per-position acceptance rates."""
        stats.changed = False
        accepted = stats.num_accepted_tokens_per_pos
        reached = stats.num_reached_per_pos
        elapsed = self._fade_since_observed()
        self._steps_observed = self._steps
        for j in range(self.max_num_drafts):
            self._reached_weight[j] *= elapsed
            self._accepted_weight[j] *= elapsed
            new_reached = _at(reached, j) - _at(self._seen_reached, j)
            if new_reached > 0:
                fade = (1.0 - 1.0 / _ACCEPTANCE_HORIZON) ** new_reached
                self._reached_weight[j] = self._reached_weight[j] * fade + new_reached
                self._accepted_weight[j] = (self._accepted_weight[j] * fade
                                            + _at(accepted, j) - _at(self._seen_accepted, j))
            # A position seldom reached is priced like the one before it (a draft's
            # acceptance once the previous draft was accepted is rarely lower): at the fixed
            # prior, a third draft that a draft model reached in one step of ten stayed at
            # 0.5 where it was accepted 0.9 of the time, and k 3 never paid.
            prior = self.acceptance[j - 1] if j else self._prior[0]
            self.acceptance[j] = ((self._accepted_weight[j] + _PRIOR_WEIGHT * prior)
                                  / (self._reached_weight[j] + _PRIOR_WEIGHT))
        self._seen_accepted, self._seen_reached = accepted, reached

    def observe_requests(self, request_ids: Sequence[str], num_drafts: Sequence[int],
                         num_accepted: Sequence[int]) -> None:
        """A step's verifications of the requests' drafts, one each (their own acceptance; the
        pooled one comes from SpecDecodingStats). Only an adaptive choice reads them."""
        if self.adaptive:
            self.requests.observe(request_ids, num_drafts, num_accepted, self._steps)

    def forget_request(self, request_id: str) -> None:
        """The request has finished: its own acceptance goes."""
        self.requests.forget(request_id)

    def observe_step(self, num_tokens: int, seconds: float, verified: bool = False,
                     num_requests: Optional[int] = None) -> None:
        """A decode step of ``num_tokens`` for ``num_requests`` (default: one token each) took
        ``seconds`` (the proposer's share apart); ``verified``: some of its requests had
        drafts. Its mean context is the one given with the last choice (``num_drafts``): the
        one of this step. The cost models price steps at a reference context
        (ContextScaling)."""
        b = num_tokens if num_requests is None else num_requests
        if not verified:
            self.context.observe(b, self._context, seconds)
        (self.verify_cost if verified else self.cost).observe(num_tokens, seconds, b,
                                                              self._context)

    def observe_proposal(self, num_requests: int, num_with_drafts: int, k: int,
                         seconds: float) -> None:
        """One proposer call for ``num_requests`` requests, asked for up to ``k`` drafts each:
        how many got drafts, and what the call cost, priced per draft position (a draft
        model's k steps each cost a forward over the batch)."""
        if num_requests:
            self.drafted_fraction += _EMA * (num_with_drafts / num_requests
                                             - self.drafted_fraction)
        if not k or not num_requests:
            return
        # The call the last choice asked for, after that choice's backlog.
        if self._backlog >= _RESUME_AFTER * num_requests:
            self.propose_cost.observe_resume(num_requests, k, seconds, self._backlog)
        elif self._backlog <= (1 + self.max_num_drafts) * num_requests:
            self.propose_cost.observe(num_requests, k, seconds)

    # ---- the choice ----------------------------------------------------------------------

    def expected_tokens(self, k: int, acceptance: Optional[list[float]] = None) -> float:
        """Tokens a drafted request emits per step with k drafts: 1 + a0 + a0 a1 + ...
        (``acceptance``: the measured one unless given)."""
        total, reach = 1.0, 1.0
        for a in (self.acceptance if acceptance is None else acceptance)[:k]:
            reach *= a
            total += reach
        return total

    def speedup(self, num_running: int, k: int,
                acceptance: Optional[list[float]] = None, resuming: bool = False,
                tokens: Optional[float] = None) -> float:
        """Estimated tokens per second with k drafts over tokens per second without, a
        drafted request emitting ``tokens`` a step (by default as many as the pooled
        acceptance, or ``acceptance`` if given, makes); ``resuming``: the proposer's catch-up
        after a pause spread over the drafting steps that follow."""
        if k == 0:
            return 1.0
        b = float(max(num_running, 1))
        f = self.drafted_fraction
        scale = self.context.factor(b, self._context)
        base = self._plain_seconds(b)
        n = b * (1.0 + f * k)
        # Verifying n tokens costs at least a plain step of n tokens (the same forward, with
        # logits at every position): a size never verified at this batch is priced from its
        # start-up timing, calibrated at other sizes, and that priced 32 requests' one draft
        # each below their plain step measured, where it cost 1.5x (a draft model drafted at
        # batch 32 from the first step, and paid the catch-up on every prompt).
        verify = self.cost.seconds(n)
        if self.verify_cost.observed:
            verify = max(verify, self.verify_cost.seconds(n))
        step = verify * scale + self.propose_cost.seconds(b, k)
        if resuming:
            step += self.propose_cost.resume_seconds(b, self._backlog) / _RESUME_HORIZON
        if tokens is None:
            tokens = self.expected_tokens(k, acceptance)
        return (1.0 + f * (tokens - 1.0)) * base / step

    def num_drafts(self, num_running: int, can_draft: bool = True,
                   context: float = 0.0, backlog: Optional[int] = None,
                   request_ids: Optional[Sequence[str]] = None) -> int:
        """How many tokens to draft per request for the next step of ``num_running``, whose
        mean context is about ``context`` tokens (that of the step just scheduled); the
        proposer's next call first catches up on ``backlog`` tokens of theirs it has not seen
        (by default one per request per step without drafts); ``request_ids``: the running
        requests, each priced at its own acceptance (see acceptance.py; without them, every
        request at the pooled one);
        ``can_draft`` False: none of them may take a draft next step (each is at its last
        token), so none is proposed, and no probe is spent: at batch 1 with 64-token requests
        the probe every 64 steps fell on each request's last step, drafted for nothing, and
        the controller never learnt that drafts had become good."""
        self._context = context
        self._backlog = (num_running * self._steps_without_drafts if backlog is None
                         else backlog)
        if not can_draft:
            return 0
        if self.disable_by_batch_size is not None and num_running > self.disable_by_batch_size:
            return 0
        if not self.adaptive or not self.cost.known:
            return self.max_num_drafts
        self._steps += 1
        self._batch = self._price(request_ids) if request_ids else None
        self._hoped_tokens = None
        best_k, best = 0, _KEEP_GAIN if self._drafting else _MIN_GAIN
        resuming = self._backlog >= _RESUME_AFTER * max(num_running, 1)
        tokens = self._expected_tokens(_KEEP_ERRORS if self._drafting else 0.0)
        for k in range(1, self.max_num_drafts + 1):
            gain = self.speedup(num_running, k, resuming=resuming, tokens=tokens[k])
            if gain > best:
                best_k, best = k, gain
        if best_k and not self._drafting:
            self._steps_since_probe = 0  # plain steps were measured until now
        self._drafting = best_k > 0  # the choice itself, probes aside
        # Now and then the other choice, so that both sides of the comparison are measured
        # steps: one drafting step while drafting does not pay (has the workload changed?),
        # one plain step while it does (what does a step without drafts cost now?).
        self._steps_since_probe += 1
        self._steps_since_deep_probe += 1
        if best_k:
            self._deep_probe_interval = _QUICK_PROBE_INTERVAL
            self._burst_left = 0  # drafting under way: a probe's burst has done its work
        if self._burst_left:  # (0 whenever best_k is not)
            self._burst_left -= 1
            best_k = self.last_choice  # the probe's drafts: each step of it chose them
        elif (best_k < self.max_num_drafts
                and self._steps_since_deep_probe >= self._deep_probe_interval
                and (probe_k := self._drafts_worth_probing(num_running, best_k > 0)) > best_k
                and (best_k or self._affordable(num_running, probe_k))):
            self._steps_since_deep_probe = 0
            if not best_k:
                # A workload whose drafts do not pay here (a batch too large for this
                # proposer, drafts that miss) would otherwise pay for a probe every few steps
                # for good.
                self._deep_probe_interval = min(2 * self._deep_probe_interval,
                                                _PROBE_INTERVAL)
                # A probe's first call catches up on the steps without drafts, which says
                # nothing about what drafting costs from then on: the steps after it do.
                self._burst_left = _PROBE_BURST - 1
            best_k = probe_k
        elif (self._steps_since_probe >= _PROBE_INTERVAL
                and (best_k or self._affordable(num_running, 1))):
            self._steps_since_probe = 0
            best_k = 1 if best_k == 0 else 0
        self._steps_without_drafts = 0 if best_k else self._steps_without_drafts + 1
        self.last_choice = best_k
        return best_k

    def _price(self, request_ids: Sequence[str]) -> BatchAcceptance:
        """The batch's acceptance, each request at its own (RequestAcceptance.price).

        New requests bring the next probe nearer by their share of the batch: the probes that
        found drafting not paying drafted for other requests (at batch 1, a request whose
        drafts paid 1.67x waited up to ``_PROBE_INTERVAL`` steps behind one whose drafts did
        not pay). The wait after that probe stays as long as before: a proposer whose drafts
        pay for no request is probed once more per request, not every few steps again."""
        slots, new = self.requests.admit(request_ids, self._steps)
        if new:
            self._steps_since_deep_probe += self._deep_probe_interval * new / len(request_ids)
        return self.requests.price(slots, self.acceptance, self._steps)

    def _drafts_worth_probing(self, num_running: int, drafting: bool) -> int:
        """The most drafts that would pay here at an acceptance as high as what was measured
        lets it be (``optimistic_acceptance``, and at least the prior): 0 if none would. While
        it drafts none (``drafting`` False), paying means enough to start drafting
        (``_MIN_GAIN``): at batch 32, where drafting at best broke even, probes at the lower
        gain came every few steps and cost more than they found.

        Such probes come soon: while little is known yet, while the last requests' drafts
        were poor and the next ones' may not be, and while fewer drafts pay (the later
        positions' acceptance is learnt too). Where none would pay (a large batch, drafts
        measured poor many times over), probes stay rare: each costs a verification of every
        row's drafts, and a draft model the catch-up on every token it skipped. Judged at the
        prior acceptance and one draft, a draft model at batch 1 (where one draft does not
        pay, three do) never probed deeper than one draft, and took a thousand steps to learn
        what a few probes of three tell."""
        hoped = self._hoped_expected_tokens()
        gain = _QUICK_PROBE_GAIN if drafting else _MIN_GAIN
        for k in range(self.max_num_drafts, 0, -1):
            if self.speedup(num_running, k, tokens=hoped[k]) > gain:
                return k
        return 0

    def _affordable(self, num_running: int, k: int) -> bool:
        """Whether a probe with k drafts, made now while drafting is off, starts with a
        catch-up within ``_PROBE_SHARE`` of what it hopes to find (its gain at the hoped
        acceptance) over the steps since the last drafts."""
        catch_up = self.propose_cost.resume_seconds(num_running, self._backlog)
        if not catch_up:
            return True
        hoped = self.speedup(num_running, k, tokens=self._hoped_expected_tokens()[k]) - 1.0
        plain = self._plain_seconds(max(num_running, 1))
        return catch_up <= _PROBE_SHARE * hoped * self._steps_without_drafts * plain

    def _plain_seconds(self, num_running: float) -> float:
        """A plain step of ``num_running`` requests at the context of now."""
        return self.cost.seconds(num_running) * self.context.factor(num_running, self._context)

    def _expected_tokens(self, errors: float = 0.0) -> list[float]:
        """Per k, the tokens a drafted request of the batch being chosen for emits a step
        with k drafts: at each request's own acceptance where the scheduler named them
        (``errors`` standard errors of their mean up), else at the pooled one."""
        if self._batch is not None:
            return self._batch.expected_tokens(errors)
        return [self.expected_tokens(k) for k in range(self.max_num_drafts + 1)]

    def _hoped_expected_tokens(self) -> list[float]:
        """The same at the acceptance a probe may find (once a step)."""
        if self._hoped_tokens is None:
            acceptance = self._hoped_acceptance()
            if self._batch is not None:
                acceptance = [max(a, b) for a, b in zip(acceptance, self._batch.hoped())]
            self._hoped_tokens = [self.expected_tokens(k, acceptance)
                                  for k in range(self.max_num_drafts + 1)]
        return self._hoped_tokens

    def _hoped_acceptance(self) -> list[float]:
        """What a probe may find: the optimistic acceptance, at least the prior."""
        return [max(a, prior) for a, prior in zip(self.optimistic_acceptance(), self._prior)]

    def optimistic_acceptance(self) -> list[float]:
        """Per position, the acceptance two standard errors above the measured one, the
        drafts behind it counted as they fade (``_ACCEPTANCE_STEPS``): 1.0 with nothing
        measured, close to the measured one after many drafts, and wider again the longer
        nothing was drafted."""
        fade = self._fade_since_observed()
        out = []
        for a, weight in zip(self.acceptance, self._reached_weight):
            n = weight * fade + _PRIOR_WEIGHT
            out.append(min(1.0, a + 2.0 * math.sqrt(a * (1.0 - a) / n)))
        return out

    def _fade_since_observed(self) -> float:
        """How much the drafts counted so far have faded since acceptance was last observed
        (``_ACCEPTANCE_STEPS``)."""
        return (1.0 - 1.0 / _ACCEPTANCE_STEPS) ** (self._steps - self._steps_observed)


def _at(values: list[int], j: int) -> int:
    return values[j] if 0 <= j < len(values) else 0
