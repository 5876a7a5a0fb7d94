"""The metrics endpoint: vllm_backend's request metrics with exact counts, plus the engine's
gauges and prefix-cache counters."""

from __future__ import annotations

import json

import pytest
from serving_client import GrpcStream, metrics, tensor, wait_for_metrics

from pagedserve.serving.metrics import (
    E2E_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    build_1_2_5_buckets,
)

pytestmark = pytest.mark.triton_server


def _idle(triton_server) -> dict[str, float]:
    """The metrics once nothing runs and earlier requests' records are all written."""
    previous: dict[str, float] = {}

    def settled(m: dict[str, float]) -> bool:
        nonlocal previous
        done = (m == previous and m.get("vllm:num_requests_running") == 0
                and m.get("vllm:num_requests_waiting") == 0)
        previous = m
        return done

    return wait_for_metrics(triton_server.metrics_url, settled)


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_metric_families_and_buckets(triton_server, serving_checkpoint):
    values = metrics(triton_server.metrics_url)
    max_model_len = json.loads((serving_checkpoint / "config.json").read_text())[
        "max_position_embeddings"
    ]
    for name, buckets in [
        ("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
        ("vllm:time_per_output_token_seconds", TPOT_BUCKETS),
        ("vllm:e2e_request_latency_seconds", E2E_BUCKETS),
        ("vllm:request_prompt_tokens", build_1_2_5_buckets(max_model_len)),
        ("vllm:request_generation_tokens", build_1_2_5_buckets(max_model_len)),
        ("vllm:request_params_n", [1, 2, 5, 10, 20]),
    ]:
        les = {float(k.split("{le=")[1].rstrip("}")) for k in values
               if k.startswith(f"{name}_bucket{{le=") and "Inf" not in k}
        assert les == set(buckets), name
    for name in [
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
        "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count",
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ]:
        assert name in values, name


def test_request_counts(triton_server):
    before = _idle(triton_server)
    # (prompt, max_tokens, stream); ignore_eos makes every request generate max_tokens.
    plan = [("one two three", 7, True), ("four five", 9, True), ("six", 11, False),
            ("seven eight nine ten", 5, True)]
    stream = GrpcStream(triton_server.grpc_url)
    try:
        ids = [
            stream.send("llm", [
                tensor("text_input", prompt),
                tensor("stream", streamed),
                tensor("return_num_input_tokens", True),
                tensor("exclude_input_in_output", True),
                tensor("sampling_parameters",
                       json.dumps({"max_tokens": n, "ignore_eos": True})),
            ])
            for prompt, n, streamed in plan
        ]
        results = stream.collect(ids)
    finally:
        stream.close()
    prompt_tokens = sum(int(results[i].responses[0]["num_input_tokens"][0]) for i in ids)
    generated = sum(n for _, n, _ in plan)
    assert sum(len(results[i].ids()) for i in ids) == generated

    expected = {
        "vllm:prompt_tokens_total": prompt_tokens,
        "vllm:generation_tokens_total": generated,
        "vllm:request_prompt_tokens_sum": prompt_tokens,
        "vllm:request_generation_tokens_sum": generated,
        "vllm:request_prompt_tokens_count": len(plan),
        "vllm:request_generation_tokens_count": len(plan),
        "vllm:e2e_request_latency_seconds_count": len(plan),
        "vllm:time_to_first_token_seconds_count": len(plan),
        # One inter-token latency per token after each request's first.
        "vllm:time_per_output_token_seconds_count": generated - len(plan),
        "vllm:request_params_n_count": len(plan),
    }

    def settled(m: dict[str, float]) -> bool:
        return all(_delta(m, before, k) >= v for k, v in expected.items())

    after = wait_for_metrics(triton_server.metrics_url, settled)
    assert {k: _delta(after, before, k) for k in expected} == expected
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0


def test_prefix_cache_counters(triton_server):
    before = _idle(triton_server)
    prompt = "A shared system prompt that is long enough to fill several KV blocks. " * 4
    stream = GrpcStream(triton_server.grpc_url)
    try:
        for _ in range(2):  # one after the other: the second finds the first's blocks
            rid = stream.send("llm", [
                tensor("text_input", prompt),
                tensor("sampling_parameters", '{"max_tokens": 2}'),
            ])
            assert stream.collect([rid])[rid].error is None
    finally:
        stream.close()
    after = wait_for_metrics(
        triton_server.metrics_url,
        lambda m: _delta(m, before, "vllm:prefix_cache_hits_total") > 0,
    )
    hits = _delta(after, before, "vllm:prefix_cache_hits_total")
    queries = _delta(after, before, "vllm:prefix_cache_queries_total")
    assert 0 < hits <= queries
    assert _delta(after, before, "vllm:num_preemptions_total") == 0
