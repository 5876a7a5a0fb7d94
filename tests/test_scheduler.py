"""The scheduler driven by fake runner outputs: budgets, chunking, preemption, admission."""

from __future__ import annotations

import random

import pytest

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedserve.sampling_params import SamplingParams

BS = 4
EOS = 0


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=32, chunked=True,
                   caching=True) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, caching)
    return Scheduler(kv, max_num_seqs, budget, chunked)


def make_request(rid: str, prompt_len: int, max_tokens: int = 4, first: int = 1,
                 **params) -> Request:
    prompt = [first + i % 50 for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params),
                   frozenset({EOS}), 256)


class FakeRunner:
    """Plays the model runner: keeps its own count of each request's known and computed
    tokens (as the real one does) and samples ``token``, or ``token_fn(req_id, position)``,
    for every request whose scheduled tokens reach the end of what it knows.

    With ``draft_fn(req_id, position, k)`` it also plays speculation: scheduled drafts are
    verified greedily against ``token_fn`` (accepted while equal, then the target's token),
    and each sampled request gets ``draft_fn``'s drafts for its next step."""

    def __init__(self, token: int = 7, token_fn=None, draft_fn=None) -> None:
        self.token_fn = token_fn or (lambda rid, pos: token)
        self.draft_fn = draft_fn
        self.known: dict[str, int] = {}  # req -> computed tokens, as the runner would track
        self.num_tokens: dict[str, int] = {}
        self.num_drafted = self.num_accepted = 0

    def run(self, sched: Scheduler, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_req_ids:
            self.known.pop(rid, None)
            self.num_tokens.pop(rid, None)
        for new in out.scheduled_new_reqs:
            self.known[new.req_id] = new.num_computed_tokens
            self.num_tokens[new.req_id] = len(new.token_ids)
        req_ids, tokens, drafts_out = [], [], []
        for rid, num in out.num_scheduled_tokens.items():
            request = sched.requests[rid]
            self.known[rid] += num
            # The scheduler counts scheduled tokens as computed at once.
            assert self.known[rid] == request.num_computed_tokens
            drafts = out.scheduled_spec_decode_tokens.get(rid, [])
            assert self.known[rid] <= self.num_tokens[rid] + len(drafts)
            if self.known[rid] >= self.num_tokens[rid]:
                position = self.num_tokens[rid]
                emitted = []
                for draft in drafts:
                    emitted.append(self.token_fn(rid, position))
                    position += 1
                    if emitted[-1] != draft:
                        break
                else:
                    emitted.append(self.token_fn(rid, position))
                self.num_drafted += len(drafts)
                self.num_accepted += len(emitted) - 1
                self.known[rid] -= len(drafts) - (len(emitted) - 1)
                self.num_tokens[rid] += len(emitted)
                req_ids.append(rid)
                tokens.append(emitted)
                if self.draft_fn is not None:
                    drafts_out.append(
                        self.draft_fn(rid, self.num_tokens[rid], out.num_lookahead_tokens)
                    )
        # As the model runner: no proposal (None) for a step that asked for no drafts.
        proposed = self.draft_fn is not None and out.num_lookahead_tokens
        return ModelRunnerOutput(req_ids, tokens, spec_token_ids=drafts_out if proposed else None)


def step(sched: Scheduler, runner: FakeRunner):
    out = sched.schedule()
    return out, sched.update_from_output(runner.run(sched, out))


def run_to_end(sched: Scheduler, runner: FakeRunner, max_steps: int = 1000) -> list:
    finished = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return finished
        out, core = step(sched, runner)
        assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        finished += [c.request for c in core if c.finished]
    raise AssertionError("scheduler did not finish")


def test_running_first_then_fcfs_within_budget():
    sched = make_scheduler(budget=10)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 6, first=10 * i + 1))
    out = sched.schedule()
    # r0 fully, r1 chunked to the remaining 4 tokens, r2 waits.
    assert out.num_scheduled_tokens == {"r0": 6, "r1": 4}
    runner = FakeRunner()
    sched.update_from_output(runner.run(sched, out))
    out = sched.schedule()
    assert list(out.num_scheduled_tokens) == ["r0", "r1", "r2"]
    assert out.num_scheduled_tokens == {"r0": 1, "r1": 2, "r2": 6}
    assert out.total_num_scheduled_tokens == 9


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(budget=10, chunked=False)
    sched.add_request(make_request("a", 6))
    sched.add_request(make_request("b", 6, first=20))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 6}


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2, budget=100)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", 3, first=10 * i))
    out = sched.schedule()
    assert list(out.num_scheduled_tokens) == ["r0", "r1"]
    assert len(sched.waiting) == 2


def test_long_prompt_is_chunked_and_samples_only_at_the_end():
    sched = make_scheduler(budget=8)
    sched.add_request(make_request("a", 20, max_tokens=2))
    runner = FakeRunner()
    chunks = []
    for _ in range(3):
        out, core = step(sched, runner)
        chunks.append(out.num_scheduled_tokens["a"])
        assert (core != []) == (sum(chunks) == 20)
    assert chunks == [8, 8, 4]


def test_stop_conditions():
    sched = make_scheduler()
    sched.add_request(make_request("len", 3, max_tokens=3))
    sched.add_request(make_request("eos", 3, max_tokens=10))
    sched.add_request(make_request("min", 3, max_tokens=10, min_tokens=2))
    sched.add_request(make_request("ign", 3, max_tokens=2, ignore_eos=True))
    sched.add_request(make_request("stop_id", 3, max_tokens=10, stop_token_ids=[EOS]))
    finished = {r.request_id: r for r in run_to_end(sched, FakeRunner(token=EOS))}
    assert finished["len"].status == RequestStatus.FINISHED_STOPPED  # EOS comes first
    assert finished["eos"].num_output_tokens == 1
    assert finished["min"].num_output_tokens == 2
    assert finished["ign"].status == RequestStatus.FINISHED_LENGTH
    assert finished["ign"].num_output_tokens == 2
    assert finished["stop_id"].status == RequestStatus.FINISHED_STOPPED


def test_max_tokens_and_model_len():
    sched = make_scheduler()
    req = Request("a", [1] * 8, SamplingParams(max_tokens=100), frozenset(), 10)
    sched.add_request(req)
    run_to_end(sched, FakeRunner())
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert req.num_tokens == 10


def test_preemption_frees_newest_and_resumes():
    # 6 blocks of 4 tokens; three requests of 7-token prompts need 2 blocks each, then grow.
    sched = make_scheduler(num_blocks=6, budget=64)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 7, max_tokens=6, first=10 * i + 1))
    runner = FakeRunner()
    preempted = 0
    finished = []
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        out, core = step(sched, runner)
        preempted += out.num_preempted
        if out.num_preempted:
            # The newest request goes back to the front of the queue with nothing computed.
            assert sched.waiting[0].request_id == "r2"
            assert sched.waiting[0].num_computed_tokens == 0
            assert "r2" in out.finished_req_ids
        finished += [c.request for c in core if c.finished]
    assert preempted > 0
    assert sorted(r.request_id for r in finished) == ["r0", "r1", "r2"]
    assert all(r.num_output_tokens == 6 for r in finished)
    assert sched.kv.pool.num_free_blocks == 6


def test_finish_requests_frees_waiting_and_running():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("a", 5))
    sched.add_request(make_request("b", 5))
    step(sched, FakeRunner())
    sched.finish_requests(["a", "b", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests()
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks
    assert sched.schedule().finished_req_ids == {"a", "b"}


def test_duplicate_request_id_rejected():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("a", 3))


def test_same_prompt_in_one_step_shares_blocks():
    # r1 reuses the block r0 computes in the same forward (keys are written before attention).
    sched = make_scheduler(budget=32)
    sched.add_request(make_request("r0", 6))
    sched.add_request(make_request("r1", 6))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"r0": 6, "r1": 2}
    assert sched.kv.block_ids("r0")[0] == sched.kv.block_ids("r1")[0]


def test_prefix_cache_counters():
    sched, runner = make_scheduler(), FakeRunner()
    sched.add_request(make_request("a", 9))
    step(sched, runner)
    sched.add_request(make_request("b", 9))
    step(sched, runner)
    kv = sched.stats().kv
    assert kv.prefix_cache_queries == 18
    assert kv.prefix_cache_hits == 8


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_no_leaks(seed: int):
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=24, max_num_seqs=4, budget=rng.choice([4, 9, 32]),
                           caching=rng.random() < 0.5)
    runner = FakeRunner()
    added = 0
    for _i in range(300):
        if rng.random() < 0.3 and added < 40:
            sched.add_request(make_request(f"r{added}", rng.randrange(1, 30),
                                           max_tokens=rng.randrange(1, 20),
                                           first=rng.randrange(3)))
            added += 1
        if rng.random() < 0.05 and sched.requests:
            victim = rng.choice(list(sched.requests))
            sched.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
        step(sched, runner)
    run_to_end(sched, runner)
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks
    assert not sched.kv.req_blocks


def _varied_token(rid: str, position: int) -> int:
    return 1 + (sum(map(ord, rid)) * 7 + position * 13) % 40  # never EOS


def _async_run(sched: Scheduler, runner: FakeRunner, max_steps: int = 2000) -> dict:
    """Drives the scheduler as the engine does with async scheduling: step k is scheduled
    and run before step k-1's tokens are handed back."""
    finished: dict[str, list[int]] = {}
    previous = None
    late_to_preempted = 0
    for _ in range(max_steps):
        if not sched.has_unfinished_requests() and previous is None:
            return {"finished": finished, "late_to_preempted": late_to_preempted}
        out = sched.schedule()
        assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        current = runner.run(sched, out) if not out.is_empty else None
        if previous is not None:
            late_to_preempted += sum(
                1 for rid in previous.req_ids
                if rid in sched.requests
                and sched.requests[rid].status == RequestStatus.PREEMPTED
            )
            for core in sched.update_from_output(previous):
                if core.finished:
                    finished[core.request.request_id] = list(core.request.output_token_ids)
        previous = current
    raise AssertionError("scheduler did not finish")


@pytest.mark.parametrize("num_blocks", [7, 64])
def test_async_scheduling_gives_the_same_tokens(num_blocks):
    """Scheduling a step before the previous one's tokens are back changes nothing a request
    sees: the same tokens, also when a request is preempted with a token in flight (its token
    still counts), and no block leaks."""
    def make(sched):
        for i in range(5):
            sched.add_request(make_request(f"r{i}", 5 + 2 * i, max_tokens=4 + i, first=10 * i))

    sync_sched, sync_runner = make_scheduler(num_blocks=num_blocks, budget=12), FakeRunner(
        token_fn=_varied_token)
    make(sync_sched)
    expected = {r.request_id: list(r.output_token_ids)
                for r in run_to_end(sync_sched, sync_runner)}
    sched = make_scheduler(num_blocks=num_blocks, budget=12)
    make(sched)
    result = _async_run(sched, FakeRunner(token_fn=_varied_token))
    assert result["finished"] == expected
    assert all(len(t) == 4 + int(rid[1:]) for rid, t in expected.items())
    assert sched.kv.pool.num_free_blocks == num_blocks
    if num_blocks == 7:
        assert sched.num_preemptions_total > 0
        assert result["late_to_preempted"] > 0


def test_async_scheduling_skips_a_request_its_in_flight_token_finishes():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3, max_tokens=1))
    runner = FakeRunner()
    first = sched.schedule()
    pending = runner.run(sched, first)
    # Its one token is in flight: scheduling it again would compute a token past max_tokens.
    assert sched.schedule().is_empty
    (core,) = sched.update_from_output(pending)
    assert core.finished and core.request.status == RequestStatus.FINISHED_LENGTH
