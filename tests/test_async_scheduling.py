"""Async scheduling (step N+1 scheduled and launched before step N's tokens reach the host)
gives every request exactly what the synchronous engine gives it, with one rank or two."""

from __future__ import annotations

import pytest
from traffic import play, random_traffic

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineArgs
from pagedserve.engine.llm_engine import LLMEngine

KV = 64 << 20  # a fixed KV budget: several engines share one process (and GPU) here


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def probe(model):
    """Greedy text of one prompt, to pick stop strings and stop tokens that really occur."""
    llm = LLM(str(model), max_model_len=128, async_scheduling=False, kv_cache_memory_bytes=KV)
    out = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=24,
                                                          ignore_eos=True), use_tqdm=False)
    return out[0].outputs[0]


def _workload(probe) -> tuple[list, list[SamplingParams]]:
    shared = "The same long shared prefix for several requests, "
    greedy = dict(temperature=0.0, ignore_eos=True)
    cases = [
        ("Once upon a time", SamplingParams(max_tokens=24, **greedy)),
        ("Once upon a time", SamplingParams(max_tokens=24, stop=[probe.text[4:8]], **greedy)),
        ("Once upon a time", SamplingParams(max_tokens=24, stop_token_ids=[probe.token_ids[6]],
                                            min_tokens=2, **greedy)),
        (shared + "one", SamplingParams(max_tokens=17, logprobs=2, **greedy)),
        (shared + "two", SamplingParams(max_tokens=9, repetition_penalty=1.3,
                                        frequency_penalty=0.5, presence_penalty=0.3, **greedy)),
        (shared + "three", SamplingParams(max_tokens=30, temperature=0.8, top_k=20, top_p=0.9,
                                          seed=11, ignore_eos=True)),
        ("Parallel", SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=5,
                                    ignore_eos=True)),
        ({"prompt_token_ids": list(range(5, 70))}, SamplingParams(max_tokens=40, **greedy)),
        ("Short", SamplingParams(max_tokens=1, **greedy)),
        ("Until the end of the model", SamplingParams(max_tokens=None, **greedy)),
    ]
    return [p for p, _ in cases], [s for _, s in cases]


def _run(model, probe, **engine_kwargs) -> tuple[list, LLM]:
    llm = LLM(str(model), max_model_len=128, block_size=8, **engine_kwargs)
    prompts, params = _workload(probe)
    results = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        for c in out.outputs:
            logprobs = None if c.logprobs is None else [
                {tid: round(lp.logprob, 4) for tid, lp in entry.items()} for entry in c.logprobs
            ]
            results.append((c.token_ids, c.text, c.finish_reason, c.stop_reason, logprobs))
    return results, llm


def _assert_idle(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    assert stats.num_running == stats.num_waiting == 0
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("tight", [False, True], ids=["roomy", "preempting-chunked"])
def test_async_outputs_equal_sync(model, probe, tight):
    # Tight: 24 blocks of 8 tokens (one 128-token request needs 16) and a 16-token budget, so
    # prompts are chunked and requests are preempted, some with a token in flight.
    kwargs = dict(num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=6) if tight else {
        "kv_cache_memory_bytes": KV}
    expected, sync_llm = _run(model, probe, async_scheduling=False, **kwargs)
    got, async_llm = _run(model, probe, async_scheduling=True, **kwargs)
    assert async_llm.engine.config.async_scheduling
    assert [r[2] for r in expected].count("stop") >= 2  # the stop cases did stop
    assert got == expected
    _assert_idle(sync_llm)
    _assert_idle(async_llm)
    if tight:
        assert async_llm.engine.get_stats().num_preemptions_total > 0


def test_two_ranks_async_equal_sync(model, probe):
    """tensor_parallel_size 2 (a worker process; it takes each step's tokens from rank 0's
    device within the step): the workload's outputs and random traffic with aborts give what
    the same two ranks give synchronously."""
    plan = random_traffic(1234, 30, last_arrival=40, last_abort=60, num_aborts=6)
    tight = dict(num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=6)

    def run(async_scheduling: bool) -> tuple[list, dict[str, tuple]]:
        outputs, llm = _run(model, probe, tensor_parallel_size=2,
                            async_scheduling=async_scheduling, **tight)
        try:
            assert llm.engine.config.async_scheduling == async_scheduling
            _assert_idle(llm)
            finished, num_live_aborted = play(llm.engine, plan, min_steps=60)
            assert num_live_aborted >= 2
            return outputs, finished
        finally:
            llm.engine.shutdown()  # one set of ranks per process at a time

    expected, got = run(False), run(True)
    assert got[0] == expected[0]
    live = set(expected[1]) - plan.aborted
    assert len(live) >= 20
    assert {r: got[1][r] for r in live} == {r: expected[1][r] for r in live}


def test_abort_with_a_step_in_flight(model):
    def engine() -> LLMEngine:
        return LLMEngine(EngineArgs(str(model), max_model_len=128, async_scheduling=True,
                                    kv_cache_memory_bytes=KV))

    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    reference = engine()
    for rid in ("a", "c"):
        reference.add_request(rid, f"prompt {rid}", params)
    done = {}
    while reference.has_unfinished_requests():
        for out in reference.step():
            done[out.request_id] = out.outputs[0].token_ids

    eng = engine()
    for rid in ("a", "b", "c"):
        eng.add_request(rid, f"prompt {rid}", params)
    for _ in range(4):
        eng.step()
    (aborted,) = eng.abort_request(["b"])
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    finished = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id != "b"
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert finished == done
    stats = eng.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


@pytest.mark.parametrize("seed", [1234, 7, 99])
def test_async_random_traffic_with_aborts(model, seed):
    """Requests arriving and aborted while steps are in flight, under KV pressure: every request
    that is not aborted gets the tokens the synchronous engine gives it, and nothing leaks."""
    plan = random_traffic(seed, 40, last_arrival=60, last_abort=80, num_aborts=8)

    def run(async_scheduling: bool) -> dict[str, tuple]:
        eng = LLMEngine(EngineArgs(str(model), max_model_len=128, block_size=8,
                                   num_kv_blocks=30, max_num_batched_tokens=24,
                                   max_num_seqs=8, async_scheduling=async_scheduling))
        finished, num_live_aborted = play(eng, plan, min_steps=80)
        assert num_live_aborted >= 2  # some aborts hit requests still generating
        return finished

    expected, got = run(False), run(True)
    aborted = plan.aborted
    assert {r: v for r, v in got.items() if r not in aborted} == {
        r: v for r, v in expected.items() if r not in aborted}
    assert len(set(expected) - aborted) >= 30
