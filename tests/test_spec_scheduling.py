"""Speculative decoding in the scheduler (no model): drafts scheduled with the decode token,
rejected ones rolled back, limits, and the adaptive choice of k."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest
from test_scheduler import BS, FakeRunner, make_request, make_scheduler, run_to_end

from pagedserve.core.request import RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.spec_decode.config import SpeculativeConfig
from pagedserve.spec_decode.controller import (
    _PRIOR_ACCEPTANCE,
    _PROBE_BURST,
    _PROBE_INTERVAL,
    _PROBE_SHARE,
    SpecDecodingStats,
    SpeculationController,
)
from pagedserve.spec_decode.costs import ContextScaling, ProposerCostModel, StepCostModel


def _token(rid: str, position: int) -> int:
    return 1 + (sum(map(ord, rid)) * 7 + position * 13) % 40  # never EOS (0)


def _drafts(rid: str, position: int, k: int) -> list[int]:
    # Right except at every third position, so runs are partly accepted.
    return [_token(rid, position + i) if (position + i) % 3 else 41 for i in range(k)]


def _speculating(num_blocks=64, budget=32, k=4, **kwargs) -> Scheduler:
    sched = make_scheduler(num_blocks=num_blocks, budget=budget, **kwargs)
    sched.speculation = SpeculationController(k, adaptive=False)
    return sched


def _add(sched: Scheduler, num: int = 5) -> None:
    for i in range(num):
        sched.add_request(make_request(f"r{i}", 5 + 3 * i, max_tokens=9 + i, first=10 * i))


@pytest.mark.parametrize("num_blocks, budget", [(64, 32), (9, 32), (64, 7)],
                         ids=["plain", "preemption", "tight-budget"])
def test_drafts_change_no_token(num_blocks, budget):
    plain = make_scheduler(num_blocks=num_blocks, budget=budget)
    _add(plain)
    expected = {r.request_id: r.output_token_ids
                for r in run_to_end(plain, FakeRunner(token_fn=_token))}
    sched = _speculating(num_blocks, budget)
    _add(sched)
    runner = FakeRunner(token_fn=_token, draft_fn=_drafts)
    got = {r.request_id: r.output_token_ids for r in run_to_end(sched, runner)}
    assert got == expected
    assert runner.num_drafted > 0 and 0 < runner.num_accepted < runner.num_drafted
    stats = sched.spec_stats
    assert (stats.num_draft_tokens, stats.num_accepted_tokens) == (
        runner.num_drafted, runner.num_accepted)
    assert sched.kv.pool.num_free_blocks == num_blocks
    if num_blocks == 9:
        assert sched.num_preemptions_total > 0


def test_the_scheduler_tells_the_controller_what_the_proposer_has_not_seen():
    """With each choice of k: the running requests' mean context, the backlog of tokens the
    proposer will catch up on first (new requests' prompts, then a token per request per step
    without drafts; none once it drafts every step), and which requests run."""
    sched = _speculating(budget=64)
    seen, ids = [], []
    choose = sched.speculation.num_drafts
    plan = iter([0, 0, 0] + [4] * 50)  # three steps without drafts, then drafts

    def spy(num_running, can_draft=True, context=0.0, backlog=None, request_ids=None):
        seen.append((context, backlog))
        ids.append(list(request_ids))
        choose(num_running, can_draft, context, backlog, request_ids)
        return next(plan)

    sched.speculation.num_drafts = spy
    _add(sched, 2)  # prompts of 5 and 8 tokens
    runner = FakeRunner(token_fn=_token, draft_fn=_drafts)
    for _ in range(5):
        sched.update_from_output(runner.run(sched, sched.schedule()))
    assert seen[0] == (0.0, 13)  # both prompts, only prefilled
    assert [backlog for _, backlog in seen[1:4]] == [15, 17, 19]  # + a token each a step
    assert seen[1][0] == pytest.approx((6 + 9) / 2)  # the step's mean context
    assert seen[4][1] == 0  # the proposer drafted after the last step: it saw everything
    assert ids == [["r0", "r1"]] * 5  # each priced at its own acceptance


def test_rejected_drafts_roll_back_and_never_enter_the_prefix_cache():
    sched = _speculating()
    sched.add_request(make_request("a", BS + 2, max_tokens=20))
    runner = FakeRunner(token_fn=_token, draft_fn=lambda rid, pos, k: [41] * k)  # all wrong
    sched.update_from_output(runner.run(sched, sched.schedule()))  # prefill
    request = sched.requests["a"]
    assert request.spec_token_ids == [41] * 4
    out = sched.schedule()
    assert out.scheduled_spec_decode_tokens == {"a": [41] * 4}
    assert out.num_scheduled_tokens == {"a": 5}
    assert request.num_computed_tokens == request.num_tokens + 4
    sched.update_from_output(runner.run(sched, out))
    assert request.num_tokens == BS + 4 and request.num_computed_tokens == BS + 3
    # Only blocks of known tokens were hashed (the drafts reached into a second block).
    assert sched.kv.num_cached_blocks["a"] == 1
    assert 41 not in request.all_token_ids


def test_drafts_are_clipped_at_max_tokens_and_min_tokens():
    sched = _speculating(k=6)
    sched.add_request(make_request("a", 4, max_tokens=3))
    runner = FakeRunner(token_fn=_token, draft_fn=lambda rid, pos, k: [
        _token(rid, pos + i) for i in range(k)])
    sched.update_from_output(runner.run(sched, sched.schedule()))
    out = sched.schedule()
    # One token out; two to go: the token the step samples plus at most one draft.
    assert len(out.scheduled_spec_decode_tokens["a"]) == 1
    (core,) = sched.update_from_output(runner.run(sched, out))
    assert core.finished and len(core.request.output_token_ids) == 3
    assert core.request.status == RequestStatus.FINISHED_LENGTH

    request = make_request("b", 4, max_tokens=50)
    request.min_tokens = 5
    request.output_token_ids = [1, 2]
    assert request.max_num_drafts() == 2  # tokens 3, 4 and 5 all fall under min_tokens
    request.output_token_ids = [1] * 5
    assert request.max_num_drafts() == 50 - 5 - 1


def test_no_drafts_are_asked_for_when_no_request_can_take_one():
    """A step whose requests all sample their last token asks the proposer for nothing (its
    drafts would be dropped), and an adaptive controller spends no probe on it."""
    sched = _speculating(k=3)
    sched.add_request(make_request("a", 4, max_tokens=3))
    runner = FakeRunner(token_fn=_token, draft_fn=lambda rid, pos, k: [1] * k)
    out = sched.schedule()  # the prompt; its token is the first of three
    assert out.num_lookahead_tokens == 3
    sched.update_from_output(runner.run(sched, out))
    out = sched.schedule()  # the second token, and a draft of the third: the last
    assert len(out.scheduled_spec_decode_tokens["a"]) == 1
    assert out.num_lookahead_tokens == 0

    controllers = [SpeculationController(3, cost=_cost(flat_until=16)) for _ in range(2)]
    for controller in controllers:
        _observe(controller, 3, 0, 200)  # drafting does not pay: a probe now and then
    unblocked = [controllers[0].num_drafts(1) for _ in range(252)]
    blocked = [controllers[1].num_drafts(1, can_draft=i % 64 != 63) for i in range(256)]
    assert all(c == 0 for c in blocked[63::64])
    # The steps that could not draft changed nothing: the others choose as if they were not.
    assert [c for i, c in enumerate(blocked) if i % 64 != 63] == unblocked
    assert sum(map(bool, unblocked)) >= 4


def test_a_stop_token_inside_an_accepted_run_ends_the_output_there():
    stop = _token("a", 7)
    sched = _speculating(k=4)
    request = make_request("a", 4, max_tokens=20)
    request.stop_token_ids = frozenset({stop})
    sched.add_request(request)
    runner = FakeRunner(token_fn=_token, draft_fn=lambda rid, pos, k: [
        _token(rid, pos + i) for i in range(k)])
    (finished,) = run_to_end(sched, runner)
    assert finished.output_token_ids[-1] == stop
    assert len(finished.output_token_ids) == 4  # positions 4..7
    assert sched.kv.pool.num_free_blocks == 64


def test_a_preempted_request_loses_its_drafts():
    sched = _speculating(num_blocks=5)
    for rid in ("a", "b"):
        sched.add_request(make_request(rid, 2 * BS - 2, max_tokens=40))
    runner = FakeRunner(token_fn=_token, draft_fn=lambda rid, pos, k: [41] * k)
    for _ in range(6):
        out = sched.schedule()
        if out.num_preempted:
            break
        sched.update_from_output(runner.run(sched, out))
    assert sched.num_preemptions_total > 0
    for request in sched.waiting:
        assert request.spec_token_ids == []


# ---- the controller -------------------------------------------------------------------------

def _cost(flat_until: int) -> StepCostModel:
    """t(n) = 1 ms up to ``flat_until`` tokens, then proportional."""
    cost = StepCostModel()
    for i in range(12):
        n = 1 << i
        cost.seed(n, 1e-3 * max(1.0, n / flat_until))
    return cost


def _observe(controller: SpeculationController, k: int, accepted: int, times: int) -> None:
    stats = SpecDecodingStats()
    for _ in range(times):
        stats.observe(k, accepted)
    controller.observe_acceptance(stats)


def test_controller_speculates_at_small_batch_and_stops_at_large_batch():
    controller = SpeculationController(4, cost=_cost(flat_until=16))
    _observe(controller, 4, 3, 200)
    assert controller.num_drafts(1) == 4
    assert controller.num_drafts(256) == 0
    assert 0 < controller.num_drafts(8) <= 4


def test_controller_turns_speculation_off_when_nothing_is_accepted():
    controller = SpeculationController(4, cost=_cost(flat_until=16))
    _observe(controller, 4, 0, 200)
    assert controller.acceptance[0] < 0.05
    assert controller.num_drafts(1) == 0
    # ...but looks again now and then, in case the workload changed: soon where drafting
    # would pay at the prior acceptance (a small batch), then less and less often while the
    # probes keep finding nothing (8, 16, 32, 64, 64... steps apart), rarely where not even
    # then. Each such probe drafts a few steps in a row (the first catches up).
    choices = [controller.num_drafts(1) for _ in range(248)]
    probes = [i for i, c in enumerate(choices) if c == 4]  # every position: each is measured
    starts = [i for i in probes if i - 1 not in probes]
    assert [b - a for a, b in zip(starts, starts[1:])] == [16, 32, 64, 64, 64]
    for start in starts[:-1]:
        assert choices[start:start + _PROBE_BURST] == [4] * _PROBE_BURST
    assert starts[0] < 8 and sum(1 for c in choices if c) <= len(probes) + 248 // 64
    left = _PROBE_BURST - (len(choices) - starts[-1])  # the last probe goes on
    assert [controller.num_drafts(1) for _ in range(left + 1)] == [4] * left + [0]
    assert controller.num_drafts(256) == 0
    choices = [controller.num_drafts(256) for _ in range(200)]
    assert 0 < sum(1 for c in choices if c) <= 200 // 32


@pytest.mark.parametrize("catch_up", [5e-3, 50e-3])
def test_a_probe_waits_until_its_catch_up_is_a_small_share_of_what_it_may_find(catch_up):
    """A probe made while drafting is off starts with the proposer's catch-up (here on new
    requests' prompts, 16 tokens): it waits until that is at most _PROBE_SHARE of what it
    hopes to find over the steps since the last drafts (with k drafts at the prior acceptance:
    1.94x a 1 ms step at k 4, 1.5x at k 1)."""
    controller = SpeculationController(4, cost=_cost(flat_until=16))
    _observe(controller, 4, 0, 200)
    controller.propose_cost.resume.observe(1, catch_up / 16)  # per token, per request

    def wait(k: int) -> float:
        hoped = controller.speedup(1, k, [_PRIOR_ACCEPTANCE] * 4) - 1.0
        return catch_up / (_PROBE_SHARE * hoped * 1e-3)

    choices = [controller.num_drafts(1, backlog=16) for _ in range(1200)]
    drafted = [i for i, c in enumerate(choices) if c]
    starts = [i for i in drafted if not choices[i - 1]]
    assert len(starts) >= 3 and wait(4) - 1 <= starts[0] <= wait(4) + 1
    for start in starts:
        plain_before = start - 1 - max((i for i in drafted if i < start), default=-1)
        assert plain_before >= wait(choices[start]) - 1
    for start, end in zip(starts, starts[1:]):  # as soon as one may
        assert end - start <= max(wait(4) + _PROBE_BURST, _PROBE_INTERVAL) + 1


def test_a_probe_that_finds_drafting_paying_ends_its_burst():
    """A probe's burst measures drafting once under way; drafting that then starts has done
    that, and a later stop is not followed by the rest of the burst."""
    controller = SpeculationController(4, cost=_cost(flat_until=16))
    _observe(controller, 4, 0, 200)
    while controller.num_drafts(1) == 0:  # a probe: the first step of its burst
        pass
    controller.acceptance = [0.9] * 4
    assert controller.num_drafts(1) == 4  # drafting pays
    controller.acceptance = [0.0] * 4
    assert controller.num_drafts(1) == 0


def test_controller_needs_a_larger_gain_to_start_drafting_than_to_go_on():
    """Hysteresis: a gain estimated between _KEEP_GAIN and _MIN_GAIN starts no drafting but
    keeps it going (each stop and restart costs a draft model a catch-up)."""
    controller = SpeculationController(4, cost=_cost(flat_until=16))
    marginal, poor = [0.05, 0.0, 0.0, 0.0], [0.01, 0.0, 0.0, 0.0]  # 1.05x and 1.01x at k 1
    controller.acceptance = list(marginal)
    assert controller.num_drafts(1) == 0
    controller.acceptance = [0.9] * 4
    assert controller.num_drafts(1) == 4
    controller.acceptance = list(marginal)
    assert [controller.num_drafts(1) for _ in range(2)] == [1] * 2  # (no probe yet: 8 steps)
    controller.acceptance = list(poor)
    assert controller.num_drafts(1) == 0
    controller.acceptance = list(marginal)
    assert controller.num_drafts(1) == 0


def test_controller_measures_a_plain_step_now_and_then_while_it_drafts():
    controller = SpeculationController(4, cost=_cost(flat_until=16))
    _observe(controller, 4, 3, 200)
    choices = [controller.num_drafts(1) for _ in range(200)]
    assert 0 < choices.count(0) <= 200 // 32 and choices.count(4) > 190


def test_controller_measures_every_position_while_it_drafts_fewer():
    controller = SpeculationController(4, cost=_cost(flat_until=16))
    controller.acceptance = [0.8, 0.8, 0.2, 0.2]
    controller.observe_proposal(1, 1, 4, seconds=4 * 0.3e-3)  # a third of a step: k 2 pays best
    choices = [controller.num_drafts(1) for _ in range(64)]
    assert choices.count(2) > 48 and 64 // 16 <= choices.count(4) <= 64 // 8


def test_controller_does_not_price_the_catch_up_after_steps_without_drafts():
    controller = SpeculationController(4, cost=_cost(flat_until=16))
    _observe(controller, 4, 0, 200)
    while controller.num_drafts(1) == 0:  # a probe after steps without drafts
        pass
    controller.observe_proposal(1, 1, 4, seconds=4 * 50e-3)  # catching up on them
    assert controller.propose_cost.seconds(1, 4) == 0.0  # nothing measured yet
    controller.num_drafts(1)
    controller.observe_proposal(1, 1, 4, seconds=4 * 1e-4)
    assert controller.propose_cost.seconds(1, 4) == pytest.approx(4e-4)


def test_controller_prices_resuming_by_what_the_proposer_catches_up_on():
    """A proposer's first call on many tokens it has not seen (a draft model's after steps
    without drafts, or on new requests' prompts) is measured apart, per token caught up on,
    and starting to draft with such a backlog is priced with it: a catch-up that costs more
    than drafting would gain over the next steps keeps k at 0; with little to catch up on,
    drafting starts. A short pause (a plain probe while drafting) is not taken for a
    resume."""

    def paused(resume_seconds: float) -> SpeculationController:
        controller = SpeculationController(4, cost=_cost(flat_until=16))
        _observe(controller, 4, 0, 200)  # nothing accepted: no drafts...
        for _ in range(2):  # ...but probes, each after 20 tokens the proposer has not seen
            while controller.num_drafts(1, backlog=20) == 0:
                pass
            controller.observe_proposal(1, 1, 4, seconds=resume_seconds)  # it caught up first
            for _ in range(_PROBE_BURST - 1):  # the probe goes on a few steps
                assert controller.num_drafts(1, backlog=1) == 4
        for _ in range(10):  # a pause again
            assert controller.num_drafts(1, backlog=20) == 0
        controller.acceptance = [0.9] * 4  # drafting would now pay 4x a step, minus resuming
        return controller

    assert paused(resume_seconds=1e-3).num_drafts(1, backlog=20) == 4
    costly = paused(resume_seconds=100e-3)  # 100 steps' worth, spread over 16 steps
    assert costly.propose_cost.resume_seconds(1, 20) == pytest.approx(100e-3)
    assert costly.propose_cost.resume_seconds(1, 40) == pytest.approx(200e-3)
    assert costly.num_drafts(1, backlog=20) == 0
    assert costly.num_drafts(1, backlog=2) == 4  # little to catch up on
    # Once drafting, it goes on: the resume is paid.
    assert costly.speedup(1, 4) > 2

    controller = SpeculationController(4, cost=_cost(flat_until=16))
    _observe(controller, 4, 3, 200)
    choices = [controller.num_drafts(1) for _ in range(64)]  # with one plain step
    assert choices.count(0) == 1
    while controller.num_drafts(1) == 0:
        pass
    controller.observe_proposal(1, 1, 4, seconds=50e-3)
    assert controller.propose_cost.resume_seconds(1, 20) == 0.0


def test_proposer_cost_prices_each_k_as_measured():
    """A draft model's first forward of a call costs more than its one-token steps: the calls
    measured at each k price it, the others are priced from the nearest, a position apart
    each."""
    cost = ProposerCostModel()
    cost.seed(1, 1e-3)  # a one-token step at start-up
    assert cost.seconds(1, 3) == pytest.approx(3e-3)
    for _ in range(150):
        cost.observe(1, 1, 2.0e-3)  # catch-up forward only
        cost.observe(1, 3, 4.0e-3)  # catch-up forward, then two steps
    assert cost.seconds(1, 1) == pytest.approx(2.0e-3, rel=0.01)
    assert cost.seconds(1, 3) == pytest.approx(4.0e-3, rel=0.01)
    step = cost.per_position.seconds(1)
    assert cost.seconds(1, 4) == pytest.approx(4.0e-3 + step, rel=0.01)
    assert cost.seconds(1, 2) == pytest.approx(2.0e-3 + step, rel=0.01)  # nearest: k 1


def test_proposer_cost_never_prices_more_drafts_below_fewer():
    """Times measured at k 2 that came out lower than those at k 1 (noise on a shared CPU)
    do not make k 2 the cheaper call: it makes the forwards k 1 makes, and one more."""
    cost = ProposerCostModel(extra_forwards=1)
    cost.seed(1, 1e-3)
    for _ in range(20):
        cost.observe(1, 1, 3.3e-3)
        cost.observe(1, 2, 2.8e-3)
    assert cost.seconds(1, 1) == pytest.approx(3.3e-3)
    assert cost.seconds(1, 2) == pytest.approx(3.3e-3)
    assert cost.seconds(1, 3) >= cost.seconds(1, 2)
    for _ in range(20):
        cost.observe(1, 2, 4.0e-3)  # measured dearer since: its own price again
    assert cost.seconds(1, 2) == pytest.approx(4.0e-3)


def test_proposer_cost_never_prices_fewer_drafts_above_more_measured():
    """A k not measured, priced from a smaller k measured dear (probes on a loaded host), is
    not priced above a larger k measured: its forwards are among that call's."""
    cost = ProposerCostModel()
    cost.seed(1, 1e-3)
    for _ in range(20):
        cost.observe(1, 1, 5.9e-3)
        cost.observe(1, 3, 5.9e-3)
    assert cost.seconds(1, 2) == pytest.approx(5.9e-3)
    assert cost.seconds(1, 1) == pytest.approx(5.9e-3)  # measured: its own times
    assert cost.seconds(1, 3) == pytest.approx(5.9e-3)


def test_a_resume_cheaper_than_the_ordinary_price_corrects_it():
    """A call that caught up first costs at least an ordinary one: where it cost less than
    the ordinary price (a start-up timing), that price comes down to it."""
    cost = ProposerCostModel()
    cost.seed(1, 2e-3)
    assert cost.seconds(1, 3) == pytest.approx(6e-3)
    cost.observe_resume(1, 3, 3e-3, backlog=20)
    assert cost.seconds(1, 3) == pytest.approx(3e-3)
    assert cost.resume_seconds(1, 20) == 0.0
    for _ in range(3):
        cost.observe_resume(1, 3, 5e-3, backlog=20)  # dearer: the resume's own cost...
    assert cost.seconds(1, 3) == pytest.approx(3e-3)
    assert cost.resume_seconds(1, 20) == pytest.approx(2e-3)
    assert cost.resume_seconds(1, 40) == pytest.approx(4e-3)  # ...per token caught up on


def test_controller_probes_with_the_drafts_that_could_pay():
    """With nothing measured, probes draft every position where some k would pay at a high
    acceptance, even where one draft would not pay at the prior (a draft model at batch 1:
    the first forward of a call costs a step, the next ones little). Where at most two drafts
    could pay (a batch where verifying costs more with each draft), probes draft two."""
    propose = ProposerCostModel()
    for _ in range(16):
        propose.observe(1, 1, 1.0e-3)
        propose.observe(1, 3, 1.4e-3)
    controller = SpeculationController(3, cost=_cost(flat_until=16), propose_cost=propose)
    assert controller.speedup(1, 1, [0.5] * 3) < 1.0  # one draft: no gain at the prior
    assert controller.speedup(1, 3, [1.0] * 3) > 1.5
    choices = [controller.num_drafts(1) for _ in range(16)]
    assert choices.count(3) >= _PROBE_BURST

    controller = SpeculationController(3, cost=_cost(flat_until=16))
    stats = SpecDecodingStats()
    for accepted in [0] * 140 + [1] * 40 + [2] * 13 + [3] * 7:  # ~0.3 a position, often
        stats.observe(3, accepted)
    controller.observe_acceptance(stats)
    choices = [controller.num_drafts(8) for _ in range(64)]
    assert choices.count(1) > 48 and choices.count(2) >= 4 and 3 not in choices


def test_proposer_cost_counts_the_forwards_beyond_the_drafts():
    """An EAGLE-3 head's call makes k + 1 forwards (its catch-up over the accepted tokens,
    then k drafting steps): priced so from the start-up timing of one, and a measured call
    divides into k + 1 positions."""
    cost = ProposerCostModel(extra_forwards=1)
    cost.seed(1, 1e-3)
    assert cost.seconds(1, 3) == pytest.approx(4e-3)
    assert cost.seconds(1, 1) == pytest.approx(2e-3)
    for _ in range(300):
        cost.observe(1, 3, 6e-3)
    assert cost.per_position.seconds(1) == pytest.approx(1.5e-3, rel=0.01)
    assert cost.seconds(1, 1) == pytest.approx(6e-3 - 2 * 1.5e-3, rel=0.01)  # from k 3


@pytest.mark.parametrize("extra_forwards, drafts", [(0, True), (1, False)])
def test_controller_prices_a_head_that_catches_up_before_drafting(extra_forwards, drafts):
    """At 60% acceptance a position, with a step of 1 ms and a proposer forward of 0.3 ms,
    k forwards a call pay (k 3: 2.18 tokens for 1.9 ms), k + 1 do not (2.2 ms). Priced at k,
    an EAGLE-3 head went on drafting at a loss at batch 1."""
    controller = SpeculationController(3, cost=_cost(flat_until=16),
                                       propose_cost=ProposerCostModel(extra_forwards))
    controller.propose_cost.seed(1, 0.3e-3)
    stats = SpecDecodingStats()
    for accepted in [0] * 40 + [1] * 24 + [2] * 14 + [3] * 22:  # 0.6, 0.6, 0.61 a position
        stats.observe(3, accepted)
    controller.observe_acceptance(stats)
    assert (controller.num_drafts(1) > 0) == drafts


def test_a_verification_is_priced_at_least_as_a_plain_step_of_as_many_tokens():
    """A verification size never measured at this batch is priced from its start-up timing
    and a calibration made at other sizes; it never comes out below a plain step of as many
    tokens (the same forward)."""
    cost = StepCostModel()
    for n in (1, 2, 4, 8, 16, 32, 64):
        cost.seed(n, 1e-3 * max(1.0, n / 8))
    controller = SpeculationController(3, cost=cost)
    controller.acceptance = [0.7] * 3
    for _ in range(16):
        controller.observe_step(4, 2e-3, verified=True, num_requests=2)  # 2x its seed
        controller.observe_step(32, 8e-3, num_requests=32)  # 2x its seed
    controller.verify_cost.observe(64, 10e-3)  # one lucky time
    plain, verify = controller.cost.seconds(64), controller.verify_cost.seconds(64)
    assert verify < plain
    assert controller.speedup(32, 1) == pytest.approx(1.7 * 8e-3 / plain, rel=0.01)
    assert controller.speedup(32, 1) < 1.0


def test_controller_prices_verification_steps_apart():
    """Verifying 1 + k tokens of one request costs more than decoding 1 + k requests (on the
    CPU at batch 1, 1.6x a plain step where start-up timed 4 requests' decode at 1.2x): the
    measured verification steps price drafting, and the sizes not verified yet scale with
    them, whatever the plain steps cost."""
    controller = SpeculationController(3, cost=_cost(flat_until=16),
                                       verify_cost=_cost(flat_until=16))
    _observe(controller, 3, 2, 200)
    assert controller.num_drafts(1) == 3
    for _ in range(200):
        controller.observe_step(1, 1e-3)
        controller.observe_step(4, 3.2e-3, verified=True)  # 3 drafts and its token
    assert controller.cost.seconds(4) == pytest.approx(1e-3)  # the plain curve: unchanged
    assert controller.verify_cost.seconds(2) == pytest.approx(3.2e-3, rel=0.01)
    assert controller.num_drafts(1) == 0


def test_controller_prices_the_proposer():
    controller = SpeculationController(4, cost=_cost(flat_until=16))
    _observe(controller, 4, 2, 200)
    cheap = controller.num_drafts(1)
    for _ in range(100):
        controller.observe_proposal(1, 1, 4, seconds=4 * 2e-3)  # 2 ms a draft: > a step
    assert cheap > 0 and controller.num_drafts(1) == 0


def test_step_cost_follows_measured_steps_and_calibrates_the_rest():
    cost = _cost(flat_until=16)
    assert cost.seconds(4) == pytest.approx(1e-3)
    assert cost.seconds(64) == pytest.approx(4e-3)
    for _ in range(200):  # real decode steps of 4 tokens take twice the start-up figure
        cost.observe(4, 2e-3)
    assert cost.seconds(4) == pytest.approx(2e-3, rel=1e-3)
    # Sizes never measured scale with it, so their ratio to measured ones stays right.
    assert cost.seconds(64) == pytest.approx(8e-3, rel=0.01)


def test_step_cost_prices_a_size_measured_now_and_then_from_what_it_cost():
    """A size measured only in a few steps (verifying drafts at a large batch) is priced
    from those times, whatever its start-up figure said; times slowed by other work on the
    host (a third of them, twice as long) do not move an estimate."""
    cost = _cost(flat_until=16)
    for i in range(200):
        cost.observe(32, 2e-3)  # as at start-up
        if i % 25 == 0:
            cost.observe(64, 6e-3)  # 1.5x its start-up figure, 8 times
    assert cost.seconds(64) == pytest.approx(6e-3)
    for i in range(48):
        cost.observe(32, 4e-3 if i % 3 == 0 else 2e-3)
    assert cost.seconds(32) == pytest.approx(2e-3)


def test_context_scaling_fits_how_a_step_grows_with_context():
    """t = 10 ms + 0.1 ms per token of context at 32 requests, a third of the steps slowed
    2x by other work: the factor between two contexts is the line's, within 3%; none while the
    contexts seen stay close together; a batch size not fitted takes the nearest fit."""
    scaling = ContextScaling()
    rng = random.Random(0)
    for i in range(200):
        context = 100 + (i * 7) % 101
        slowed = 2.0 if rng.random() < 1 / 3 else 1.0
        scaling.observe(32, context, (10e-3 + 0.1e-3 * context) * slowed)
    assert scaling.factor(32, 200) / scaling.factor(32, 100) == pytest.approx(1.5, rel=0.03)
    assert scaling.factor(16, 200) == scaling.factor(32, 200)
    assert scaling.factor(32, 150) == pytest.approx(1.0, abs=0.1)  # its reference: the middle
    close = ContextScaling()
    for i in range(200):
        close.observe(32, 150 + i % 5, (10e-3 + 0.1e-3 * (150 + i % 5)))
    assert close.factor(32, 300) == 1.0


def test_controller_prices_steps_measured_at_other_contexts_at_the_context_of_now():
    """Plain steps of 32 requests measured as their contexts grew from 100 to 200 tokens
    (t = 10 ms + 0.1 ms per token), verifications of one draft each at 100 tokens (1.6x a
    plain step there): at 200 tokens, with 0.6 of drafts accepted, one draft breaks even.
    Priced as one size each, whatever their context, they said 1.23x."""
    cost = StepCostModel()
    for n, seconds in ((16, 18e-3), (32, 25e-3), (64, 31e-3)):  # start-up timings
        cost.seed(n, seconds)
    controller = SpeculationController(3, cost=cost)
    for i in range(256):
        context = 100 + i % 101
        controller.num_drafts(32, context=context)
        controller.observe_step(32, 10e-3 + 0.1e-3 * context, num_requests=32)
    for _ in range(16):
        controller.num_drafts(32, context=100)
        controller.observe_step(64, 1.6 * 20e-3, verified=True, num_requests=32)
    for context in (200, 199, 198):  # the plain steps just before: 29.8-30 ms
        controller.num_drafts(32, context=context)
        controller.observe_step(32, 10e-3 + 0.1e-3 * context, num_requests=32)
    controller.num_drafts(32, context=200)
    assert controller.speedup(32, 1, [0.6, 0.0, 0.0]) == pytest.approx(1.0, rel=0.03)


def _draft_steps(controller: SpeculationController, rates: list[float], steps: int,
                 batch: int, rng: random.Random) -> list[list[float]]:
    """``steps`` verifications of ``batch`` requests with len(rates) drafts each, draft j
    accepted with probability rates[j] once drafts 0..j-1 were; the estimate after each."""
    estimates = []
    stats = SpecDecodingStats()  # cumulative, as the engine's
    controller.observe_acceptance(stats)
    for _ in range(steps):
        for _ in range(batch):
            accepted = 0
            while accepted < len(rates) and rng.random() < rates[accepted]:
                accepted += 1
            stats.observe(len(rates), accepted)
        controller.observe_acceptance(stats)
        estimates.append(list(controller.acceptance))
    return estimates


def test_acceptance_holds_steady_on_a_steady_workload_and_follows_a_change():
    """At batch 4 the estimate rests on enough drafts not to swing from step to step (a
    running average of the last ~10 drafts went from 0.4 to 0.85 and back within a workload),
    and still follows a workload whose drafts stop being accepted within ~60 steps."""
    controller = SpeculationController(3, cost=_cost(flat_until=16))
    rng = random.Random(0)
    steady = _draft_steps(controller, [0.7, 0.8, 0.85], 400, 4, rng)[50:]
    first = [e[0] for e in steady]
    assert max(abs(a - 0.7) for a in first) < 0.12
    assert statistics.pstdev(first) < 0.04
    later = _draft_steps(controller, [0.1, 0.8, 0.85], 64, 4, rng)
    assert later[-1][0] < 0.3


def test_acceptance_measured_long_ago_gives_way_to_the_probes():
    """After a long pause without drafts, a few probes' drafts outweigh what was measured
    before it (drafts that became good again are drafted for soon)."""
    controller = SpeculationController(3, cost=_cost(flat_until=16))
    rng = random.Random(1)
    _draft_steps(controller, [0.2, 0.2, 0.2], 800, 1, rng)
    assert controller.acceptance[0] < 0.3
    for _ in range(1024):
        controller.num_drafts(1)
    _draft_steps(controller, [1.0, 1.0, 1.0], 8, 1, rng)
    assert controller.acceptance[0] > 0.6


def test_a_position_seldom_reached_is_priced_like_the_one_before():
    controller = SpeculationController(3, cost=_cost(flat_until=16))
    _observe(controller, 1, 1, 200)  # one draft a step, always accepted
    assert controller.acceptance[0] > 0.95
    assert controller.acceptance[1] == pytest.approx(controller.acceptance[0])
    assert controller.expected_tokens(3) > 3.8


def test_controller_limits():
    fixed = SpeculationController(3, adaptive=False, cost=_cost(16))
    _observe(fixed, 3, 0, 100)
    assert fixed.num_drafts(1000) == 3
    capped = SpeculationController(3, adaptive=False, disable_by_batch_size=8)
    assert capped.num_drafts(8) == 3 and capped.num_drafts(9) == 0


def test_acceptance_per_position_is_conditional():
    stats = SpecDecodingStats()
    for drafts, accepted in [(4, 4), (4, 0), (4, 2), (2, 2)]:
        stats.observe(drafts, accepted)
    assert stats.num_accepted_tokens_per_pos == [3, 3, 1, 1]
    assert stats.num_reached_per_pos == [4, 3, 2, 1]
    assert stats.num_draft_tokens_per_pos == [4, 4, 3, 3]
    assert stats.mean_acceptance_length == pytest.approx(1 + 8 / 4)


# ---- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("values, named", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "'method'"),
    ({"method": "bogus", "num_speculative_tokens": 2}, "'method'"),
    ({"num_speculative_tokens": 2}, "'method'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "'num_speculative_tokens'"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "'num_speculative_tokens'"),
    ({"method": "ngram", "num_speculative_tokens": True}, "'num_speculative_tokens'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0},
     "'prompt_lookup_min'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 2}, "'prompt_lookup_max'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "'model'"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "'model'"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": "d",
      "prompt_lookup_max": 3}, "'prompt_lookup_max'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "colour": 1}, "'colour'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "adaptive": "yes"}, "'adaptive'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
     "'disable_by_batch_size'"),
    ("ngram", "'speculative_config'"),
])
def test_bad_speculative_config_names_the_key(values, named):
    with pytest.raises(ValueError, match=named):
        SpeculativeConfig.from_dict(values)


def test_speculative_config_defaults_follow_vllm():
    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (config.ngram.prompt_lookup_min, config.ngram.prompt_lookup_max) == (5, 5)
    draft = SpeculativeConfig.from_dict({"model": "/d", "num_speculative_tokens": 3})
    assert draft.method == "draft_model" and draft.uses_draft_model


# ---- each request's own acceptance ----------------------------------------------------------

def _serve_one_at_a_time(controller: SpeculationController, rates: list[float], steps: int,
                         named: bool, rng: random.Random) -> list[list[int]]:
    """Requests served one after another at batch 1 (request i: each draft accepted with
    probability rates[i]), the controller told which request runs if ``named``; the drafts
    chosen at each of each request's steps."""
    stats = SpecDecodingStats()
    choices = []
    for i, rate in enumerate(rates):
        rid = f"req{i}"
        ks = []
        for _ in range(steps):
            k = controller.num_drafts(1, request_ids=[rid] if named else None)
            ks.append(k)
            if k:
                accepted = 0
                while accepted < k and rng.random() < rate:
                    accepted += 1
                stats.observe(k, accepted)
                controller.observe_requests([rid], [k], [accepted])
                controller.observe_acceptance(stats)
        controller.forget_request(rid)
        choices.append(ks)
    return choices


def _drafting_model() -> SpeculationController:
    """Three drafts cost a third of a step: they pay from an acceptance of about 0.35."""
    propose = ProposerCostModel()
    for _ in range(16):
        propose.observe(1, 3, 0.3e-3)
    return SpeculationController(3, cost=_cost(flat_until=16), propose_cost=propose)


def test_a_request_whose_drafts_pay_is_drafted_for_after_one_whose_drafts_did_not():
    """At batch 1, a request whose drafts are accepted follows long requests whose drafts were
    not: priced at its own acceptance it is drafted for within a few steps, where the pooled
    estimate (the requests not named) keeps drafting off for most of it."""
    rates = [0.05, 0.05, 0.05, 0.95]
    named = _serve_one_at_a_time(_drafting_model(), rates, 100, True, random.Random(0))
    pooled = _serve_one_at_a_time(_drafting_model(), rates, 100, False, random.Random(0))
    for ks in (named, pooled):
        # Poor drafts: probes (with names, a burst as each request starts, then one every
        # _PROBE_INTERVAL steps or so), and single drafts, which cost a tenth of a step here,
        # while an acceptance one error above the one measured would pay for them: at most a
        # quarter of the drafts that k 3 fixed would make.
        assert sum(ks[2]) <= 3 * 100 // 4
    assert all(named[3][:60]) and sum(map(bool, named[3])) >= 97  # a plain probe now and then
    assert not any(pooled[3][:8]) and sum(map(bool, pooled[3])) < 85


def test_a_request_whose_drafts_do_not_pay_is_not_drafted_for_after_one_whose_drafts_did():
    """Its own rejections stop drafting for it (here, where three drafts cost a third of a
    step, once its first draft is priced at about 0.1, one standard error up: some 40 steps);
    the pooled estimate, resting on the last request's many accepted drafts, drafts on."""
    rates = [0.95, 0.0]
    named = _serve_one_at_a_time(_drafting_model(), rates, 100, True, random.Random(1))
    pooled = _serve_one_at_a_time(_drafting_model(), rates, 100, False, random.Random(1))
    assert all(named[0][:60]) and all(pooled[0][:60])
    assert sum(map(bool, named[1][40:])) <= 4 * _PROBE_BURST  # probes only (8, 16, 32... apart)
    assert sum(map(bool, pooled[1])) > 90


def test_request_acceptance_rests_on_the_pooled_one():
    controller = SpeculationController(3, cost=_cost(flat_until=16))
    requests = controller.requests
    pooled = [0.5, 0.5, 0.5]

    def price(*ids: str, step: int = 0) -> tuple[list[float], list[float]]:
        slots, _ = requests.admit(ids, step)
        batch = requests.price(slots, pooled, step)
        return np.array(batch.expected_tokens()), batch.hoped()

    fresh, fresh_hope = price("new")
    assert fresh == pytest.approx([1.0, 1.5, 1.75, 1.875])  # the pool's, until it drafts
    for _ in range(4):
        controller.observe_requests(["good"], [3], [3])
    good, _ = price("good")
    # 4 drafts of its own, all accepted, on the pool's 4 at 0.5: 3/4 a position.
    assert good[1] == pytest.approx(1 + (4 + 2) / 8)
    both, _ = price("good", "new")
    assert both == pytest.approx((good + fresh) / 2)  # the batch's mean
    # ... and its own drafts fade with the steps since (_ACCEPTANCE_STEPS: 256).
    assert price("good", step=256)[0][1] == pytest.approx(1 + (4 / math.e + 2) / (4 / math.e + 4),
                                                        rel=0.01)
    # One request may differ from the pool by much more than a batch of many.
    _, many_hope = price(*(f"new{i}" for i in range(32)))
    assert fresh_hope[0] > 0.95 and 0.5 < many_hope[0] < 0.6
    controller.forget_request("good")
    assert price("good")[0] == pytest.approx(fresh)
    for rid in ["good", "new", *(f"new{i}" for i in range(32))]:
        controller.forget_request(rid)
    assert len(requests) == 0


def test_finished_requests_leave_no_acceptance_behind():
    sched = make_scheduler(num_blocks=64, budget=32)
    sched.speculation = SpeculationController(4, cost=_cost(flat_until=16))
    _add(sched, 5)
    run_to_end(sched, FakeRunner(token_fn=_token, draft_fn=_drafts))
    assert sched.spec_stats.num_drafts > 0
    assert len(sched.speculation.requests) == 0
    sched.add_request(make_request("gone", 5, max_tokens=50))
    sched.update_from_output(FakeRunner(token_fn=_token, draft_fn=_drafts).run(
        sched, sched.schedule()))
    assert len(sched.speculation.requests) == 1
    sched.finish_requests(["gone"], RequestStatus.FINISHED_ABORTED)
    assert len(sched.speculation.requests) == 0


def test_a_request_is_not_judged_on_its_first_few_drafts():
    """While it drafts, the controller goes on at an acceptance one standard error above the
    one measured for the batch: two rejected first drafts of a new request (priced alone, three
    drafts no longer pay) do not stop drafting; ten more do."""
    propose = ProposerCostModel()
    for _ in range(16):
        propose.observe(1, 3, 1e-3)  # three drafts cost a plain step
    controller = SpeculationController(3, cost=_cost(flat_until=16), propose_cost=propose)
    controller.acceptance = [0.65] * 3  # the pool: 2.35 tokens a step with three drafts
    assert controller.num_drafts(1, request_ids=["a"]) == 3
    for _ in range(2):
        controller.observe_requests(["a"], [3], [0])
    assert controller.num_drafts(1, request_ids=["a"]) == 3
    assert controller.speedup(1, 3, tokens=controller._expected_tokens()[3]) < 1.0
    for _ in range(10):
        controller.observe_requests(["a"], [3], [0])
    assert controller.num_drafts(1, request_ids=["a"]) == 0
