"""The executor seam (issue 12, phase 2): tensor_parallel_size 2 through the mp executor (rank 0
here, rank 1 a spawned worker, gloo on the CPU) gives the tokens one rank gives, through
chunked prefill, preemption and prefix caching (llama; qwen2 with a vocabulary split unevenly
and mistral with one replicated KV head, greedy); random sampling keeps the ranks in step; a
killed worker fails the engine (and the async engine's streams) at once, a hung one after the
timeout, and no worker outlives its engine."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
import time
import weakref

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineArgs
from pagedserve.engine.async_engine import AsyncLLMEngine
from pagedserve.errors import EngineDeadError
from pagedserve.executor.base import Executor
from pagedserve.executor.mp_executor import MultiprocExecutor

# Tight on purpose: 24 blocks of 8 tokens (a 128-token request needs 16) and a 16-token step
# budget, so prompts are prefilled in chunks and requests are preempted; prefix caching on.
ENGINE = dict(dtype="float32", max_model_len=128, block_size=8, num_kv_blocks=24,
              max_num_batched_tokens=16, max_num_seqs=6, enable_prefix_caching=True)
SHARED = "The same long shared prefix for several requests, so that blocks are reused: "
GREEDY = dict(temperature=0.0, ignore_eos=True)
KILL_NOTICE_S = 5.0  # a dead worker must fail the engine within this


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir("llama"))  # 4 heads, 2 KV heads: 2 ranks of 2 and 1


def _greedy_workload() -> tuple[list, list[SamplingParams]]:
    cases = [
        (SHARED + "one", SamplingParams(max_tokens=30, logprobs=2, **GREEDY)),
        (SHARED + "two", SamplingParams(max_tokens=24, repetition_penalty=1.3, **GREEDY)),
        (SHARED + "three", SamplingParams(max_tokens=40, **GREEDY)),
        ({"prompt_token_ids": list(range(5, 70))}, SamplingParams(max_tokens=40, **GREEDY)),
        ("Once upon a time", SamplingParams(max_tokens=50, **GREEDY)),
        ("Short", SamplingParams(max_tokens=1, **GREEDY)),
    ]
    return [p for p, _ in cases], [s for _, s in cases]


def _greedy(llm: LLM) -> tuple[list, list[float]]:
    """Each request's tokens, finish reason and top logprob ids; and all the logprobs."""
    prompts, params = _greedy_workload()
    results, logprobs = [], []
    for out in llm.generate(prompts, params, use_tqdm=False):
        c = out.outputs[0]
        entries = c.logprobs or []
        results.append((c.token_ids, c.finish_reason, [list(e) for e in entries]))
        logprobs += [lp.logprob for e in entries for lp in e.values()]
    return results, logprobs


def _assert_same(got: tuple[list, list[float]], expected: tuple[list, list[float]]) -> None:
    assert got[0] == expected[0]
    # The ranks' partial sums add in another order than one matmul: ~1e-6 apart.
    assert got[1] == pytest.approx(expected[1], abs=1e-4)


def _worker_processes(llm: LLM) -> list:
    executor = llm.engine.executor
    assert isinstance(executor, MultiprocExecutor)
    return list(executor._workers.processes)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def reference(model):
    llm = LLM(model, **ENGINE)
    assert type(llm.engine.executor) is Executor  # auto with one rank: uni
    results = _greedy(llm)
    assert llm.engine.get_stats().num_preemptions_total > 0
    assert llm.engine.get_stats().prefix_cache_hits_total > 0
    return results


def test_two_ranks_give_one_ranks_tokens(model, reference):
    llm = LLM(model, tensor_parallel_size=2, **ENGINE)
    assert llm.engine.config.args.executor_backend == "mp"
    assert not llm.engine.config.async_scheduling
    [worker] = _worker_processes(llm)
    assert worker.is_alive()
    _assert_same(_greedy(llm), reference)
    stats = llm.engine.get_stats()
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits_total > 0

    # Random sampling, seeded and not: only rank 0's tokens count, the worker's batch must
    # hold them too. A greedy continuation of each sampled text reuses the cached blocks
    # that both ranks computed from those tokens: it matches one rank's only if the worker
    # stayed in step.
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

    # Dropping the LLM stops its worker.
    engine = weakref.ref(llm.engine)
    del llm
    gc.collect()
    assert engine() is None
    assert not worker.is_alive() and worker.exitcode == 0  # told to stop, not killed
    assert _gone(worker.pid)


def test_mp_with_one_rank_is_uniproc(model, reference):
    llm = LLM(model, distributed_executor_backend="mp", **ENGINE)
    assert isinstance(llm.engine.executor, MultiprocExecutor)
    assert _worker_processes(llm) == []
    _assert_same(_greedy(llm), reference)


def test_a_killed_worker_fails_the_requests_at_once(model):
    llm = LLM(model, tensor_parallel_size=2, **ENGINE)
    [worker] = _worker_processes(llm)
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(worker.pid, signal.SIGKILL)

    # Enough work that the kill lands mid-run (a step runs in milliseconds here).
    prompts = [f"Request {i} of many, long enough to run for a while" for i in range(6)]
    timer = threading.Timer(0.5, kill)
    timer.start()
    try:
        with pytest.raises(RuntimeError, match=(
                rf"tensor-parallel worker rank 1 \(pid {worker.pid}\) died "
                r"\(killed by signal 9\)")):
            for _ in range(100):  # each generate runs to the end of max_model_len
                llm.generate(prompts, SamplingParams(max_tokens=None, **GREEDY),
                             use_tqdm=False)
        failed_at = time.monotonic()
    finally:
        timer.cancel()
    assert killed_at and failed_at - killed_at[0] < KILL_NOTICE_S
    with pytest.raises(EngineDeadError):
        llm.engine.step()
    llm.engine.shutdown()
    assert not worker.is_alive() and _gone(worker.pid)


def test_shutdown_stops_the_workers(model):
    llm = LLM(model, tensor_parallel_size=2, **ENGINE)
    [worker] = _worker_processes(llm)
    llm.engine.shutdown()
    assert not worker.is_alive() and worker.exitcode == 0 and _gone(worker.pid)
    llm.engine.shutdown()  # idempotent
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.engine.step()


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor_parallel_size=3), "tensor_parallel_size 3 does not divide num_attention_heads"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="threads"),
     "'distributed_executor_backend' must be one of auto, uni, mp, ray"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="ray"), "not available yet"),
])
def test_config_errors_name_the_field(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(model, **ENGINE, **kwargs)


def test_a_hung_worker_fails_the_step_after_the_timeout(model):
    llm = LLM(model, tensor_parallel_size=2, distributed_timeout_seconds=2.0, **ENGINE)
    [worker] = _worker_processes(llm)
    params = SamplingParams(max_tokens=4, **GREEDY)
    assert len(llm.generate("Before", params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    os.kill(worker.pid, signal.SIGSTOP)  # alive, but answers nothing
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"distributed_timeout_seconds \(2.0 s\)"):
            llm.generate("After", params, use_tqdm=False)
        assert time.monotonic() - start < 2.0 + KILL_NOTICE_S
    finally:
        llm.engine.shutdown()  # kills it: a stopped process cannot be told to stop
    assert not worker.is_alive() and _gone(worker.pid)


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
    assert not worker.is_alive() and _gone(worker.pid)


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
