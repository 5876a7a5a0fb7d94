"""What the engine counts for serving metrics (EngineStats): tokens as they are made, the
inter-token latencies and tokens per step as histograms, and each request's phase times."""

from __future__ import annotations

import pytest

from pagedserve import EngineArgs, SamplingParams
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.stats import Histogram


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineArgs(model=str(tiny_model_dir("llama", "bpe")), block_size=8,
                                max_model_len=256, kv_cache_memory_bytes=16 << 20,
                                enable_prefix_caching=False))


def test_histogram_buckets_are_le_bounds():
    h = Histogram([1, 8, 16])
    h.observe(1)
    h.observe_many([0.5, 8, 9, 100])
    snap = h.snapshot()
    assert snap.counts == (2, 1, 1, 1)  # le 1: 0.5 and 1; le 8: 8; le 16: 9; +Inf: 100
    assert snap.count == 5 and snap.sum == 118.5


def test_counters_move_every_step_and_add_up(engine):
    before = engine.get_stats()
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7, 8, 9]},
                       SamplingParams(max_tokens=6, ignore_eos=True))
    engine.add_request("b", {"prompt_token_ids": [10, 11, 12]},
                       SamplingParams(max_tokens=4, ignore_eos=True, n=2, temperature=1.0))
    finals = {}
    moved = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        stats = engine.get_stats()
        moved.append(stats.generation_tokens_total - before.generation_tokens_total)
    after = engine.get_stats()
    generated = 6 + 2 * 4
    assert moved[0] == 3 and moved[-1] == generated  # a token per completion per step
    assert after.prompt_tokens_total - before.prompt_tokens_total == 5 + 3  # once per request
    itl = after.inter_token_latency.count - before.inter_token_latency.count
    assert itl == (6 - 1) + 2 * (4 - 1)
    assert after.inter_token_latency.sum > before.inter_token_latency.sum
    steps = after.iteration_tokens.count - before.iteration_tokens.count
    computed = after.iteration_tokens.sum - before.iteration_tokens.sum
    # Every completion computes its prompt and all its tokens but the last.
    assert computed == (5 + 6 - 1) + 2 * (3 + 4 - 1)
    assert steps == len(moved)

    for rid in ("a", "b"):
        m = finals[rid].metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time
        assert m.first_token_time <= m.last_token_time <= m.finished_time
    assert finals["b"].metrics.num_generation_tokens == 8


def test_an_aborted_waiting_request_was_never_scheduled(engine):
    engine.add_request("never", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=3))
    (out,) = engine.abort_request(["never"])
    assert out.finished and out.metrics.first_scheduled_time is None
    assert out.metrics.first_token_time is None
