"""``LLM.get_metrics()``: the engine's figures as vLLM's metric objects, spec_decode counters
included when the engine speculates (n-gram lookup on the shipped trained model, greedy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.engine.metrics_reader import Counter, Gauge, Histogram, Vector

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "model_repository/llm/1/default_model"
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
        "prompt_lookup_max": 4, "adaptive": False}
# Code that the trained model goes on repeating, so n-gram drafts are found and accepted.
PROMPT = "def add(a, b):\n    return a + b\n\n\n" * 2 + "def add(a, b):\n"
GREEDY = SamplingParams(temperature=0, max_tokens=48)
SPEC_NAMES = {"vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
              "vllm:spec_decode_num_accepted_tokens",
              "vllm:spec_decode_num_accepted_tokens_per_pos"}


def by_name(metrics: list) -> dict:
    named = {m.name: m for m in metrics}
    assert len(named) == len(metrics), "one series per name"
    return named


@pytest.fixture(scope="module")
def plain() -> LLM:
    return LLM(str(SHIPPED_MODEL), kv_cache_memory_bytes=1 << 24)


def test_metrics_without_speculation(plain):
    out = plain.generate(PROMPT, GREEDY, use_tqdm=False)[0]
    stats = plain.engine.get_stats()
    metrics = by_name(plain.get_metrics())
    assert not SPEC_NAMES & set(metrics), "no spec_decode series without speculation"
    assert isinstance(metrics["vllm:num_requests_running"], Gauge)
    assert metrics["vllm:num_requests_running"].value == 0
    generated = metrics["vllm:generation_tokens"]
    assert isinstance(generated, Counter)
    assert generated.value == stats.generation_tokens_total >= len(out.outputs[0].token_ids)
    assert metrics["vllm:prompt_tokens"].value == stats.prompt_tokens_total
    assert generated.labels == {"model_name": str(SHIPPED_MODEL), "engine": "0"}
    itl = metrics["vllm:inter_token_latency_seconds"]
    assert isinstance(itl, Histogram)
    assert itl.count == stats.inter_token_latency.count == itl.buckets["+Inf"] > 0
    assert list(itl.buckets)[:2] == ["0.01", "0.025"]
    assert list(itl.buckets.values()) == sorted(itl.buckets.values())  # cumulative


def test_spec_decode_metrics_match_the_engine_and_add_up(plain):
    llm = LLM(str(SHIPPED_MODEL), kv_cache_memory_bytes=1 << 24, speculative_config=SPEC)
    metrics = by_name(llm.get_metrics())
    assert {metrics[name].value for name in SPEC_NAMES - {
        "vllm:spec_decode_num_accepted_tokens_per_pos"}} == {0}
    assert metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values == [0, 0, 0]

    text = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].text
    assert text == plain.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].text

    metrics = by_name(llm.get_metrics())
    stats = llm.engine.get_stats().spec_decoding
    drafts = metrics["vllm:spec_decode_num_drafts"]
    draft_tokens = metrics["vllm:spec_decode_num_draft_tokens"]
    accepted = metrics["vllm:spec_decode_num_accepted_tokens"]
    per_pos = metrics["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert isinstance(drafts, Counter) and isinstance(per_pos, Vector)
    assert (drafts.value, draft_tokens.value, accepted.value) == (
        stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
    assert 0 < drafts.value <= draft_tokens.value <= 3 * drafts.value
    assert 0 < accepted.value <= draft_tokens.value
    assert len(per_pos.values) == 3 and sum(per_pos.values) == accepted.value
    assert per_pos.values == sorted(per_pos.values, reverse=True)
    assert per_pos.values[0] > 0
