"""prompt_logprobs (vLLM's field) equal HF transformers' log-softmax of the prompt's logits
(fp32, within TOL) under chunked prefill, mixed batches, prefix caching, preemption and async
scheduling, and come back in vLLM's shape: one entry per prompt token, None first."""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import pytest
import torch
from hf_reference import TINY_ARCHS, assert_prompt_logprobs_match, hf_prompt_logprobs

from pagedserve import LLM, RequestOutputKind, SamplingParams
from pagedserve.config import EngineArgs
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.worker import prompt_logprobs
from pagedserve.worker.prompt_logprobs import PromptLogprobsPlan, compute_prompt_logprobs
from pagedserve.worker.sampler import gather_logprobs

TOL = 1e-4  # absolute, on logprobs; fp32 engine vs fp32 HF differ by ~2e-5 at most here
KV = 64 << 20


def prompts_of(lengths: list[int], seed: int, vocab: int = 1000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


def make_llm(model, **kwargs: Any) -> LLM:
    if "num_kv_blocks" not in kwargs:
        kwargs.setdefault("kv_cache_memory_bytes", KV)
    return LLM(str(model), dtype="float32", enforce_eager=True, **kwargs)


def generate(llm: LLM, prompts: list[list[int]], params) -> list:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks, "blocks leaked"
    return outputs


def greedy(k: Optional[int], **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=kwargs.pop("max_tokens", 3),
                          ignore_eos=True, prompt_logprobs=k, **kwargs)


def check(model, prompt: list[int], entries, k: int) -> None:
    assert_prompt_logprobs_match(entries, prompt, hf_prompt_logprobs(model, prompt), k, TOL)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


def test_slices_score_few_rows_at_a_time_and_equal_one_pass(monkeypatch):
    monkeypatch.setattr(prompt_logprobs, "SLICE_ELEMENTS", 3 * 50)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(12, 16)
    plan = PromptLogprobsPlan(req_ids=["a", "b"], first_positions=[0, 4], counts=[6, 4],
                              num_logprobs=[3, 1], token_index=np.arange(2, 12),
                              targets=np.arange(10) * 3)
    rows_seen: list[int] = []

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        rows_seen.append(len(h))
        return head(h)

    with torch.inference_mode():
        result = compute_prompt_logprobs(logits_of, hidden, plan, vocab_size=50)
        ids, lps, ranks = gather_logprobs(head(hidden[2:]), torch.arange(10) * 3, 3)
    assert rows_seen == [3, 3, 3, 1]
    assert torch.equal(result.token_ids, ids) and torch.equal(result.ranks, ranks)
    assert torch.allclose(result.logprobs, lps)
    chunks = result.to_chunks()
    assert chunks["a"].first_position == 0 and len(chunks["a"].lists.ranks) == 6
    assert [len(row) for row in chunks["b"].lists.token_ids] == [2] * 4  # its own top-1


def test_chunked_prefill_and_a_batch_where_only_some_ask(model, monkeypatch):
    # 8 tokens a step: the long prompts span up to 8 chunks, and chunks of several requests
    # share steps; the second and last prompts do not ask. Logits are computed 3 rows at a
    # time.
    monkeypatch.setattr(prompt_logprobs, "SLICE_ELEMENTS", 3 * 1024)
    prompts = prompts_of([40, 7, 23, 1, 61, 12], seed=1)
    ks = [3, None, 0, 2, 5, None]
    params = [greedy(k, logprobs=1 if i % 2 else None) for i, k in enumerate(ks)]
    llm = make_llm(model, max_num_batched_tokens=8, block_size=8)
    assert prompt_logprobs.slice_rows(llm.engine.model_config.vocab_size) == 3
    outputs = generate(llm, prompts, params)
    for prompt, k, out in zip(prompts, ks, outputs):
        if k is None:
            assert out.prompt_logprobs is None
        else:
            check(model, prompt, out.prompt_logprobs, k)
        assert len(out.outputs[0].token_ids) == 3
    # Nothing is left to score: the rows that asked have left the runner's prompt set.
    assert not llm.engine.runner.batch.prompt_logprob_rows


def test_the_prompt_token_alone_with_zero(model):
    prompt = prompts_of([30], seed=2)[0]
    out = generate(make_llm(model), [prompt], greedy(0))[0]
    assert all(len(entry) == 1 for entry in out.prompt_logprobs[1:])
    check(model, prompt, out.prompt_logprobs, 0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_architecture(tiny_model_dir, arch):
    model = tiny_model_dir(arch)
    prompt = prompts_of([33], seed=3)[0]
    out = generate(make_llm(model, max_num_batched_tokens=16), [prompt], greedy(4))[0]
    check(model, prompt, out.prompt_logprobs, 4)


def test_a_prefix_cache_hit_does_not_drop_positions(model):
    prompt = prompts_of([45], seed=4)[0]
    llm = make_llm(model, block_size=8, enable_prefix_caching=True)
    first = generate(llm, [prompt], greedy(2))[0]
    second = generate(llm, [prompt], greedy(2))[0]
    check(model, prompt, second.prompt_logprobs, 2)
    assert second.num_cached_tokens == 0  # recomputed: the cache holds no logits
    assert [None if e is None else sorted((t, lp.rank) for t, lp in e.items())
            for e in second.prompt_logprobs] == [
        None if e is None else sorted((t, lp.rank) for t, lp in e.items())
        for e in first.prompt_logprobs]
    assert all(abs(a[t].logprob - b[t].logprob) < 1e-6
               for a, b in zip(first.prompt_logprobs[1:], second.prompt_logprobs[1:]) for t in a)
    # The cache still serves requests that do not ask, and was filled by those that do.
    plain = generate(llm, [prompt], greedy(None))[0]
    assert plain.num_cached_tokens == 40


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_neither_duplicates_nor_drops_positions(model, async_scheduling):
    # 14 blocks of 8 tokens, 8 tokens a step: prompts of 27-37 tokens that grow by 20 must
    # preempt one another, some in the middle of their prompt.
    prompts = prompts_of([37, 27, 33, 30], seed=5)
    llm = make_llm(model, block_size=8, num_kv_blocks=14, max_model_len=64,
                   max_num_batched_tokens=8, async_scheduling=async_scheduling)
    scheduler = llm.engine.scheduler
    preempted_in_prompt = []
    preempt = scheduler._preempt

    def recording(request):
        if request.num_computed_tokens < request.num_prompt_tokens:
            preempted_in_prompt.append(request.num_computed_tokens)
        preempt(request)

    scheduler._preempt = recording
    outputs = generate(llm, prompts, greedy(1, max_tokens=20))
    assert llm.engine.get_stats().num_preemptions_total > 0
    assert preempted_in_prompt, "no request was preempted in the middle of its prompt"
    for prompt, out in zip(prompts, outputs):
        check(model, prompt, out.prompt_logprobs, 1)
        assert len(out.outputs[0].token_ids) == 20


def test_n_completions_share_one_list(model):
    prompt = prompts_of([21], seed=6)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=4, prompt_logprobs=2)
    llm = make_llm(model, block_size=8)
    out = generate(llm, [prompt], params)[0]
    assert len(out.outputs) == 3
    check(model, prompt, out.prompt_logprobs, 2)


def test_streamed_outputs_carry_them_once(model):
    engine = LLMEngine(EngineArgs(model=str(model), dtype="float32", enforce_eager=True,
                                  kv_cache_memory_bytes=KV, max_num_batched_tokens=8))
    prompt = prompts_of([20], seed=8)[0]
    delta = greedy(3, max_tokens=4, output_kind=RequestOutputKind.DELTA)
    engine.add_request("asks", {"prompt_token_ids": prompt}, delta)
    engine.add_request("cumulative", {"prompt_token_ids": prompt},
                       greedy(3, max_tokens=4, output_kind=RequestOutputKind.CUMULATIVE))
    engine.add_request("plain", {"prompt_token_ids": prompt}, greedy(None, max_tokens=4))
    seen: dict[str, list] = {"asks": [], "cumulative": [], "plain": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out.prompt_logprobs)
    first, *rest = seen["asks"]
    check(model, prompt, first, 3)
    assert len(seen["asks"]) == 4 and rest == [[], [], []]  # vLLM's DELTA outputs
    assert all(entries is seen["cumulative"][0] for entries in seen["cumulative"])
    check(model, prompt, seen["cumulative"][0], 3)
    assert seen["plain"] == [None] * 4


def test_whole_vocabulary_with_max_logprobs_minus_one(model):
    llm = make_llm(model, max_logprobs=-1)
    vocab = llm.engine.model_config.vocab_size
    prompt = prompts_of([6], seed=9)[0]
    out = generate(llm, [prompt], greedy(-1))[0]
    assert all(len(entry) == vocab for entry in out.prompt_logprobs[1:])
    check(model, prompt, out.prompt_logprobs, vocab)


@pytest.mark.parametrize("value, message", [
    (-2, "SamplingParams.prompt_logprobs must be non-negative, or -1"),
    (1.5, "SamplingParams.prompt_logprobs must be an integer"),
    ("3", "SamplingParams.prompt_logprobs must be an integer"),
    (True, "SamplingParams.prompt_logprobs must be an integer"),
])
def test_bad_values_name_the_field(value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(prompt_logprobs=value)


def test_the_engine_caps_them_with_max_logprobs(model):
    llm = make_llm(model, max_logprobs=5)
    with pytest.raises(ValueError, match=r"prompt_logprobs must be at most 5 .*max_logprobs=5"):
        llm.generate("hello", SamplingParams(prompt_logprobs=6), use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt_logprobs=-1 .* needs the engine argument "
                                         r"max_logprobs=-1"):
        llm.generate("hello", SamplingParams(prompt_logprobs=-1), use_tqdm=False)
    assert llm.engine.get_stats().num_waiting == 0
    out = llm.generate("hello", SamplingParams(prompt_logprobs=5, max_tokens=1),
                       use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
