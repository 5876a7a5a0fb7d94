"""The tensor-parallel parity workload both executors with worker ranks run (mp in
test_executor.py, ray in test_ray_executor.py): greedy requests that, on a tight engine, go
through chunked prefill, preemption and prefix caching; and what the tests check with it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.errors import EngineDeadError
from pagedserve.executor.base import Executor

# Tight on purpose: 24 blocks of 8 tokens (a 128-token request needs 16) and a 16-token step
# budget, so prompts are prefilled in chunks and requests are preempted; prefix caching on.
ENGINE = dict(dtype="float32", max_model_len=128, block_size=8, num_kv_blocks=24,
              max_num_batched_tokens=16, max_num_seqs=6, enable_prefix_caching=True)
SHARED = "The same long shared prefix for several requests, so that blocks are reused: "
GREEDY = dict(temperature=0.0, ignore_eos=True)
KILL_NOTICE_S = 5.0  # a dead worker must fail the engine within this
# The tiny model the executors split: 4 heads, 2 KV heads (2 ranks of 2 and 1).
ARCHITECTURE = "llama"
# Two ranks, rank 1 in a Ray actor.
RAY = dict(tensor_parallel_size=2, distributed_executor_backend="ray")

E = TypeVar("E", bound=Executor)


def executor_of(llm: LLM, kind: type[E]) -> E:
    """``llm``'s executor, which must be a ``kind``."""
    executor = llm.engine.executor
    assert isinstance(executor, kind)
    return executor


def greedy_workload() -> tuple[list, list[SamplingParams]]:
    cases = [
        (SHARED + "one", SamplingParams(max_tokens=30, logprobs=2, **GREEDY)),
        (SHARED + "two", SamplingParams(max_tokens=24, repetition_penalty=1.3, **GREEDY)),
        (SHARED + "three", SamplingParams(max_tokens=40, **GREEDY)),
        ({"prompt_token_ids": list(range(5, 70))}, SamplingParams(max_tokens=40, **GREEDY)),
        ("Once upon a time", SamplingParams(max_tokens=50, **GREEDY)),
        ("Short", SamplingParams(max_tokens=1, **GREEDY)),
    ]
    return [p for p, _ in cases], [s for _, s in cases]


def greedy(llm: LLM) -> tuple[list, list[float]]:
    """Each request's tokens, finish reason and top logprob ids; and all the logprobs."""
    prompts, params = greedy_workload()
    results, logprobs = [], []
    for out in llm.generate(prompts, params, use_tqdm=False):
        c = out.outputs[0]
        entries = c.logprobs or []
        results.append((c.token_ids, c.finish_reason, [list(e) for e in entries]))
        logprobs += [lp.logprob for e in entries for lp in e.values()]
    return results, logprobs


def assert_same(got: tuple[list, list[float]], expected: tuple[list, list[float]]) -> None:
    assert got[0] == expected[0]
    # The ranks' partial sums add in another order than one matmul: ~1e-6 apart.
    assert got[1] == pytest.approx(expected[1], abs=1e-4)


def one_rank_reference(model: str) -> tuple[list, list[float]]:
    """greedy() on one rank (uni), checked to go through preemption and prefix caching."""
    llm = LLM(model, **ENGINE)
    assert type(llm.engine.executor) is Executor  # auto with one rank: uni
    results = greedy(llm)
    assert llm.engine.get_stats().num_preemptions_total > 0
    assert llm.engine.get_stats().prefix_cache_hits_total > 0
    return results


def gone(pid: int) -> bool:
    """Whether no process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def all_gone(pids: list[int], within_s: float = 5.0) -> bool:
    """Whether processes ``pids`` are all gone within ``within_s`` (a Ray actor's process
    ends asynchronously after ray.kill, or after its node's raylet is gone)."""
    deadline = time.monotonic() + within_s
    while not all(gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_a_kill_fails_the_run(llm: LLM, kill: Callable[[], None], error: str) -> None:
    """Kills a worker rank (``kill``) while ``llm`` generates: the run must fail with a
    RuntimeError matching ``error`` within KILL_NOTICE_S, leaving the engine dead; then shuts
    it down."""
    killed_at: list[float] = []

    def timed_kill() -> None:
        killed_at.append(time.monotonic())
        kill()

    # Enough work that the kill lands mid-run (a step runs in milliseconds here).
    prompts = [f"Request {i} of many, long enough to run for a while" for i in range(6)]
    timer = threading.Timer(0.5, timed_kill)
    timer.start()
    try:
        with pytest.raises(RuntimeError, match=error):
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


# The distributed_timeout_seconds a hang test's engine runs with.
HANG_TIMEOUT_S = 2.0


def assert_a_hang_fails_the_run(llm: LLM, pid: int) -> None:
    """Stops worker process ``pid`` (SIGSTOP: alive, but it answers nothing) after a first
    run: the next must fail naming distributed_timeout_seconds (HANG_TIMEOUT_S) within
    KILL_NOTICE_S past it; then shuts ``llm`` down, which kills the stopped worker."""
    params = SamplingParams(max_tokens=4, **GREEDY)
    assert len(llm.generate("Before", params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError,
                           match=rf"distributed_timeout_seconds \({HANG_TIMEOUT_S} s\)"):
            llm.generate("After", params, use_tqdm=False)
        assert time.monotonic() - start < HANG_TIMEOUT_S + KILL_NOTICE_S
    finally:
        llm.engine.shutdown()  # kills it: a stopped process cannot be told to stop
