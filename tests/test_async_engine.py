"""The streaming engine: deltas add up to the full output, aborts free blocks at once, bad
input fails only its own request."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagedserve import LLM, EngineArgs, RequestOutputKind, SamplingParams
from pagedserve.engine.async_engine import AsyncLLMEngine

PROMPTS = ["Hello world", "Ünïcödé ✓ 世界 and emoji 🙂", "  leading spaces", "x"]


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def model(request, tiny_model_dir):
    return tiny_model_dir("llama", request.param)


@pytest.fixture(scope="module")
def engine(model):
    engine = AsyncLLMEngine(EngineArgs(model=str(model), block_size=8, max_model_len=256,
                                       kv_cache_memory_bytes=16 << 20))
    yield engine
    engine.shutdown()


def run(coro):
    return asyncio.run(coro)


async def collect(engine, prompt, params, request_id):
    outputs = []
    async for out in engine.generate(prompt, params, request_id):
        outputs.append(out)
    return outputs


def test_streamed_deltas_equal_offline_text(engine, model):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)

    async def main():
        return await asyncio.gather(
            *[collect(engine, p, params, f"delta-{i}") for i, p in enumerate(PROMPTS)]
        )

    streams = run(main())
    offline = LLM(str(model), block_size=8, max_model_len=256,
                  kv_cache_memory_bytes=16 << 20).generate(
        PROMPTS, params.clone(output_kind=RequestOutputKind.CUMULATIVE), use_tqdm=False)
    for outputs, reference in zip(streams, offline):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        text = "".join(o.outputs[0].text for o in outputs)
        tokens = [t for o in outputs for t in o.outputs[0].token_ids]
        assert text == reference.outputs[0].text
        assert tokens == reference.outputs[0].token_ids
        assert len(outputs) >= 2  # it really streamed


def test_cumulative_outputs_grow(engine):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = run(collect(engine, "Hello", params, "cumulative"))
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    assert lengths == sorted(lengths) and lengths[-1] == 6
    assert outputs[-1].metrics.first_token_time is not None
    assert outputs[-1].metrics.num_generation_tokens == 6


def test_stop_string_is_never_streamed(engine):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = run(collect(engine, "Once", params, "probe"))[-1].outputs[0].text
    stop = full[4:7]
    delta = params.clone(stop=[stop], output_kind=RequestOutputKind.DELTA)
    outputs = run(collect(engine, "Once", delta, "stopped"))
    text = "".join(o.outputs[0].text for o in outputs)
    assert text == full[: full.index(stop)]
    assert outputs[-1].outputs[0].finish_reason == "stop"


def test_abort_by_closing_the_stream_frees_blocks(engine):
    params = SamplingParams(max_tokens=200, ignore_eos=True)

    async def main():
        stream = engine.generate("A long one", params, "closed")
        count = 0
        async for _ in stream:
            count += 1
            if count == 3:
                break
        await stream.aclose()
        await asyncio.sleep(0.2)
        return engine.get_stats()

    stats = run(main())
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.kv_cache_usage == 0.0


def test_abort_ends_the_stream_with_abort(engine):
    params = SamplingParams(max_tokens=200, ignore_eos=True)

    async def main():
        async def consume():
            return [o async for o in engine.generate("abort me", params, "aborted")]

        task = asyncio.create_task(consume())
        while engine.get_stats().num_running == 0:
            await asyncio.sleep(0.01)
        await engine.abort("aborted")
        outputs = await task
        return outputs, engine.get_stats()

    outputs, stats = run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert len(outputs[-1].outputs[0].token_ids) < 200
    assert stats.kv_cache_usage == 0.0


def test_bad_request_fails_alone(engine):
    good = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def bad():
        with pytest.raises(ValueError, match="prompt must not be empty"):
            await collect(engine, "", good, "bad")
        with pytest.raises(ValueError, match="too long"):
            await collect(engine, {"prompt_token_ids": [5] * 400}, good, "bad2")

    async def main():
        results = await asyncio.gather(collect(engine, "fine", good, "good"), bad())
        return results[0]

    outputs = run(main())
    assert len(outputs[-1].outputs[0].token_ids) == 8


def test_duplicate_live_request_id_rejected(engine):
    params = SamplingParams(max_tokens=50, ignore_eos=True)

    async def main():
        first = engine.generate("one", params, "dup")
        await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await collect(engine, "two", params, "dup")
        await first.aclose()

    run(main())


def test_slow_reader_gets_merged_deltas(engine):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)

    async def slow():
        outputs = []
        async for out in engine.generate("Hello world", params, "slow"):
            outputs.append(out)
            await asyncio.sleep(0.05)  # the engine runs ahead meanwhile
        return outputs

    outputs = run(slow())
    fast = run(collect(engine, "Hello world", params, "fast"))
    assert len(outputs) < 24  # some steps arrived while the reader slept, and were merged
    assert [t for o in outputs for t in o.outputs[0].token_ids] == [
        t for o in fast for t in o.outputs[0].token_ids
    ]
    assert "".join(o.outputs[0].text for o in outputs) == "".join(
        o.outputs[0].text for o in fast
    )
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"


def test_outputs_for_a_closed_event_loop_do_not_kill_the_engine(engine):
    """A request the engine still steps after its caller's event loop closed (asyncio.run
    returned while the engine ran ahead) has nowhere to send its outputs: they are dropped,
    and the engine serves the next loop."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = run(collect(engine, "Hello world", params, "before"))[-1].outputs[0].token_ids
    assert engine._loop is not None and engine._loop.is_closed()
    done = engine._submit(engine.engine.add_request, "orphan", "Hello world", params)
    done.result(timeout=30)
    deadline = time.monotonic() + 30
    while engine.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.engine.has_unfinished_requests()
    assert engine._dead is None
    got = run(collect(engine, "Hello world", params, "after"))[-1].outputs[0].token_ids
    assert list(got) == list(expected)
