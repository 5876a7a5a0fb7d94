"""Fault isolation in the engine: a request whose own work fails ends alone, with an error that
names it, while the others finish with the tokens they would have had; a failure no request
explains fails every stream at once and marks the engine dead.

The failing requests carry sampling parameters changed after validation (validation is the
first line of defence; these tests exercise the second), so the failures come from the real
components: torch's seeding, the tokenizer's decoding, the sampler."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from traffic import run_beside_a_failing_row

from pagedserve import EngineArgs, RequestOutputKind, SamplingParams
from pagedserve.engine.async_engine import AsyncLLMEngine
from pagedserve.engine.fault_injection import ENV_VAR
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.errors import EngineDeadError, RequestError, RequestParamsError
from pagedserve.worker.isolation import sample_isolating
from pagedserve.worker.sampler import Sampler, SamplingMetadata

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_k=20, seed=1234, max_tokens=24, ignore_eos=True)
GOOD = [("Hello world", GREEDY), ("Once upon a time", SEEDED), ("x", GREEDY.clone(n=2))]


def _args(model, **overrides) -> EngineArgs:
    return EngineArgs(model=str(model), block_size=8, max_model_len=256,
                      kv_cache_memory_bytes=16 << 20, **overrides)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama", "bpe")


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async-scheduling"])
def engine(request, model):
    engine = AsyncLLMEngine(_args(model, async_scheduling=request.param))
    yield engine
    engine.shutdown()


async def _tokens(engine, prompt, params, request_id):
    outputs = [o async for o in engine.generate(prompt, params, request_id)]
    assert outputs[-1].finished
    return [c.token_ids for c in outputs[-1].outputs]


async def _run_good(engine, tag):
    return await asyncio.gather(
        *[_tokens(engine, p, s, f"{tag}-{i}") for i, (p, s) in enumerate(GOOD)]
    )


def _assert_no_blocks_held(engine):
    stats = engine.engine.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_kv_blocks == stats.num_kv_blocks, stats


def _run_with_bad(engine, bad_prompt, bad_params, expected):
    """The good requests alone, then again alongside the bad one: same tokens, and the bad
    one raises ``expected`` naming its request."""

    async def alone():
        return await _run_good(engine, "alone")

    async def together():
        async def bad():
            with pytest.raises(expected) as failure:
                await _tokens(engine, bad_prompt, bad_params, "bad")
            return failure.value

        *good, error = await asyncio.gather(_run_good(engine, "with"), bad())
        return good[0], error

    reference = asyncio.run(alone())
    tokens, error = asyncio.run(together())
    assert tokens == reference
    _assert_no_blocks_held(engine)
    return error


def _after_validation(params: SamplingParams, **changes) -> SamplingParams:
    """A copy of ``params`` with values set after its validation ran."""
    params = params.clone()
    for name, value in changes.items():
        setattr(params, name, value)
    return params


def test_sampling_setup_failure_fails_only_that_request(engine, monkeypatch):
    # Validation leaves nothing a request can send to fail its row's setup, so the setup
    # fails on purpose for the second completion (n=2) of "bad": the whole request (both
    # completions) must end.
    batch = engine.engine.runner.batch
    set_sampling = batch._set_sampling

    def failing(row, req, device):
        if req.req_id == "bad#1":
            raise ValueError("a sampling setup that fails")
        return set_sampling(row, req, device)

    monkeypatch.setattr(batch, "_set_sampling", failing)
    error = _run_with_bad(engine, "a bad setup", SEEDED.clone(n=2), RequestParamsError)
    assert isinstance(error, ValueError)  # bad input: a server answers INVALID_ARG
    assert error.request_id == "bad" and error.stage == "sampling setup"
    assert "a sampling setup that fails" in str(error)


def test_output_processing_failure_fails_only_that_request(engine):
    # Decoding the final text with a non-bool skip_special_tokens raises in the tokenizer.
    bad = _after_validation(
        GREEDY.clone(output_kind=RequestOutputKind.FINAL_ONLY), skip_special_tokens="yes"
    )
    error = _run_with_bad(engine, "bad text", bad, RequestError)
    assert not isinstance(error, ValueError)  # not the input's fault: INTERNAL
    assert error.request_id == "bad" and error.stage == "output processing"
    assert isinstance(error.__cause__, TypeError)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async-scheduling"])
def test_sampling_failure_fails_only_that_request(model, async_scheduling):
    """One row's logprobs count (set after add_request validated it) makes the batched
    sampling call fail; that request ends, the seeded and greedy ones draw what they would
    have drawn without it."""
    engine = LLMEngine(_args(model, async_scheduling=async_scheduling))
    reference, no_errors = run_beside_a_failing_row(engine, GOOD, with_bad=False)
    tokens, errors = run_beside_a_failing_row(engine, GOOD, with_bad=True)
    assert not no_errors and tokens == reference
    assert [(e.request_id, e.stage) for e in errors] == [("bad", "sampling")]
    stats = engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


def test_engine_serves_on_after_request_failures(engine):
    outputs = asyncio.run(_tokens(engine, "Hello world", GREEDY, "after"))
    assert len(outputs[0]) == 24
    assert not engine.errored


def _row_metadata(rows: np.ndarray, num_logprobs: dict[int, int], generators) -> SamplingMetadata:
    n = len(rows)
    return SamplingMetadata(
        temperature=torch.full((n,), 0.8), all_greedy=False, all_random=True,
        top_k=None, top_p=None, min_p=None,
        generators={i: generators[r] for i, r in enumerate(rows.tolist())},
        output_counts=None, seen_mask=None, repetition_penalty=None, presence_penalty=None,
        frequency_penalty=None, banned_rows=None, banned_tokens=None,
        max_num_logprobs=max(num_logprobs[r] for r in rows.tolist()),
    )


def test_sampling_failure_is_traced_to_its_row():
    """A batched sampling call that fails because of one row's parameters (here a logprobs
    count beyond the vocabulary) samples the other rows as if nothing had happened."""
    vocab, rows = 50, np.array([3, 7, 1, 4])
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(0))
    num_logprobs = {3: 2, 7: vocab + 5, 1: 0, 4: 1}

    def generators():
        return {int(r): torch.Generator().manual_seed(int(r)) for r in rows}

    sampler = Sampler()
    reference = {}
    for i, r in enumerate(rows.tolist()):
        if r != 7:
            g = generators()
            reference[r] = sampler(logits[i:i + 1], _row_metadata(rows[i:i + 1], num_logprobs, g))
    gens = generators()
    with pytest.raises(RuntimeError) as failure:
        sampler(logits, _row_metadata(rows, num_logprobs, gens))

    def rewind(some):  # each row's state before the step: freshly seeded
        for r in some.tolist():
            gens[r].manual_seed(r)

    out, keep, bad = sample_isolating(
        sampler, logits, rows, lambda some: _row_metadata(some, num_logprobs, gens), rewind,
        failure.value,
    )
    assert list(bad) == [7] and rows[keep].tolist() == [3, 1, 4]
    for j, r in enumerate(rows[keep].tolist()):
        assert out.sampled[j] == reference[r].sampled[0]  # the seeded draws did not move


def test_unexplained_sampling_failure_is_re_raised():
    """Every row samples fine on its own: the batch's failure is nobody's, so it stands."""
    rows = np.array([0, 1])
    logits = torch.randn(2, 10)
    gens = {0: torch.Generator(), 1: torch.Generator()}
    broken = RuntimeError("the device is gone")
    with pytest.raises(RuntimeError, match="the device is gone"):
        sample_isolating(Sampler(), logits, rows,
                         lambda some: _row_metadata(some, {0: 0, 1: 0}, gens), lambda some: None,
                         broken)


def test_engine_failure_fails_every_stream_at_once(model, tmp_path, monkeypatch):
    trigger = tmp_path / "fail-now"
    monkeypatch.setenv(ENV_VAR, str(trigger))
    dead_calls = []
    engine = AsyncLLMEngine(_args(model), on_dead=dead_calls.append)
    try:
        params = SamplingParams(max_tokens=200, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)

        async def stream(i):
            got = 0
            try:
                async for out in engine.generate(f"stream {i}", params, f"s{i}"):
                    got += len(out.outputs[0].token_ids)
                    # Once only: outputs already queued may still arrive after the fault.
                    if got >= 5 and not engine_failed_at and i == 0:
                        trigger.touch()  # the next step fails
                        engine_failed_at.append(time.monotonic())
            except EngineDeadError as e:
                return time.monotonic(), e
            return None

        engine_failed_at: list[float] = []

        async def main():
            results = await asyncio.gather(*[stream(i) for i in range(4)])
            with pytest.raises(EngineDeadError):
                await _tokens(engine, "too late", GREEDY, "late")
            with pytest.raises(EngineDeadError):
                await engine.check_health()
            return results

        results = asyncio.run(main())
    finally:
        engine.shutdown()
    assert all(r is not None for r in results), "a stream ended without the engine's error"
    latency = max(t for t, _ in results) - engine_failed_at[0]
    print(f"\nengine failure -> every stream errored after {latency * 1000:.0f} ms")
    assert latency < 1.0
    assert "InjectedFault" in str(results[0][1])
    assert engine.errored and len(dead_calls) == 1
    assert not trigger.exists()  # the hook fired once
