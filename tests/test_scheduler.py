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


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=32, chunked=True, caching=True,
                   max_model_len=256) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, caching)
    return Scheduler(kv, max_num_seqs, budget, max_model_len, chunked)


def make_request(rid: str, prompt_len: int, max_tokens: int = 4, first: int = 1,
                 **params) -> Request:
    prompt = [first + i % 50 for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params),
                   frozenset({EOS}), 256)


class FakeRunner:
    """Plays the model runner: samples a fixed token for every request that completes."""

    def __init__(self, token: int = 7) -> None:
        self.token = token
        self.known: dict[str, int] = {}  # req -> computed tokens, as the runner would track

    def run(self, sched: Scheduler, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_req_ids:
            self.known.pop(rid, None)
        for new in out.scheduled_new_reqs:
            self.known[new.req_id] = new.num_computed_tokens
        req_ids, tokens = [], []
        for rid, num in out.num_scheduled_tokens.items():
            request = sched.requests[rid]
            assert self.known[rid] == request.num_computed_tokens
            self.known[rid] += num
            if self.known[rid] >= request.num_tokens:
                req_ids.append(rid)
                tokens.append(self.token)
        return ModelRunnerOutput(req_ids, tokens)


def step(sched: Scheduler, runner: FakeRunner):
    out = sched.schedule()
    return out, sched.update_from_output(out, runner.run(sched, out))


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
    sched.update_from_output(out, runner.run(sched, out))
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
    sched = make_scheduler(max_model_len=10)
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
                           caching=rng.random() < 0.5, max_model_len=64)
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
