"""The executor seam (issue 12, phase 2): tensor_parallel_size 2 through the mp executor (rank 0
here, rank 1 a spawned worker, gloo on the CPU) gives the tokens one rank gives, through
chunked prefill, preemption and prefix caching (llama; qwen2 with a vocabulary split unevenly
and mistral with one replicated KV head, greedy); random sampling keeps the ranks in step; a
killed worker fails the engine (and the async engine's streams) at once, a hung one after the
timeout, and no worker outlives its engine. With async scheduling too (the worker then takes
rank 0's tokens within each step), where a row that fails to sample on rank 0 alone ends
only its own request."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
import weakref

import pytest
from tp_workload import (
    ARCHITECTURE,
    ENGINE,
    GREEDY,
    HANG_TIMEOUT_S,
    KILL_NOTICE_S,
    SHARED,
    assert_a_hang_fails_the_run,
    assert_a_kill_fails_the_run,
    assert_same,
    executor_of,
    gone,
    greedy,
    one_rank_reference,
)
from traffic import run_beside_a_failing_row

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineArgs
from pagedserve.engine.async_engine import AsyncLLMEngine
from pagedserve.errors import EngineDeadError
from pagedserve.executor.mp_executor import MultiprocExecutor


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir(ARCHITECTURE))


def _worker_processes(llm: LLM) -> list:
    return list(executor_of(llm, MultiprocExecutor)._workers.processes)


@pytest.fixture(scope="module")
def reference(model):
    return one_rank_reference(model)


def test_two_ranks_give_one_ranks_tokens(model, reference):
    llm = LLM(model, tensor_parallel_size=2, **ENGINE)
    assert llm.engine.config.executor_backend == "mp"
    assert not llm.engine.config.async_scheduling
    [worker] = _worker_processes(llm)
    assert worker.is_alive()
    assert_same(greedy(llm), reference)
    stats = llm.engine.get_stats()
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits_total > 0

    _assert_the_worker_follows_random_sampling(llm, model)

    # Dropping the LLM stops its worker.
    engine = weakref.ref(llm.engine)
    del llm
    gc.collect()
    assert engine() is None
    assert not worker.is_alive() and worker.exitcode == 0  # told to stop, not killed
    assert gone(worker.pid)


def _assert_the_worker_follows_random_sampling(llm: LLM, model: str) -> None:
    """Random sampling, seeded and not: only rank 0's tokens count, the worker's batch must
    hold them too. A greedy continuation of each sampled text reuses the cached blocks that
    both ranks computed from those tokens: it matches one rank's only if the worker stayed in
    step."""
    sampled = llm.generate(
        [SHARED + "random", SHARED + "seeded"],
        [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True),
         SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)],
        use_tqdm=False)
    vocab = llm.engine.model_config.vocab_size
    follow_ups = []
    for out in sampled:
        tokens = out.outputs[0].token_ids
        assert len(tokens) == 20 and all(0 <= t < vocab for t in tokens)
        follow_ups.append({"prompt_token_ids": out.prompt_token_ids + tokens})
    follow = SamplingParams(max_tokens=8, **GREEDY)
    hits = llm.engine.get_stats().prefix_cache_hits_total
    got = [o.outputs[0].token_ids for o in llm.generate(follow_ups, follow, use_tqdm=False)]
    assert llm.engine.get_stats().prefix_cache_hits_total > hits
    one_rank = LLM(model, **ENGINE)
    expected = [o.outputs[0].token_ids
                for o in one_rank.generate(follow_ups, follow, use_tqdm=False)]
    assert got == expected


def test_two_ranks_with_async_scheduling_give_one_ranks_tokens(model, reference):
    # Step N + 1 goes to the worker before step N's tokens reach rank 0's host: the worker
    # takes them from rank 0's device within step N (SampledTokenShare). Without them its
    # next inputs would be placeholders, its half of every later all-reduce wrong.
    llm = LLM(model, tensor_parallel_size=2, async_scheduling=True, **ENGINE)
    assert llm.engine.config.async_scheduling
    assert_same(greedy(llm), reference)
    stats = llm.engine.get_stats()
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits_total > 0
    _assert_the_worker_follows_random_sampling(llm, model)

    # A row whose sampling fails on rank 0 alone (the worker samples nothing): rank 0 sends
    # placeholders for it, that request ends, the others' tokens are as without it.
    engine = llm.engine
    params = SamplingParams(max_tokens=12, **GREEDY)
    requests = [(SHARED + "one", params), ("Once upon a time", params)]
    expected, _ = run_beside_a_failing_row(engine, requests, with_bad=False)
    got, errors = run_beside_a_failing_row(engine, requests, with_bad=True)
    assert got == expected
    assert [(e.request_id, e.stage) for e in errors] == [("bad", "sampling")]
    stats = engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    engine.shutdown()


def test_mp_with_one_rank_is_uniproc(model, reference):
    llm = LLM(model, distributed_executor_backend="mp", **ENGINE)
    assert isinstance(llm.engine.executor, MultiprocExecutor)
    assert _worker_processes(llm) == []
    assert_same(greedy(llm), reference)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async-scheduling"])
def test_a_killed_worker_fails_the_requests_at_once(model, async_scheduling):
    llm = LLM(model, tensor_parallel_size=2, async_scheduling=async_scheduling, **ENGINE)
    [worker] = _worker_processes(llm)
    assert_a_kill_fails_the_run(
        llm, lambda: os.kill(worker.pid, signal.SIGKILL),
        rf"tensor-parallel worker rank 1 \(pid {worker.pid}\) died \(killed by signal 9\)")
    assert not worker.is_alive() and gone(worker.pid)


def test_shutdown_stops_the_workers(model):
    llm = LLM(model, tensor_parallel_size=2, **ENGINE)
    [worker] = _worker_processes(llm)
    llm.engine.shutdown()
    assert not worker.is_alive() and worker.exitcode == 0 and gone(worker.pid)
    llm.engine.shutdown()  # idempotent
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.engine.step()


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor_parallel_size=3), "tensor_parallel_size 3 does not divide num_attention_heads"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="threads"),
     "'distributed_executor_backend' must be one of auto, uni, mp, ray"),
])
def test_config_errors_name_the_field(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(model, **ENGINE, **kwargs)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async-scheduling"])
def test_a_hung_worker_fails_the_step_after_the_timeout(model, async_scheduling):
    llm = LLM(model, tensor_parallel_size=2, distributed_timeout_seconds=HANG_TIMEOUT_S,
              async_scheduling=async_scheduling, **ENGINE)
    [worker] = _worker_processes(llm)
    assert_a_hang_fails_the_run(llm, worker.pid)
    assert not worker.is_alive() and gone(worker.pid)


def test_the_async_engine_fails_its_streams_when_a_worker_dies(model):
    # The Triton model's path: streams on AsyncLLMEngine, on_dead turning the model not ready.
    dead: list[EngineDeadError] = []
    engine = AsyncLLMEngine(EngineArgs(model, tensor_parallel_size=2, **ENGINE),
                            on_dead=dead.append)
    [worker] = engine.engine.executor._workers.processes
    params = SamplingParams(max_tokens=None, **GREEDY)

    async def stream(i: int) -> int:
        count = 0
        async for out in engine.generate(f"Stream {i} runs until the end", params, str(i)):
            count = len(out.outputs[0].token_ids)
            if i == 0 and count == 3:
                os.kill(worker.pid, signal.SIGKILL)
        return count

    async def main() -> list:
        return await asyncio.gather(*(stream(i) for i in range(3)), return_exceptions=True)

    try:
        results = asyncio.run(asyncio.wait_for(main(), KILL_NOTICE_S + 10))
        assert len(results) == 3 and all(isinstance(r, EngineDeadError) for r in results)
        assert "tensor-parallel worker rank 1" in str(results[0])
        deadline = time.monotonic() + 2.0  # on_dead runs on the engine thread, after them
        while not dead and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(dead) == 1
    finally:
        engine.shutdown()
    assert not worker.is_alive() and gone(worker.pid)


@pytest.mark.parametrize("arch, kwargs", [
    ("qwen2", dict(vocab_size=1031)),  # a vocabulary the ranks split unevenly (padded)
    ("mistral", dict(num_key_value_heads=1)),  # one KV head, replicated on both ranks
])
def test_other_splits_give_one_ranks_tokens(tiny_model_dir, arch, kwargs):
    path = str(tiny_model_dir(arch, **kwargs))
    prompts = [SHARED + "one", "Once upon a time"]
    params = SamplingParams(max_tokens=12, **GREEDY)

    def tokens(**engine_kwargs) -> list:
        llm = LLM(path, **ENGINE, **engine_kwargs)
        outs = llm.generate(prompts, params, use_tqdm=False)
        llm.engine.shutdown()
        return [o.outputs[0].token_ids for o in outs]

    assert tokens(tensor_parallel_size=2) == tokens()
