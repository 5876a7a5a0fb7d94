"""What speculation costs (no torch here): a decode step of n tokens, a proposer call, and how
both grow with the requests' context. The speculation controller prices its choice of k with
these (see controller.py)."""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Iterable, Optional

# Weight of a new observation in the running averages.
_EMA = 0.1
# A cost estimate of one size is the lower third of its last this many measured times (see
# StepCostModel).
_COST_WINDOW = 16
# How a step's time grows with context is fitted over this many plain steps of one batch
# size, again after every this many new ones, where their mean contexts spread over at least
# this many tokens (see ContextScaling); a factor it gives is kept within this and its
# inverse (far from the contexts fitted, the line says little).
_CONTEXT_SAMPLES = 64
_CONTEXT_REFIT = 8
_CONTEXT_SPREAD = 16.0
_MIN_CONTEXT_FACTOR = 0.25


class RecentTimes:
    """The last ``_COST_WINDOW`` times measured of one size, and the estimate they give: their
    lower third. Whatever else runs on the host slows a step and never speeds one up, so the
    low end is what the step itself costs (on a shared CPU, times of one size were seen to
    vary by 2x, and a plain average made whichever size was measured last look dearest); a
    window, not a running average that a time above it moves slowly, so that a size measured
    only now and then is priced from what it cost, not held near a low start (verifying 32
    requests' drafts was priced 57 ms where it took 74, and EAGLE-3 drafted at a loss)."""

    __slots__ = ("times", "normalized", "estimate")

    def __init__(self) -> None:
        # Each time with the (requests, mean context) of its step where it is to be taken to
        # the reference context (see ContextScaling), else None; and each taken there.
        self.times: deque[tuple[float, Optional[tuple[int, float]]]] = deque(
            maxlen=_COST_WINDOW)
        self.normalized: deque[float] = deque(maxlen=_COST_WINDOW)
        self.estimate = 0.0

    def add(self, seconds: float, where: Optional[tuple[int, float]] = None,
            scaling: Optional[ContextScaling] = None) -> float:
        self.times.append((seconds, where))
        self.normalized.append(_at_reference(seconds, where, scaling))
        return self._estimate()

    def update(self, scaling: Optional[ContextScaling]) -> float:
        """The estimate again, each time taken to the reference context by ``scaling``."""
        self.normalized.clear()
        self.normalized.extend(_at_reference(t, where, scaling) for t, where in self.times)
        return self._estimate()

    def _estimate(self) -> float:
        self.estimate = lower_third(self.normalized)
        return self.estimate


def lower_third(times: Iterable[float]) -> float:
    """What a step costs, from times measured of it on a shared host (see RecentTimes)."""
    ordered = sorted(times)
    return ordered[(len(ordered) - 1) // 3]


def _at_reference(seconds: float, where: Optional[tuple[int, float]],
                  scaling: Optional[ContextScaling]) -> float:
    return seconds if where is None or scaling is None else seconds / scaling.factor(*where)


class StepCostModel:
    """Owns t(n), the seconds of a decode step that computes n tokens, by power-of-two bucket.

    Start-up timings (``seed``) give the curve's shape; measured steps (``observe``) price a
    bucket as they come (RecentTimes), and scale the buckets not measured yet by how measured
    steps compare with their start-up figure (real steps also attend to long contexts, sample
    and prepare inputs). Between known buckets t is linear in n; below the smallest it is
    flat, above the largest proportional to n (compute-bound).

    With ``scaling``, steps observed with their context are priced at its reference context
    (ContextScaling: the caller scales a price to the context of now), and again after each
    new fit of it."""

    def __init__(self, scaling: Optional[ContextScaling] = None) -> None:
        self.scaling = scaling
        self._fits_seen = scaling.fits if scaling is not None else 0  # fits the prices follow
        self._seeded: dict[int, float] = {}  # bucket exponent -> start-up seconds
        self._observed: dict[int, RecentTimes] = {}  # bucket exponent -> measured
        self._calibration = 1.0  # measured / start-up, where both are known
        # (sizes, times) as ``seconds`` reads them, rebuilt after a change: the controller
        # prices several step sizes every step, where a rebuild each time cost ~0.2 ms.
        self._curve: Optional[tuple[list[float], list[float]]] = None

    @staticmethod
    def _bucket(num_tokens: int) -> tuple[int, float]:
        """The bucket of ``num_tokens`` and the factor that scales a step to the bucket's
        size (so that neighbours in one bucket agree)."""
        b = max(0, round(math.log2(max(num_tokens, 1))))
        return b, (2**b) / max(num_tokens, 1) if num_tokens > 2**b else 1.0

    def seed(self, num_tokens: int, seconds: float) -> None:
        b, scale = self._bucket(num_tokens)
        self._seeded[b] = seconds * scale
        self._curve = None

    def observe(self, num_tokens: int, seconds: float, num_requests: Optional[int] = None,
                context: Optional[float] = None) -> None:
        """A step of ``num_tokens`` took ``seconds``; with ``context`` (its requests' mean,
        ``num_requests`` of them, by default one per token) it is priced at the reference
        context of ``scaling``."""
        self._follow_fit()
        b, scale = self._bucket(num_tokens)
        where = None if context is None else (num_requests or num_tokens, context)
        new = self._observed.setdefault(b, RecentTimes()).add(seconds * scale, where,
                                                              self.scaling)
        seeded = self._seeded.get(b)
        if seeded:
            self._calibration += _EMA * (new / seeded - self._calibration)
        self._curve = None

    def _follow_fit(self) -> None:
        """After a new fit of the context scaling, every bucket's estimate again."""
        if self.scaling is None or self.scaling.fits == self._fits_seen:
            return
        self._fits_seen = self.scaling.fits
        for recent in self._observed.values():
            recent.update(self.scaling)
        self._curve = None

    @property
    def known(self) -> bool:
        return bool(self._seeded or self._observed)

    @property
    def observed(self) -> bool:
        return bool(self._observed)

    def _build_curve(self) -> tuple[list[float], list[float]]:
        table = {b: t * self._calibration for b, t in self._seeded.items()}
        table.update((b, recent.estimate) for b, recent in self._observed.items())
        points = sorted(table.items())
        sizes = [2.0**b for b, _ in points]
        times = [t for _, t in points]
        # A step of fewer tokens never costs more than one of more: a time above a larger
        # size's is noise (a start-up timing or a measurement slowed by other work).
        for i in range(len(times) - 2, -1, -1):
            times[i] = min(times[i], times[i + 1])
        return sizes, times

    def seconds(self, num_tokens: float) -> float:
        self._follow_fit()
        if self._curve is None:
            self._curve = self._build_curve()
        sizes, times = self._curve
        if not sizes:
            return 1.0
        n = max(num_tokens, 1.0)
        if n <= sizes[0]:
            return times[0]
        if n >= sizes[-1]:
            return times[-1] * n / sizes[-1]
        i = bisect.bisect_left(sizes, n)  # sizes[i - 1] < n <= sizes[i]
        n0, t0, n1, t1 = sizes[i - 1], times[i - 1], sizes[i], times[i]
        return t0 + (t1 - t0) * (n - n0) / (n1 - n0)


class ProposerCostModel:
    """Owns the proposer's seconds per call for a batch of n requests and k drafts each.

    Per draft position (a draft model's k drafts are k forwards over the batch), as
    StepCostModel follows steps: seeded by start-up timings of a drafting step (a draft
    model's; none for a proposer as cheap as n-gram lookup: then 0 until measured), then the
    measured calls divided by k. And per call at each k measured, by power-of-two bucket of
    n: a draft model's first forward of a call also catches up on the tokens the last step
    accepted and costs more than its one-token steps, so k x (a position) underprices small k;
    a k not measured yet at that batch size is priced from the nearest one measured, plus or
    minus that many positions. Both follow the low end of the times measured (RecentTimes),
    which matters here twice: a draft model that was idle for a few steps (a plain probe, a new
    request's prompt) first catches up on every token it missed, a call that costs many
    drafting steps once and says nothing about what drafting costs from then on.

    ``extra_forwards``: the forwards a call makes beyond its k drafting steps (an EAGLE-3
    head's catch-up over the tokens the last step accepted, before its first draft; none for
    a draft model, whose first drafting forward takes them). Without it, a call of k drafts
    was priced at k forwards where it makes k + 1, and where drafting stays off but for
    probes, every call is a resume (priced apart) and the ordinary price never learns better:
    EAGLE-3 at batch 1 went on drafting at a loss."""

    def __init__(self, extra_forwards: int = 0) -> None:
        self.extra_forwards = extra_forwards
        self.per_position = StepCostModel()
        self._calls: dict[tuple[int, int], RecentTimes] = {}  # (bucket, k) -> at its size
        # A resuming call's seconds beyond an ordinary one's per token of catch-up per
        # request, by batch size (none: free).
        self.resume = StepCostModel()

    @property
    def known(self) -> bool:
        return self.per_position.known

    def seed(self, num_requests: int, seconds: float) -> None:
        self.per_position.seed(num_requests, seconds)

    def observe(self, num_requests: int, k: int, seconds: float) -> None:
        b, scale = StepCostModel._bucket(num_requests)
        self._calls.setdefault((b, k), RecentTimes()).add(seconds * scale)
        self.per_position.observe(num_requests, seconds / (k + self.extra_forwards))

    def observe_resume(self, num_requests: int, k: int, seconds: float, backlog: int) -> None:
        """A call that first caught up on ``backlog`` tokens its proposer had not seen (steps
        without drafts, new requests' prompts): what it cost beyond an ordinary call of k
        drafts, per token of catch-up per request. It costs at least what an ordinary call
        does, so one that cost less than an ordinary call's price says that price is too
        high, and is taken for an ordinary call too: where drafting stays off but for probes,
        every call is a resume, and a draft model at batch 1 kept the start-up price of three
        drafts (5.6 ms where they took 3-4) and never found that three paid."""
        price = self.seconds(num_requests, k)
        if seconds < price:
            self.observe(num_requests, k, seconds)
        per_row = max(backlog / max(num_requests, 1), 1.0)
        self.resume.observe(num_requests, max(seconds - price, 0.0) / per_row)

    def resume_seconds(self, num_requests: float, backlog: float) -> float:
        """The catch-up's price at ``num_requests`` with ``backlog`` tokens to catch up on
        (0 until one was measured): a draft model's grows with it (at batch 32, 30 ms after
        a pause of 30 steps, 110 ms on new prompts of 130 tokens)."""
        if not self.resume.known:
            return 0.0
        return self.resume.seconds(num_requests) * backlog / max(num_requests, 1.0)

    def seconds(self, num_requests: float, k: int) -> float:
        if not self.known:
            return 0.0
        b, scale = StepCostModel._bucket(round(num_requests))
        measured = [j for (bucket, j) in self._calls if bucket == b]
        if not measured:
            return (k + self.extra_forwards) * self.per_position.seconds(num_requests)
        nearest = min(measured, key=lambda j: (abs(j - k), j))  # a tie: a step added
        call = self._calls[(b, nearest)].estimate / scale
        # A call of k drafts makes every forward one of fewer drafts makes: it never costs
        # less than one measured at a smaller k. A few lucky times of k 2 priced it below
        # k 1 (2.8 against 3.3 ms for an EAGLE-3 head at batch 1), and k 2 was chosen where
        # drafting did not pay.
        floor = max((self._calls[(b, j)].estimate for j in measured if j < k), default=0.0)
        # A k not measured costs no more than one measured at a larger k, whose forwards
        # include its own: a k 1 timed at 5.9 ms (probes, on a loaded host) priced k 2 from it
        # at 7.7 ms where k 3 was measured at 5.9. (A k measured keeps its own times: where
        # they contradict a larger k's, the floor above settles it on the dearer side.)
        ceiling = math.inf if nearest == k else min(
            (self._calls[(b, j)].estimate for j in measured if j > k), default=math.inf)
        estimate = call + (k - nearest) * self.per_position.seconds(num_requests)
        return max(min(estimate, ceiling / scale), floor / scale, 0.0)


class ContextScaling:
    """Owns how a decode step's time grows with its requests' context: at a batch of b
    requests (by power-of-two bucket), t = u + v c for a mean context of c tokens, fitted over
    that batch's plain steps. ``factor(b, c)`` = (u + v c) / (u + v c_ref) takes a step's time
    measured at context c to a reference context c_ref (the mean context of the batch's first
    fit; the cost models price steps there) and back to the context of now.

    On the CPU a step's attention is a large share of it: 32 requests' plain step took 21 ms
    at a context of 130 tokens and 29 ms at 190, and steps measured at different contexts were
    compared as one size. The verification steps of a wave's start looked cheap next to the
    plain steps of its end (and the other way round at the next wave's start), and a draft
    model drafted at a loss at both ends of each wave of requests.

    The fit: the plain steps kept (``_CONTEXT_SAMPLES``) in four groups by context, each
    group's lower third of times (what the step costs; see RecentTimes), and the least-squares
    line through those four points. No fit (factor 1) while the contexts seen are too close
    together to tell: a server whose requests' contexts stay spread alike needs none.
    ``fits`` counts the fits made, so that the cost models price their steps again."""

    def __init__(self) -> None:
        self._samples: dict[int, deque[tuple[float, float]]] = {}  # bucket -> (context, s)
        self._since_fit: dict[int, int] = {}
        self._lines: dict[int, tuple[float, float, float]] = {}  # bucket -> (u, v, c_ref)
        self.fits = 0

    def observe(self, num_requests: int, context: float, seconds: float) -> None:
        """A plain decode step of ``num_requests`` at a mean ``context`` took ``seconds``."""
        b, _ = StepCostModel._bucket(num_requests)
        samples = self._samples.setdefault(b, deque(maxlen=_CONTEXT_SAMPLES))
        samples.append((context, seconds))
        self._since_fit[b] = self._since_fit.get(b, 0) + 1
        if self._since_fit[b] >= _CONTEXT_REFIT and len(samples) >= 4 * 3:
            self._since_fit[b] = 0
            self._fit(b, samples)

    def _fit(self, b: int, samples: deque[tuple[float, float]]) -> None:
        ordered = sorted(samples)
        size = len(ordered) // 4
        points = []
        for i in range(4):
            group = ordered[i * size:(i + 1) * size]
            points.append((sum(c for c, _ in group) / size, lower_third(t for _, t in group)))
        cs = [c for c, _ in points]
        if cs[-1] - cs[0] < _CONTEXT_SPREAD:
            return
        mean_c, mean_t = sum(cs) / 4, sum(t for _, t in points) / 4
        # A step never gets cheaper with more context: a negative slope is the host's noise.
        v = max(0.0, sum((c - mean_c) * (t - mean_t) for c, t in points)
                / sum((c - mean_c) ** 2 for c in cs))
        c_ref = self._lines[b][2] if b in self._lines else mean_c
        self._lines[b] = (mean_t - v * mean_c, v, c_ref)
        self.fits += 1

    def factor(self, num_requests: float, context: float) -> float:
        """A step of ``num_requests`` requests at a mean ``context``, over one at the
        reference context (by the line of the nearest batch size fitted; 1 without one)."""
        if not self._lines:
            return 1.0
        b, _ = StepCostModel._bucket(round(num_requests))
        line = self._lines.get(b)
        if line is None:
            line = self._lines[min(self._lines, key=lambda fitted: (abs(fitted - b), fitted))]
        u, v, c_ref = line
        at_ref = u + v * c_ref
        # Far outside the contexts fitted the line says little (it may cross 0 below them).
        return min(max((u + v * context) / at_ref, _MIN_CONTEXT_FACTOR),
                   1.0 / _MIN_CONTEXT_FACTOR) if at_ref > 0 else 1.0
