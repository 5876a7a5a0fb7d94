"""Validation at the edge: every sampling parameter out of range is a ValueError naming the
field (and the bound) before the request reaches the engine's step, and the engine serves the
next request as before; values at the edge of a range are served. A fuzz of random JSON values
checks that nothing else ever escapes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time

import numpy as np
import pytest

from pagedserve import EngineArgs, SamplingParams
from pagedserve.engine.async_engine import AsyncLLMEngine
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.sampling_params import RequestOutputKind
from pagedserve.serving.contract import parse_request

MAX_NUM_SEQS = 16
ENGINE = dict(max_model_len=64, max_num_seqs=MAX_NUM_SEQS, block_size=8,
              kv_cache_memory_bytes=16 << 20)
GOOD = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
VOCAB = 1024  # the tiny llama's (checked below)

# (sampling parameters as a client sends them, the field the error must name, and a bound or
# other text it must hold). The first eight are the issue's.
BAD = [
    ({"seed": 18446744073709551616}, "seed", "18446744073709551615"),
    ({"temperature": math.inf}, "temperature", "finite"),  # JSON 1e400
    ({"temperature": "nan"}, "temperature", "finite"),
    ({"temperature": -1}, "temperature", "[0, "),
    ({"temperature": "inf"}, "temperature", "finite"),
    ({"n": 10000}, "n", f"max_num_seqs ({MAX_NUM_SEQS})"),
    ({"n": MAX_NUM_SEQS + 1}, "n", str(MAX_NUM_SEQS)),
    ({"seed": 18446744073709551615, "n": 2}, "seed", "18446744073709551614"),
    ({"seed": -2}, "seed", "[0, "),
    ({"seed": "1.5"}, "seed", "integer"),
    ({"seed": True}, "seed", "integer"),
    ({"top_k": -2}, "top_k", "-1 or 0"),
    ({"top_k": 2**63}, "top_k", "-1 or 0"),
    ({"top_k": 2.5}, "top_k", "integer"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"top_p": "1.01"}, "top_p", "(0, 1]"),
    ({"top_p": "nan"}, "top_p", "(0, 1]"),
    ({"min_p": -0.1}, "min_p", "[0, 1]"),
    ({"min_p": 1.5}, "min_p", "[0, 1]"),
    ({"repetition_penalty": 0}, "repetition_penalty", "(0, "),
    ({"repetition_penalty": "inf"}, "repetition_penalty", "finite"),
    ({"repetition_penalty": 1e39}, "repetition_penalty", "3.40282e+38"),
    ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": "-3"}, "frequency_penalty", "[-2, 2]"),
    ({"frequency_penalty": [1]}, "frequency_penalty", "number"),
    ({"max_tokens": 0}, "max_tokens", "[1, "),
    ({"max_tokens": 2**63}, "max_tokens", "9223372036854775807"),
    ({"max_tokens": "1e400"}, "max_tokens", "integer"),
    ({"max_tokens": 1.5}, "max_tokens", "integer"),
    ({"min_tokens": -1}, "min_tokens", "[0, "),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "max_tokens"),
    ({"n": 0}, "n", "[1, "),
    ({"n": True}, "n", "integer"),
    ({"n": "2.5"}, "n", "integer"),
    ({"logprobs": 21}, "logprobs", "max_logprobs=20"),
    ({"logprobs": -1}, "logprobs", "max_logprobs=-1"),
    ({"logprobs": -2}, "logprobs", "-1"),
    ({"ignore_eos": "maybe"}, "ignore_eos", "true or false"),
    ({"ignore_eos": 1}, "ignore_eos", "true or false"),
    ({"skip_special_tokens": "yes"}, "skip_special_tokens", "true or false"),
    ({"include_stop_str_in_output": [True]}, "include_stop_str_in_output", "true or false"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"stop": 5}, "stop", "string"),
    ({"stop": ["a", 1]}, "stop", "string"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"),
    ({"stop_token_ids": "[1.5]"}, "stop_token_ids", "token ids"),
    ({"stop_token_ids": [VOCAB]}, "stop_token_ids", f"[0, {VOCAB})"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": "nan"}}, "logit_bias[5]", "number"),
    ({"logit_bias": {str(VOCAB): 1}}, "logit_bias", f"[0, {VOCAB})"),
    ({"logit_bias": "[1]"}, "logit_bias", "object"),
    ({"allowed_token_ids": []}, "allowed_token_ids", "non-empty"),
    ({"allowed_token_ids": [3, VOCAB + 7]}, "allowed_token_ids", f"[0, {VOCAB})"),
    ({"bad_words": [""]}, "bad_words", "non-empty"),
    ({"bad_words": ["  "]}, "bad_words", "blank"),
    ({"bad_words": [f"w{i}" for i in range(100)]}, "bad_words", "at most 128"),
    ({"output_kind": 1}, "output_kind", "RequestOutputKind"),
    ({"no_such_field": 1}, "no_such_field", "known:"),
]

# Values at the edges of their ranges: accepted, and served to the end.
EDGES = [
    {"seed": 9223372036854775807, "n": 2},
    {"seed": 18446744073709551615},
    {"seed": 18446744073709551614, "n": 2},
    {"seed": -1},
    {"top_k": 9223372036854775807},
    {"top_k": -1, "temperature": 1.5},
    {"temperature": 1e-30},
    {"temperature": 3e38},
    {"max_tokens": 9223372036854775807},
    {"max_tokens": 2**62, "min_tokens": 2**61},
    {"logprobs": 20},
    {"logit_bias": {"5": 1e300, 6: -math.inf}},
    {"repetition_penalty": 1e-30, "frequency_penalty": 2, "presence_penalty": -2},
    {"n": MAX_NUM_SEQS},
    {"temperature": None, "n": None, "top_p": None},
    {"stop": "[INST]", "bad_words": "[x"},
    {"stop": '["[INST]", "</s>"]', "stop_token_ids": "5", "allowed_token_ids": "[5, 6, 7]"},
]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def engine(model):
    eng = LLMEngine(EngineArgs(model, **ENGINE))
    assert eng.model_config.vocab_size == VOCAB
    return eng


def _run(engine: LLMEngine, request_id: str, prompt: str, params: SamplingParams) -> list:
    engine.add_request(request_id, prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    return outputs[request_id].outputs


def _assert_idle(stats) -> None:
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    assert stats.num_running == stats.num_waiting == 0


@pytest.fixture(scope="module")
def good_text(engine):
    return _run(engine, "reference", "Hello world", SamplingParams(**GOOD))[0].text


@pytest.mark.parametrize("values, field, bound", BAD, ids=[json.dumps(v)[:60] for v, *_ in BAD])
def test_bad_values_are_named_and_change_nothing(engine, good_text, values, field, bound):
    with pytest.raises(ValueError) as info:
        params = SamplingParams.from_dict(values, coerce_strings=True)
        engine.add_request(f"bad-{time.monotonic_ns()}", "Hello world", params)
    message = str(info.value)
    assert field in message and bound in message, message
    assert not engine.has_unfinished_requests()
    _assert_idle(engine.get_stats())
    assert _run(engine, "good", "Hello world", SamplingParams(**GOOD))[0].text == good_text
    _assert_idle(engine.get_stats())


@pytest.mark.parametrize("values", EDGES, ids=[json.dumps(v)[:60] for v in EDGES])
def test_values_at_the_edges_are_served(engine, values):
    params = SamplingParams.from_dict({"ignore_eos": True, "max_tokens": 12, **values},
                                      coerce_strings=True)
    outputs = _run(engine, "edge", "Once upon a time", params)
    assert len(outputs) == params.n
    for c in outputs:
        assert c.finish_reason in ("length", "stop") and c.token_ids
        assert all(0 <= t < VOCAB for t in c.token_ids)
    _assert_idle(engine.get_stats())


def test_the_issues_seeds_are_reproducible(engine):
    params = SamplingParams(seed=2**63 - 1, n=2, max_tokens=8, ignore_eos=True)
    first = [c.token_ids for c in _run(engine, "s1", "Hello", params)]
    again = [c.token_ids for c in _run(engine, "s2", "Hello", params)]
    alone = _run(engine, "s3", "Hello", params.clone(n=1, seed=2**63))[0].token_ids
    assert first == again and first[1] == alone and first[0] != first[1]


def test_max_tokens_beyond_the_room_stops_at_max_model_len(engine):
    prompt = {"prompt_token_ids": list(range(10, 40))}
    (c,) = _run(engine, "long", prompt,
                SamplingParams(temperature=0, max_tokens=2**40, min_tokens=2**39, ignore_eos=True))
    assert len(c.token_ids) == ENGINE["max_model_len"] - 30 and c.finish_reason == "length"


def test_the_async_engine_rejects_before_any_output(model):
    engine = AsyncLLMEngine(EngineArgs(model, **ENGINE))

    async def generate(values: dict, request_id: str) -> str:
        params = SamplingParams.from_dict(values, coerce_strings=True).clone(
            output_kind=RequestOutputKind.FINAL_ONLY)
        text = ""
        async for out in engine.generate("Hello world", params, request_id):
            text = out.outputs[0].text
        return text

    async def main() -> None:
        reference = await generate(GOOD, "reference")
        for i, (values, field, bound) in enumerate(BAD):
            with pytest.raises(ValueError) as info:
                await generate(values, f"bad{i}")
            assert field in str(info.value) and bound in str(info.value), str(info.value)
            assert await generate(GOOD, f"good{i}") == reference
        for i, values in enumerate(EDGES):
            await generate({"max_tokens": 6, "ignore_eos": True, **values}, f"edge{i}")
        await asyncio.sleep(0.1)  # the stats refresh when the engine goes idle

    try:
        asyncio.run(main())
        _assert_idle(engine.get_stats())
    finally:
        engine.shutdown()


def test_sampling_params_reject_what_the_engine_cannot_hold():
    """Without an engine: the ranges live in SamplingParams itself."""
    with pytest.raises(ValueError, match=r"SamplingParams\.seed must be .*18446744073709551613"):
        SamplingParams(seed=2**64 - 2, n=3)
    assert SamplingParams(seed=2**64 - 3, n=3).seed == 2**64 - 3
    assert SamplingParams(top_k=-1).top_k == 0 and SamplingParams(seed=-1).seed is None
    assert SamplingParams(logit_bias={"7": -1000.0}).logit_bias == {7: -100.0}
    assert SamplingParams.from_dict({"seed": "9223372036854775807"},
                                    coerce_strings=True).seed == 2**63 - 1  # exact, not via float
    assert SamplingParams.from_dict({"n": "3.0", "temperature": None},
                                    coerce_strings=True).n == 3
    for name in ("n", "seed", "max_tokens", "temperature"):
        with pytest.raises(ValueError, match=rf"SamplingParams\.{name} must be"):
            SamplingParams(**{name: 10**5000})  # more digits than Python prints


@pytest.mark.parametrize("text, expected", [
    ("[INST]", ["[INST]"]),
    ('["a", "b"]', ["a", "b"]),
    (' ["a"] ', ["a"]),
    ("[1, 2]", ["[1, 2]"]),  # a JSON list, but not of strings: the text itself
    ('"quoted"', ['"quoted"']),
    ("[", ["["]),
    ("[]", []),
])
def test_stop_strings_are_json_only_as_a_list_of_strings(text, expected):
    tensors = {"text_input": np.array([b"Hi"], dtype=object),
               "sampling_parameters": np.array([json.dumps({"stop": text}).encode()],
                                               dtype=object)}
    assert parse_request(tensors).params.stop == expected
    params = SamplingParams.from_dict({"bad_words": text, "stop": text}, coerce_strings=True)
    assert params.stop == expected and params.bad_words == expected


def test_a_stop_string_sent_as_a_string_stops_the_text(engine):
    full = _run(engine, "full", "Once upon a time", SamplingParams(**GOOD, stop=None))[0].text
    stop = full[2:5]
    for sent in (stop, json.dumps([stop, "[INST]"])):
        params = SamplingParams.from_dict({**GOOD, "stop": sent}, coerce_strings=True)
        (c,) = _run(engine, "stop", "Once upon a time", params)
        assert c.text == full[: full.index(stop)] and c.stop_reason == stop


# ---- fuzz -------------------------------------------------------------------------------------

NUM_FUZZ_CASES = 1500
FIELDS = sorted(f.name for f in dataclasses.fields(SamplingParams) if f.init)
_SPECIAL_FLOATS = [math.inf, -math.inf, math.nan, 1e-320, -0.0, 3.5e38, 1e308, 2.0, 0.5, 1e-6]
_BIG_INTS = [2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -(2**63), -(2**64)]
_STRINGS = ["nan", "inf", "-inf", "1e400", "true", "False", "1", "0", "-1", "0.5", "1.0",
            "[1, 2]", '["a", "b"]', "[INST]", '{"5": 2}', "", " ", "null", "[", "x", "[1.5]",
            "18446744073709551616", "9223372036854775807", "\u00b2", "1_0"]


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth == 0 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-3, 40)
    if kind == 3:
        return rng.choice(_BIG_INTS) + rng.randint(-2, 2)
    if kind == 4:
        return rng.choice(_SPECIAL_FLOATS) if rng.random() < 0.5 else rng.uniform(-3, 3)
    if kind == 5:
        return rng.choice(_STRINGS)
    if kind == 6:
        return str(_random_value(rng, depth + 1))
    if kind == 7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == 8:
        return [rng.randint(-1, VOCAB + 1) for _ in range(rng.randint(1, 4))]
    return {str(_random_value(rng, depth + 1)): _random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 2))}


def test_fuzz_random_json_values(engine):
    rng = random.Random(8)
    accepted = engine_rejected = 0
    for case in range(NUM_FUZZ_CASES):
        values = {rng.choice(FIELDS): _random_value(rng) for _ in range(rng.randint(1, 4))}
        values.pop("output_kind", None)  # set by the server, never by a client
        # As from a client: through JSON (NaN and Infinity included), then from_dict.
        values = json.loads(json.dumps(values))
        try:
            params = SamplingParams.from_dict(values, coerce_strings=True)
        except ValueError:
            continue
        try:
            engine.add_request(f"fuzz{case}", "Once upon a time", params)
        except ValueError:
            engine_rejected += 1
            continue
        accepted += 1
        for _ in range(2):
            engine.step()
        engine.abort_request([f"fuzz{case}"])
        while engine.has_unfinished_requests():
            engine.step()
        _assert_idle(engine.get_stats())
    assert accepted > 50 and engine_rejected > 2, (accepted, engine_rejected)


def test_max_logprobs_is_an_engine_argument(model, tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"model": model, "max_logprobs": 2,
                                                     **ENGINE}))
    engine = LLMEngine(EngineArgs.from_json_file(tmp_path / "model.json"))
    with pytest.raises(ValueError, match=r"logprobs must be at most 2 .*max_logprobs=2"):
        engine.add_request("a", "Hello", SamplingParams(logprobs=3))
    (c,) = _run(engine, "b", "Hello", SamplingParams(logprobs=2, max_tokens=3))
    # The top 2 and the sampled token, which may be one of them.
    assert len(c.logprobs) == 3 and all(2 <= len(entry) <= 3 for entry in c.logprobs)
    del engine
    uncapped = LLMEngine(EngineArgs(model, max_logprobs=-1, **ENGINE))
    (c,) = _run(uncapped, "c", "Hello", SamplingParams(logprobs=-1, max_tokens=2))
    assert all(len(entry) == VOCAB for entry in c.logprobs)  # every token, the sampled one too
    _assert_idle(uncapped.get_stats())
