"""The metrics endpoint: vllm_backend's and vLLM's metrics with exact counts, token counters
that move while requests run, and metrics that keep up with a request with a large n."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from serving_client import GrpcStream, metrics, tensor, wait_for_metrics

from pagedserve.serving.metrics import (
    E2E_BUCKETS,
    ITERATION_BUCKETS,
    ITL_BUCKETS,
    N_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    build_1_2_5_buckets,
)

pytestmark = pytest.mark.triton_server

RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
PROMPT, GENERATED = "vllm:prompt_tokens_total", "vllm:generation_tokens_total"
ITL_COUNT = "vllm:inter_token_latency_seconds_count"


def _idle(triton_server) -> dict[str, float]:
    """The metrics once nothing runs and earlier requests' records are all written."""
    previous: dict[str, float] = {}

    def settled(m: dict[str, float]) -> bool:
        nonlocal previous
        done = m == previous and m.get(RUNNING) == 0 and m.get(WAITING) == 0
        previous = m
        return done

    return wait_for_metrics(triton_server.metrics_url, settled)


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _unique_words(n: int) -> str:
    """A prompt of ``n`` words that no earlier request shared (no prefix-cache hits)."""
    return " ".join(uuid.uuid4().hex[:4] for _ in range(n))


def test_metric_families_and_buckets(triton_server, serving_checkpoint):
    values = metrics(triton_server.metrics_url)
    max_model_len = json.loads((serving_checkpoint / "config.json").read_text())[
        "max_position_embeddings"
    ]
    for name, buckets in [
        ("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
        ("vllm:time_per_output_token_seconds", TPOT_BUCKETS),
        ("vllm:inter_token_latency_seconds", ITL_BUCKETS),
        ("vllm:e2e_request_latency_seconds", E2E_BUCKETS),
        ("vllm:request_queue_time_seconds", REQUEST_LATENCY_BUCKETS),
        ("vllm:request_prefill_time_seconds", REQUEST_LATENCY_BUCKETS),
        ("vllm:request_decode_time_seconds", REQUEST_LATENCY_BUCKETS),
        ("vllm:request_inference_time_seconds", REQUEST_LATENCY_BUCKETS),
        ("vllm:request_prompt_tokens", build_1_2_5_buckets(max_model_len)),
        ("vllm:request_generation_tokens", build_1_2_5_buckets(max_model_len)),
        ("vllm:request_params_n", N_BUCKETS),
        ("vllm:iteration_tokens_total", ITERATION_BUCKETS),
    ]:
        les = {float(k.split("{le=")[1].rstrip("}")) for k in values
               if k.startswith(f"{name}_bucket{{le=") and "Inf" not in k}
        assert les == set(buckets), name
        for suffix in ("_bucket{le=+Inf}", "_sum", "_count"):
            assert name + suffix in values, name + suffix
    for name in [
        PROMPT, GENERATED, RUNNING, WAITING, "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:request_success_total{finished_reason=stop}",
        "vllm:request_success_total{finished_reason=length}",
        "vllm:request_success_total{finished_reason=abort}",
    ]:
        assert name in values, name
    (info,) = [k for k in values if k.startswith("vllm:cache_config_info{")]
    assert "block_size=16" in info and "enable_prefix_caching=True" in info, info
    assert values[info] == 1


def test_request_counts(triton_server):
    before = _idle(triton_server)
    # (prompt words, max_tokens, stream, n); ignore_eos makes every completion generate
    # max_tokens. Prompts of fresh words are shorter than a KV block: no prefix-cache hits.
    plan = [(3, 7, True, 1), (2, 9, True, 1), (1, 11, False, 1), (2, 5, True, 1),
            (2, 6, True, 2), (2, 4, False, 2)]
    stream = GrpcStream(triton_server.grpc_url)
    try:
        ids = [
            stream.send("llm", [
                tensor("text_input", _unique_words(words)),
                tensor("stream", streamed),
                tensor("return_num_input_tokens", True),
                tensor("exclude_input_in_output", True),
                tensor("sampling_parameters",
                       json.dumps({"max_tokens": max_tokens, "ignore_eos": True, "n": n})),
            ])
            for words, max_tokens, streamed, n in plan
        ]
        results = stream.collect(ids)
    finally:
        stream.close()
    prompts = [int(results[i].responses[0]["num_input_tokens"][0]) for i in ids]
    assert all(p < 16 for p in prompts), prompts
    completions = [(p, max_tokens) for p, (_, max_tokens, _, n) in zip(prompts, plan)
                   for _ in range(n)]
    generated = sum(max_tokens for _, max_tokens in completions)
    assert sum(len(results[i].ids()) for i, (*_, n) in zip(ids, plan) if n == 1) == sum(
        max_tokens for _, max_tokens, _, n in plan if n == 1)

    per_request = len(plan)
    expected = {
        # Counters: prompt tokens once per request, every generated token of every completion.
        PROMPT: sum(prompts),
        GENERATED: generated,
        "vllm:request_success_total{finished_reason=length}": len(completions),
        "vllm:request_prompt_tokens_sum": sum(prompts),
        "vllm:request_generation_tokens_sum": generated,
        "vllm:request_params_n_sum": sum(n for *_, n in plan),
        # One inter-token latency per token after each completion's first.
        ITL_COUNT: generated - len(completions),
        "vllm:time_per_output_token_seconds_count": generated - len(completions),
        # Each completion's prompt and all but its last token are computed, in some steps.
        "vllm:iteration_tokens_total_sum": sum(p + m - 1 for p, m in completions),
    }
    for name in ("vllm:request_prompt_tokens", "vllm:request_generation_tokens",
                 "vllm:request_params_n", "vllm:e2e_request_latency_seconds",
                 "vllm:time_to_first_token_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                 "vllm:request_inference_time_seconds"):
        expected[f"{name}_count"] = per_request

    def settled(m: dict[str, float]) -> bool:
        return all(_delta(m, before, k) >= v for k, v in expected.items())

    after = wait_for_metrics(triton_server.metrics_url, settled)
    assert {k: _delta(after, before, k) for k in expected} == pytest.approx(expected)
    steps = _delta(after, before, "vllm:iteration_tokens_total_count")
    assert 0 < steps <= expected["vllm:iteration_tokens_total_sum"]
    assert after[RUNNING] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    for reason in ("stop", "abort"):
        assert _delta(after, before, f"vllm:request_success_total{{finished_reason={reason}}}") \
            == 0


def test_token_counters_move_while_a_request_runs(triton_server):
    """Tokens are counted as the engine makes them, not when the request ends; a cancelled
    request is counted as finished with reason abort."""
    before = _idle(triton_server)
    stream = GrpcStream(triton_server.grpc_url)
    try:
        stream.send("llm", [
            tensor("text_input", _unique_words(5)),
            tensor("stream", True),
            tensor("return_num_input_tokens", True),
            tensor("sampling_parameters", json.dumps({"max_tokens": 3500, "ignore_eos": True})),
        ])
        result, error = stream.queue.get(timeout=60)
        assert error is None, error
        prompt = int(result.as_numpy("num_input_tokens")[0])
        during = wait_for_metrics(
            triton_server.metrics_url, lambda m: _delta(m, before, GENERATED) >= 20)
        assert during[RUNNING] == 1, "the request ended before the counters moved"
        assert _delta(during, before, PROMPT) == prompt
        assert 20 <= _delta(during, before, GENERATED) < 3500
        assert _delta(during, before, ITL_COUNT) >= 1
        assert _delta(during, before, "vllm:e2e_request_latency_seconds_count") == 0
    finally:
        stream.close(cancel=True)
    after = _idle(triton_server)
    generated = _delta(after, before, GENERATED)
    assert _delta(after, before, "vllm:request_success_total{finished_reason=abort}") == 1
    assert _delta(after, before, "vllm:request_generation_tokens_sum") == generated
    assert _delta(after, before, ITL_COUNT) == generated - 1
    assert _delta(after, before, PROMPT) == prompt


def test_a_large_n_neither_delays_others_nor_the_metrics(triton_server):
    """The metrics thread makes no call per token: a request with n = 64 (12,800 tokens,
    finishing at once) is in the metrics within a few intervals, and a request sent while it
    runs gets its first token at once. (Margins are generous: the machine is shared.)"""
    before = _idle(triton_server)
    n, max_tokens = 64, 200
    big = GrpcStream(triton_server.grpc_url)
    small = GrpcStream(triton_server.grpc_url)
    first_response: list[float] = []
    try:
        big_id = big.send("llm", [
            tensor("text_input", _unique_words(3)),
            tensor("sampling_parameters",
                   json.dumps({"max_tokens": max_tokens, "ignore_eos": True, "n": n})),
        ])
        busy = wait_for_metrics(triton_server.metrics_url, lambda m: m.get(RUNNING, 0) >= n)
        assert busy[RUNNING] >= n, busy
        sent = time.monotonic()
        small_id = small.send("llm", [
            tensor("text_input", _unique_words(3)),
            tensor("stream", True),
            tensor("sampling_parameters", json.dumps({"max_tokens": 2, "ignore_eos": True})),
        ])
        quick = small.collect([small_id], timeout=60, on_response=lambda rid, k: (
            first_response.append(time.monotonic()) if k == 1 else None))[small_id]
        done = big.collect([big_id], timeout=300)[big_id]
        finished = time.monotonic()
    finally:
        big.close()
        small.close()
    assert quick.error is None and done.error is None, (quick.error, done.error)
    first_token_s = first_response[0] - sent
    print(f"\nfirst token of a request beside n={n}: {first_token_s * 1e3:.0f} ms")
    assert first_token_s < 5.0
    want = n * (max_tokens - 1) + 1  # and the small request's one latency after its first
    after = wait_for_metrics(
        triton_server.metrics_url, lambda m: _delta(m, before, ITL_COUNT) >= want, timeout=30)
    lag = time.monotonic() - finished
    print(f"metrics complete {lag * 1e3:.0f} ms after the n={n} request ended")
    assert _delta(after, before, ITL_COUNT) == want
    assert _delta(after, before, GENERATED) == n * max_tokens + 2
    assert lag < 5.0


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
