"""Greedy outputs equal HF transformers' (fp32) for every architecture, under every scheduling
path that could corrupt them: small blocks, tiny chunks, preemption, prefix sharing, n>1,
and batches of very different lengths."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hf_reference import assert_greedy_match, hf_greedy

from pagedserve import LLM, SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
MAX_TOKENS = 24

_reference_cache: dict[tuple, list] = {}


def prompts_of(lengths: list[int], seed: int, vocab: int = 1000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


def reference(model_dir, prompts: list[list[int]]) -> list:
    key = (str(model_dir), tuple(map(tuple, prompts)))
    if key not in _reference_cache:
        _reference_cache[key] = hf_greedy(model_dir, prompts, MAX_TOKENS)
    return _reference_cache[key]


def run_engine(model_dir, prompts: list[list[int]], n: int = 1, **engine_kwargs: Any):
    # A small cache keeps many engines cheap (on a GPU too); graphs are checked in tests/gpu.
    if "num_kv_blocks" not in engine_kwargs:
        engine_kwargs.setdefault("kv_cache_memory_bytes", 64 << 20)
    llm = LLM(str(model_dir), dtype="float32", enforce_eager=True, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=n)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks, "blocks leaked"
    return outputs, llm


def check(outputs, refs) -> None:
    assert len(outputs) == len(refs)
    for output, ref in zip(outputs, refs):
        assert output.prompt_token_ids == ref.prompt_token_ids
        for completion in output.outputs:
            assert completion.finish_reason == "length"
            assert_greedy_match(completion.token_ids, ref)


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tiny_model_dir):
    return tiny_model_dir(request.param)


def test_small_blocks(model):
    prompts = prompts_of([5, 17, 33, 9], seed=1)
    outputs, _ = run_engine(model, prompts, block_size=8)
    check(outputs, reference(model, prompts))


def test_chunked_prefill_tiny_budget(model):
    prompts = prompts_of([40, 7, 23], seed=2)
    outputs, _ = run_engine(model, prompts, max_num_batched_tokens=5, block_size=8)
    check(outputs, reference(model, prompts))


def test_forced_preemption(model):
    # 12 blocks of 8 tokens for 4 requests that each grow to ~50 tokens: preemption must occur.
    prompts = prompts_of([26, 20, 30, 24], seed=3)
    outputs, llm = run_engine(model, prompts, block_size=8, num_kv_blocks=12, max_model_len=96)
    assert llm.engine.get_stats().num_preemptions_total > 0
    check(outputs, reference(model, prompts))


def test_prefix_caching_shared_prefixes(model):
    shared = prompts_of([37], seed=4)[0]
    tails = prompts_of([3, 11, 1, 20], seed=5)
    prompts = [shared + t for t in tails] + [shared[:16], shared]
    # Two rounds: the second finds everything of the first cached (and shares within a step).
    _, llm = run_engine(model, prompts[:2], block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats.prefix_cache_hits_total > 0
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    check(outputs, reference(model, prompts))


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_parallel_sampling_n_greater_than_one(model, prefix_caching: bool):
    prompts = prompts_of([21, 9], seed=6)
    outputs, llm = run_engine(model, prompts, n=3, block_size=8,
                              enable_prefix_caching=prefix_caching)
    assert all(len(o.outputs) == 3 for o in outputs)
    assert [c.index for c in outputs[0].outputs] == [0, 1, 2]
    # The siblings share the prompt's full blocks instead of computing them three times.
    assert llm.engine.get_stats().prefix_cache_hits_total >= 2 * 2 * 8
    check(outputs, reference(model, prompts))


def test_mixed_lengths_in_one_batch(model):
    prompts = prompts_of([1, 150, 4, 63, 2, 97], seed=7)
    outputs, _ = run_engine(model, prompts, block_size=16, max_num_batched_tokens=64)
    check(outputs, reference(model, prompts))
