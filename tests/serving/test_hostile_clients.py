"""The shipped server survives hostile gRPC clients: streams opened with the
``triton_grpc_error: true`` header whose requests every shipped model rejects.

Triton 2.51 crashed (SIGSEGV, or a gRPC assertion) on such streams when a rejection followed
its request fast: preprocessing's, sent from execute(), within 1-40 streams; a decoupled
model's within 500-3,000. The shipped Python models hold their rejections back 20 ms
(pagedserve.serving.error_sender). Each stream here carries one request: several in flight on
one such stream still crash 2.51 whatever the model does (the README says so).
"""

from __future__ import annotations

import json
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from serving_client import GrpcStream, tensor, wait_for_metrics

pytestmark = pytest.mark.triton_server

STREAMS_PER_MODEL = 160
CLIENTS = 16


def _bad(model: str) -> tuple[list, str]:
    """A request the model rejects, and what the error must name."""
    if model == "llm":
        return [tensor("text_input", "hi"),
                tensor("sampling_parameters", json.dumps({"top_p": 5}))], "top_p"
    if model == "postprocessing":
        return [tensor("output_ids", [5, 10**6])], "output_ids"
    batched = model != "preprocessing"
    return [tensor("text_input", "", batch=batched),
            tensor("max_tokens", 4, batch=batched)], "'text_input' is empty"


def _one_stream(url: str, model: str) -> str:
    """Opens a triton_grpc_error stream, sends one bad request, returns the error seen."""
    inputs, _ = _bad(model)
    client = grpcclient.InferenceServerClient(url)
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put(error),
                        headers={"triton_grpc_error": "true"})
    try:
        client.async_stream_infer(model, inputs)
        error = received.get(timeout=30)
    finally:
        client.stop_stream()
        client.close()
    return f"{error.status()}: {error.message()}" if error is not None else "no error"


def _greedy_text(url: str) -> str:
    stream = GrpcStream(url)
    try:
        rid = stream.send("llm", [
            tensor("text_input", "Still serving?"),
            tensor("sampling_parameters", json.dumps({"temperature": 0, "max_tokens": 8})),
        ])
        result = stream.collect([rid])[rid]
    finally:
        stream.close()
    assert result.error is None, result.error
    return result.text()


@pytest.mark.parametrize("model", ["preprocessing", "postprocessing", "tensorrt_llm_bls",
                                   "ensemble", "llm"])
def test_rejections_on_triton_grpc_error_streams(triton_server, model):
    before = _greedy_text(triton_server.grpc_url)
    _, named = _bad(model)
    with ThreadPoolExecutor(CLIENTS) as pool:
        errors = list(pool.map(lambda _: _one_stream(triton_server.grpc_url, model),
                               range(STREAMS_PER_MODEL)))
    assert triton_server.process.poll() is None, triton_server.log()
    # Every stream got its own error, a client error naming the input.
    assert all(e.startswith("StatusCode.INVALID_ARGUMENT") and named in e for e in errors), (
        sorted(set(errors))[:5])
    assert requests.get(f"{triton_server.http_url}/v2/health/ready", timeout=10).ok
    assert _greedy_text(triton_server.grpc_url) == before
    values = wait_for_metrics(triton_server.metrics_url,
                              lambda m: m.get("vllm:kv_cache_usage_perc") == 0)
    assert values.get("vllm:kv_cache_usage_perc") == 0, values


def test_a_good_stream_runs_on_while_others_are_rejected(triton_server):
    """Hostile streams next to a long, good one: it completes untouched."""
    stream = GrpcStream(triton_server.grpc_url)
    try:
        rid = stream.send("tensorrt_llm_bls", [
            tensor("text_input", "A good request", batch=True),
            tensor("max_tokens", 200, batch=True),
            tensor("end_id", -1, batch=True),
            tensor("stream", True, batch=True),
            tensor("return_num_output_tokens", True, batch=True),
        ])
        stop = threading.Event()

        def hostile() -> None:
            while not stop.is_set():
                _one_stream(triton_server.grpc_url, "ensemble")

        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(hostile)
            try:
                result = stream.collect([rid], timeout=120)[rid]
            finally:
                stop.set()
    finally:
        stream.close()
    assert result.error is None, result.error
    assert sum(int(np.sum(r["num_output_tokens"])) for r in result.responses) == 200
    assert triton_server.process.poll() is None, triton_server.log()
