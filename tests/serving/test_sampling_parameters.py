"""The issue's sampling parameters over a real tritonserver: each out-of-range one is
INVALID_ARG naming the field, the engine keeps serving the same greedy text with no KV block
left in use, and the edge values and the new fields (prompt_logprobs too) are served."""

from __future__ import annotations

import json

import pytest
import requests
from serving_client import GrpcStream, tensor, wait_for_metrics

pytestmark = pytest.mark.triton_server

GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
KV, RUNNING = "vllm:kv_cache_usage_perc", "vllm:num_requests_running"

# sampling_parameters as sent (a JSON string, so 1e400 is JSON's infinity), the field named.
REJECTED = [
    ('{"seed": 18446744073709551616}', "seed"),
    ('{"temperature": 1e400}', "temperature"),
    ('{"temperature": "nan"}', "temperature"),
    ('{"temperature": -1}', "temperature"),
    ('{"temperature": "inf"}', "temperature"),
    ('{"n": 10000}', "max_num_seqs"),
    ('{"logprobs": 21}', "max_logprobs"),
    ('{"prompt_logprobs": 21}', "prompt_logprobs"),
    ('{"prompt_logprobs": "two"}', "prompt_logprobs"),
    ('{"prompt_logprobs": -2}', "prompt_logprobs"),
    ('{"logit_bias": {"999999": 5}}', "logit_bias"),
]
SERVED = [
    {"seed": 9223372036854775807, "n": 2},
    {"top_k": 9223372036854775807},
    {"stop": "[INST]"},
    {"stop": '["[INST]", "</s>"]', "bad_words": "[x"},
    {"logit_bias": '{"7": 100}', "temperature": "1.0"},
    {"allowed_token_ids": "[30, 31]"},
]


def _generate(server, params: object) -> requests.Response:
    body = {"text_input": "Hello world",
            "sampling_parameters": params if isinstance(params, str) else json.dumps(params),
            "exclude_input_in_output": True}
    return requests.post(f"{server.http_url}/v2/models/llm/generate", json=body, timeout=60)


def test_rejected_over_http_and_grpc_then_the_same_text(triton_server):
    reference = _generate(triton_server, GREEDY)
    assert reference.status_code == 200, reference.text
    for params, field in REJECTED:
        r = _generate(triton_server, params)
        assert r.status_code == 400 and field in r.json()["error"], (params, r.text)
        again = _generate(triton_server, GREEDY)
        assert again.json()["text_output"] == reference.json()["text_output"]
    stream = GrpcStream(triton_server.grpc_url)
    try:
        for params, field in REJECTED:  # one at a time: a gRPC error carries no request id
            rid = stream.send("llm", [tensor("text_input", "hi"),
                                      tensor("sampling_parameters", params)])
            error = stream.collect([rid], timeout=60)[rid].error
            # (A streamed error carries the message, without a gRPC status.)
            assert error is not None and field in error.message(), (params, error)
    finally:
        stream.close()
    values = wait_for_metrics(triton_server.metrics_url,
                              lambda m: m.get(RUNNING) == 0 and m.get(KV) == 0)
    assert values.get(KV) == 0, values


def test_edge_values_and_new_fields_are_served(triton_server):
    for params in SERVED:
        r = _generate(triton_server, {**GREEDY, **params})
        assert r.status_code == 200, (params, r.text)
    from pagedserve.tokenizer.tokenizer import bad_words_token_ids, load_tokenizer

    tok = load_tokenizer(triton_server.repository / "llm" / "1" / "default_model")
    token = tok.encode(" hello", add_special_tokens=False)[0]
    # A +100 bias on one token (sent as a string) makes every sampled token that one; so does
    # allowing only it.
    for params in ({"logit_bias": json.dumps({str(token): 100}), "temperature": "1.0"},
                   {"allowed_token_ids": [token]}):
        r = _generate(triton_server, {**GREEDY, **params})
        assert r.status_code == 200, (params, r.text)
        assert r.json()["output_ids"] == [token] * GREEDY["max_tokens"], (params, r.text)
    # A bad word (here one the greedy completion spells with one token) never appears.
    free = _generate(triton_server, {**GREEDY, "max_tokens": 24}).json()["output_ids"]
    spans = [free[i:i + n] for n in (1, 2, 3) for i in range(len(free) - n + 1)]
    span, word = next((span, tok.decode(span)) for span in spans
                      if span in bad_words_token_ids([tok.decode(span)], tok))
    banned = _generate(triton_server, {**GREEDY, "max_tokens": 24,
                                       "bad_words": json.dumps([word])})
    assert banned.status_code == 200, banned.text
    out = banned.json()["output_ids"]
    assert all(out[i:i + len(span)] != span for i in range(len(out))), (span, out)


def _as_json(entries) -> list:
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                             "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in entries]


def _assert_same_entries(got: list, expected: list) -> None:
    assert len(got) == len(expected) and got[0] is None
    for g, e in zip(got[1:], expected[1:]):
        assert list(g) == list(e)  # the prompt token first, then the top-k
        for tid, value in g.items():
            assert value["rank"] == e[tid]["rank"]
            assert value["decoded_token"] == e[tid]["decoded_token"]
            assert value["logprob"] == pytest.approx(e[tid]["logprob"], abs=1e-5)


def test_prompt_logprobs_come_back_once_with_return_prompt_logprobs(
    triton_server, serving_checkpoint
):
    from pagedserve import LLM, SamplingParams

    prompt = "Hello world, once more"
    reference = LLM(str(serving_checkpoint), kv_cache_memory_bytes=32 << 20).generate(
        prompt, SamplingParams(prompt_logprobs=2, max_tokens=1), use_tqdm=False
    )[0]
    expected = _as_json(reference.prompt_logprobs)
    asks = json.dumps({**GREEDY, "prompt_logprobs": "2"})
    # Not streamed (HTTP generate): the one response holds them.
    body = {"text_input": prompt, "sampling_parameters": asks, "return_prompt_logprobs": True}
    r = requests.post(f"{triton_server.http_url}/v2/models/llm/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    _assert_same_entries(json.loads(r.json()["prompt_logprobs"]), expected)
    stream = GrpcStream(triton_server.grpc_url)
    try:
        inputs = [tensor("text_input", prompt), tensor("stream", True)]
        streamed = stream.send("llm", inputs + [tensor("sampling_parameters", asks),
                                                tensor("return_prompt_logprobs", True)])
        unasked = stream.send("llm", inputs + [tensor("sampling_parameters", json.dumps(GREEDY)),
                                               tensor("return_prompt_logprobs", True)])
        unflagged = stream.send("llm", inputs + [tensor("sampling_parameters", asks)])
        results = stream.collect([streamed, unasked, unflagged], timeout=60)
    finally:
        stream.close()
    # Streamed: the whole list in the first response, [] after it (vLLM's DELTA outputs).
    first, *rest = [json.loads(r["prompt_logprobs"][0]) for r in results[streamed].responses]
    _assert_same_entries(first, expected)
    assert rest and all(entries == [] for entries in rest)
    assert {r["prompt_logprobs"][0] for r in results[unasked].responses} == {b"null"}
    assert all("prompt_logprobs" not in r for r in results[unflagged].responses)
