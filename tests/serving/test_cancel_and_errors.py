"""Cancellation frees the request's KV blocks; bad input is INVALID_ARG and nothing else."""

from __future__ import annotations

import json
import queue
import time

import pytest
import requests
from serving_client import (
    GrpcStream,
    metrics,
    sse_events,
    sse_token_ids,
    tensor,
    wait_for_metrics,
)

pytestmark = pytest.mark.triton_server

MAX = 3500
LONG = json.dumps({"max_tokens": MAX, "ignore_eos": True, "temperature": 0})
RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
KV = "vllm:kv_cache_usage_perc"
GENERATED = "vllm:generation_tokens_total"


def _wait_busy(triton_server) -> dict[str, float]:
    """The metrics once the long request is running and holds KV blocks."""
    values = wait_for_metrics(
        triton_server.metrics_url, lambda m: m.get(RUNNING) == 1 and m.get(KV, 0) > 0, timeout=10
    )
    assert values.get(RUNNING) == 1 and values.get(KV, 0) > 0, values
    return values


def _assert_freed(triton_server, generated_before: float) -> None:
    """Nothing runs, no KV block is held, and the request stopped well before max_tokens."""
    values = wait_for_metrics(
        triton_server.metrics_url,
        lambda m: m.get(RUNNING) == 0 and m.get(KV) == 0 and m.get(WAITING) == 0,
    )
    assert values.get(RUNNING) == 0 and values.get(KV) == 0, values
    # The counters are written when a request ends, so wait for this one's to settle.
    time.sleep(1.0)
    generated = metrics(triton_server.metrics_url)[GENERATED] - generated_before
    assert 0 < generated < MAX, generated


def test_grpc_cancel_mid_stream_frees_blocks(triton_server):
    before = metrics(triton_server.metrics_url).get(GENERATED, 0.0)
    stream = GrpcStream(triton_server.grpc_url)
    stream.send("llm", [
        tensor("text_input", "Tell me a long story"),
        tensor("stream", True),
        tensor("sampling_parameters", LONG),
    ])
    for _ in range(3):
        result, error = stream.queue.get(timeout=30)
        assert error is None, error
    _wait_busy(triton_server)
    stream.close(cancel=True)  # stop_stream(cancel_requests=True)
    # The client side of a cancelled stream ends with CANCELLED.
    errors = []
    while True:
        try:
            result, error = stream.queue.get(timeout=2)
        except queue.Empty:
            break
        if error is not None:
            errors.append(error)
    assert errors and all("CANCELLED" in str(e.status()) for e in errors), errors
    _assert_freed(triton_server, before)


def test_http_disconnect_mid_stream_frees_blocks(triton_server):
    before = metrics(triton_server.metrics_url).get(GENERATED, 0.0)
    response = requests.post(
        f"{triton_server.http_url}/v2/models/llm/generate_stream",
        json={"text_input": "Tell me a long story", "stream": True, "sampling_parameters": LONG},
        stream=True,
        timeout=60,
    )
    lines = response.iter_lines()
    events = 0
    while events < 3:
        if next(lines).startswith(b"data: "):
            events += 1
    _wait_busy(triton_server)
    response.close()  # the client goes away
    _assert_freed(triton_server, before)


def test_grpc_cancel_non_streamed_request_frees_blocks(triton_server):
    """A request without streaming gets no response before the end; it is cancelled all the
    same. (Triton 2.51's HTTP /generate does not report a client disconnect to the model;
    /generate_stream, above, does.)"""
    before = metrics(triton_server.metrics_url).get(GENERATED, 0.0)
    stream = GrpcStream(triton_server.grpc_url)
    stream.send("llm", [
        tensor("text_input", "Tell me a long story"),
        tensor("sampling_parameters", LONG),
    ])
    _wait_busy(triton_server)
    stream.close(cancel=True)
    _assert_freed(triton_server, before)


# (payload for /generate, a word the error message must contain)
BAD_INPUTS = [
    ({"text_input": "hi", "sampling_parameters": '{"max_tokens": 4'}, "not valid JSON"),
    ({"text_input": "hi", "sampling_parameters": "[1, 2]"}, "JSON object"),
    ({"text_input": "hi", "sampling_parameters": '{"max_tokens": 4, "foo": 1}'}, "'foo'"),
    ({"text_input": "hi", "sampling_parameters": '{"temperature": "-1"}'}, "temperature"),
    ({"text_input": "hi", "sampling_parameters": '{"top_p": 2}'}, "top_p"),
    ({"text_input": "hi", "sampling_parameters": '{"max_tokens": "many"}'}, "max_tokens"),
    ({"text_input": "hi", "bogus_field": 3}, "'bogus_field'"),
    ({"max_tokens": 4}, "no prompt"),
    ({"text_input": "hi", "input_ids": [1, 2, 3]}, "not both"),
    ({"input_ids": [1, 10**6]}, "vocabulary"),
    ({"text_input": "hello " * 5000, "max_tokens": 4}, "too long"),
    ({"text_input": "hi", "stream": True, "exclude_input_in_output": False},
     "exclude_input_in_output"),
]


def test_bad_inputs_are_invalid_arg_while_a_good_stream_completes(triton_server):
    stream = GrpcStream(triton_server.grpc_url)
    try:
        rid = stream.send("llm", [
            tensor("text_input", "A good request"),
            tensor("stream", True),
            tensor("sampling_parameters", json.dumps({"max_tokens": 300, "ignore_eos": True})),
        ])
        for payload, word in BAD_INPUTS:
            r = requests.post(
                f"{triton_server.http_url}/v2/models/llm/generate", json=payload, timeout=30
            )
            assert r.status_code == 400, (payload, r.status_code, r.text)
            assert word in r.json()["error"], (payload, r.text)
        # Over gRPC too: the error arrives on the stream.
        bad = GrpcStream(triton_server.grpc_url)
        try:
            bad_id = bad.send("llm", [
                tensor("text_input", "hi"), tensor("sampling_parameters", '{"n": 0}'),
            ])
            result = bad.collect([bad_id])[bad_id]
        finally:
            bad.close()
        assert result.error is not None and "SamplingParams.n" in str(result.error)
        # The ensemble names its own inputs.
        r = requests.post(
            f"{triton_server.http_url}/v2/models/ensemble/generate",
            json={"text_input": "hi", "max_tokens": 4, "beam_width": 2},
            timeout=30,
        )
        assert r.status_code == 400 and "beam_width" in r.json()["error"], r.text
        good = stream.collect([rid], timeout=120)[rid]
    finally:
        stream.close()
    assert good.error is None, good.error
    assert good.final_seen and len(good.ids()) == 300


def test_server_keeps_serving_after_errors(triton_server):
    r = requests.post(
        f"{triton_server.http_url}/v2/models/llm/generate_stream",
        json={"text_input": "still alive?", "stream": True, "max_tokens": 5},
        stream=True,
        timeout=60,
    )
    events = sse_events(r)
    assert all("error" not in e for e in events), events
    assert len(sse_token_ids(events)) == 5
