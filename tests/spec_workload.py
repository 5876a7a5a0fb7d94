"""What the speculative-decoding tests share: the n-gram proposer's prompts and set-up; for
the draft model and EAGLE-3, a greedy workload over the length edges, prefix-cache hits and
n>1, and the engine set-ups it runs under; the drafts' counts, and checks on the KV cache
afterwards."""

from __future__ import annotations

from pathlib import Path

import torch

from pagedserve import LLM, SamplingParams

KV = 32 << 20
ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "model_repository/llm/1"  # the shipped target, draft model and EAGLE-3 head
TARGET = TRAINED / "default_model"
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
         "prompt_lookup_max": 4, "adaptive": False}


def _code(name: str, chars: int) -> str:
    return (ROOT / "backend" / "pagedserve" / name).read_text()[:chars]


# Prompts whose continuation repeats what they hold (the n-gram proposer's workload), and two
# that do not.
PROMPTS = [
    _code("core/block_pool.py", 500) + "\n# The same, again:\n" + _code("core/block_pool.py", 120),
    _code("outputs.py", 400) + "\n\n" + _code("outputs.py", 80),
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
]


def spec_counts(llm: LLM) -> tuple[int, int]:
    """The drafts proposed and accepted so far."""
    stats = llm.engine.get_stats().spec_decoding
    return stats.num_draft_tokens, stats.num_accepted_tokens


def workload() -> tuple[list, list[SamplingParams]]:
    greedy = dict(temperature=0.0, ignore_eos=True)
    shared = "The same long shared prefix for several requests, then "
    cases = [
        ("Once upon a time", SamplingParams(max_tokens=40, **greedy)),
        (shared + "one", SamplingParams(max_tokens=30, **greedy)),
        (shared + "one", SamplingParams(max_tokens=30, **greedy)),  # a prefix-cache hit
        (shared + "two", SamplingParams(n=3, max_tokens=20, **greedy)),
        ({"prompt_token_ids": list(range(5, 70))}, SamplingParams(max_tokens=33, **greedy)),
        # max_tokens edges below and at k.
        ("Short", SamplingParams(max_tokens=1, **greedy)),
        ("Short two", SamplingParams(max_tokens=2, **greedy)),
        ("Short three", SamplingParams(max_tokens=4, **greedy)),
        # Runs into max_model_len (128).
        ({"prompt_token_ids": list(range(100, 200))}, SamplingParams(max_tokens=None, **greedy)),
        ("Until the end of the model", SamplingParams(max_tokens=None, **greedy)),
    ]
    return [p for p, _ in cases], [s for _, s in cases]


def run(model: Path, speculative_config=None, **kwargs) -> tuple[list, LLM]:
    """The workload's (token ids, finish reason) per output, and the LLM that ran it."""
    llm = LLM(str(model), max_model_len=128, block_size=8, speculative_config=speculative_config,
              **kwargs)
    prompts, params = workload()
    results = [(c.token_ids, c.finish_reason)
               for out in llm.generate(prompts, params, use_tqdm=False) for c in out.outputs]
    return results, llm


def trained_target_run(speculative_config,
                       max_tokens: tuple[int, int] = (32, 32)) -> tuple[list, list, LLM]:
    """Greedy tokens of the shipped target on two of this repository's source excerpts (so
    many tokens each), without and with ``speculative_config``, and the speculating LLM."""
    prompts = [(ROOT / "backend/pagedserve" / f).read_text()[:600]
               for f in ("core/block_pool.py", "outputs.py")]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    kwargs = dict(dtype="float32", kv_cache_memory_bytes=KV, max_num_batched_tokens=64)

    def tokens(llm: LLM) -> list:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    expected = tokens(LLM(str(TARGET), **kwargs))
    llm = LLM(str(TARGET), **kwargs, speculative_config=speculative_config)
    return expected, tokens(llm), llm


def assert_idle(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    assert stats.num_running == stats.num_waiting == 0


def blocks_written(caches: list[torch.Tensor]) -> set[int]:
    """The block ids any of these (zero-initialised) caches holds a nonzero value in."""
    used = torch.zeros(caches[0].shape[1], dtype=torch.bool)
    for cache in caches:
        used |= cache.abs().flatten(2).amax(dim=(0, 2)) > 0
    return set(torch.nonzero(used).flatten().tolist())


# name: (engine arguments, speculative_config additions)
SCENARIOS: dict[str, tuple[dict, dict]] = {
    "plain": (dict(kv_cache_memory_bytes=KV, enable_prefix_caching=False), {}),
    "prefix-caching": (dict(kv_cache_memory_bytes=KV, enable_prefix_caching=True), {}),
    # A 16-token budget chunks every longer prompt (and the drafter's catch-up with it).
    "chunked": (dict(kv_cache_memory_bytes=KV, max_num_batched_tokens=16), {}),
    # 18 blocks of 8 tokens, one 128-token request needs 16: requests are preempted.
    "preempting": (dict(num_kv_blocks=18, max_num_batched_tokens=16, max_num_seqs=6), {}),
    # No drafts while more than 2 requests run: a draft model's KV falls behind for many
    # steps and catches up in long chunks (over several forwards: 16 tokens each) once
    # drafting resumes; an EAGLE-3 head is dormant on those steps (it keeps only the target's
    # features) and resumes from its ring, or from a window after a longer pause.
    "intermittent": (dict(kv_cache_memory_bytes=KV, max_num_batched_tokens=16),
                     dict(disable_by_batch_size=2)),
}
