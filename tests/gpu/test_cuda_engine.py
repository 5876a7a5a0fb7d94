"""Engine checks that need a CUDA device: bf16 parity with HF, CUDA graphs against eager."""

from __future__ import annotations

import random

import pytest
import torch
from hf_reference import hf_greedy

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MAX_TOKENS = 24
TOP_K = 5


def prompts_of(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 1000) for _ in range(n)] for n in lengths]


def generate(model_dir, prompts, **kwargs) -> list[list[int]]:
    llm = LLM(str(model_dir), kv_cache_memory_bytes=256 << 20, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    del llm
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_bf16_tokens_within_hf_top_k(tiny_model_dir, arch):
    """bf16 greedy tokens are among HF fp32's top-5 at each position, up to the first
    divergence (after which the two continue from different prefixes)."""
    model = tiny_model_dir(arch)
    prompts = prompts_of([7, 40, 130, 3], seed=11)
    ours = generate(model, prompts, dtype="bfloat16")
    refs = hf_greedy(model, prompts, MAX_TOKENS)
    for tokens, ref in zip(ours, refs):
        for i, token in enumerate(tokens):
            top = [t for t, _ in ref.top_logprobs[i][:TOP_K]]
            assert token in top, f"position {i}: {token} not in HF top-{TOP_K} {top}"
            if token != ref.token_ids[i]:
                break


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_equal_eager(tiny_model_dir, dtype):
    model = tiny_model_dir("llama")
    prompts = prompts_of([5, 60, 17, 33, 2, 90, 11], seed=12)
    eager = generate(model, prompts, dtype=dtype, enforce_eager=True)
    graphs = generate(model, prompts, dtype=dtype, enforce_eager=False, max_num_seqs=16)
    assert graphs == eager


def test_graph_runner_captures_and_replays(tiny_model_dir):
    model = tiny_model_dir("llama")
    llm = LLM(str(model), dtype="float32", max_num_seqs=20, kv_cache_memory_bytes=256 << 20)
    graphs = llm.engine.runner.graphs
    assert graphs is not None
    assert graphs.sizes == [1, 2, 4, 8, 16, 24]
    replays = _recording_replays(graphs)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts_of([4] * 5, 1)], params,
                 use_tqdm=False)
    assert replays and set(replays) == {8}  # 5 decodes replay the graph of size 8


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_kv_cache_graphs_equal_eager(tiny_model_dir, kv_cache_dtype):
    """The Triton kernels' fp8 write and read inside CUDA graphs give eager's tokens, and the
    fp8 cache holds twice the bf16 cache's blocks in the same memory."""
    model = tiny_model_dir("llama")
    prompts = prompts_of([5, 60, 17, 33, 2, 90, 11], seed=13)
    args = dict(dtype="bfloat16", kv_cache_dtype=kv_cache_dtype)
    eager = generate(model, prompts, enforce_eager=True, **args)
    graphs = generate(model, prompts, enforce_eager=False, max_num_seqs=16, **args)
    assert graphs == eager
    blocks = {}
    for kv in ("auto", kv_cache_dtype):
        llm = LLM(str(model), dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory_bytes=64 << 20)
        blocks[kv] = llm.engine.get_stats().num_kv_blocks
        del llm
        torch.cuda.empty_cache()
    assert blocks[kv_cache_dtype] == 2 * blocks["auto"]


def _speculative_graphs_equal_eager(model, spec: dict, prompts: list) -> LLM:
    """Greedy output with ``spec`` replaying graphs equals eager speculation's and plain
    decoding's, and some step replayed a graph of 1 + 3 tokens per request; the LLM that ran."""
    plain = generate(model, prompts, dtype="float32", enforce_eager=True)
    eager = generate(model, prompts, dtype="float32", enforce_eager=True,
                     speculative_config=spec)
    llm = LLM(str(model), dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=256 << 20,
              speculative_config=spec)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.query_lens == (1, 4)
    replays = []
    original = graphs.replay
    graphs.replay = lambda size, q=1: replays.append((size, q)) or original(size, q)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == eager == plain
    assert any(q == 4 for _, q in replays), replays
    return llm


def _recording_replays(graphs) -> list:
    """Makes ``graphs`` (a CudaGraphRunner) record each replay's batch size."""
    replays: list = []
    original = graphs.replay
    graphs.replay = lambda size, q=1: replays.append(size) or original(size, q)
    return replays


def test_speculative_decoding_graphs_equal_eager(tiny_model_dir):
    """Decodes that verify k drafts each replay graphs captured for 1 + k tokens per request,
    with the tokens of eager steps (and of plain decoding)."""
    model = tiny_model_dir("llama")
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
            "prompt_lookup_max": 3, "adaptive": False}
    prompts = [[4 + (i % 6) for i in range(48)], [9 + (i % 4) for i in range(30)],
               [20 + (i % 5) for i in range(64)]]
    llm = _speculative_graphs_equal_eager(model, spec, prompts)
    assert llm.engine.get_stats().spec_decoding.num_accepted_tokens > 0


def test_eagle3_graphs_equal_eager(tiny_model_dir, tmp_path):
    """With an EAGLE-3 head the target's graphs also return its aux hidden states: drafts and
    output are those of eager steps (and plain decoding's output)."""
    from pagedserve.devtools.eagle3_head import build_eagle3_head

    model = tiny_model_dir("llama")
    head = build_eagle3_head(tmp_path / "head", model, aux_layer_ids=[0, 1, 1], seed=5)
    spec = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 3,
            "adaptive": False}
    prompts = [[4 + (i % 6) for i in range(48)], [9 + (i % 4) for i in range(30)]]
    llm = _speculative_graphs_equal_eager(model, spec, prompts)
    assert llm.engine.get_stats().spec_decoding.num_draft_tokens > 0


def test_draft_model_graphs_equal_eager(tiny_model_dir):
    """A draft model's one-token steps replay its own graphs: the drafts are those of eager
    steps (the target drafting for itself: every draft accepted) and the output plain
    decoding's."""
    model = tiny_model_dir("llama")
    spec = {"method": "draft_model", "model": str(model), "num_speculative_tokens": 4,
            "adaptive": False}
    prompts = [[4 + (i % 6) for i in range(48)], [9 + (i % 4) for i in range(30)],
               [20 + (i % 5) for i in range(64)]]
    plain = generate(model, prompts, dtype="float32", enforce_eager=True)
    llm = LLM(str(model), dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=256 << 20,
              speculative_config=spec)
    draft_graphs = llm.engine.runner.draft_model.graphs
    assert draft_graphs is not None
    replays = _recording_replays(draft_graphs.graphs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == plain
    assert replays
    s = llm.engine.get_stats().spec_decoding
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens == s.num_draft_tokens
