"""The issue's sampling parameters over a real tritonserver: each out-of-range one is
INVALID_ARG naming the field, the engine keeps serving the same greedy text with no KV block
left in use, and the edge values and the new fields are served."""

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
