"""HF-transformers greedy reference for parity tests.

`hf_greedy` runs the checkpoint with transformers (fp32, CPU) and records, per generated
position, the token, its logprob and the gap between the two largest logits. `assert_greedy_match`
compares an engine's greedy output against it, tolerating a divergence only where the reference
itself was at a near-tie (two fp32 implementations may then legitimately pick different tokens;
everything after such a point is incomparable).
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

# (arch, tokenizer kind) pairs the tiny-model fixtures build. transformers forces a byte-level
# tokenizer on qwen2, so it has no sentencepiece variant.
TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
TINY_MODEL_KINDS: Tuple[Tuple[str, str], ...] = (
    ("llama", "bpe"),
    ("llama", "sentencepiece"),
    ("mistral", "bpe"),
    ("mistral", "sentencepiece"),
    ("qwen2", "bpe"),
    ("qwen3", "bpe"),
    ("qwen3", "sentencepiece"),
)

NUM_TOP_LOGPROBS = 5


@dataclass
class HFGreedyResult:
    """One prompt's reference generation: tokens, and per position the top-2 logit gap (how
    safely greedy was decided), the chosen token's logprob and the top logprobs."""

    prompt_token_ids: List[int]
    token_ids: List[int] = field(default_factory=list)
    top2_gaps: List[float] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[List[Tuple[int, float]]] = field(default_factory=list)

    @property
    def min_gap(self) -> float:
        return min(self.top2_gaps, default=float("inf"))


@functools.lru_cache(maxsize=8)
def load_hf_model(model_dir: str):
    """The checkpoint as an fp32 CPU transformers model in eval mode (cached per directory)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


@contextlib.contextmanager
def _one_thread():
    # The tiny models are far too small for intra-op parallelism: on a busy 2-core machine the
    # thread pool makes generate() 6-8x slower than one thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def hf_greedy(
    model_dir: Union[str, pathlib.Path],
    prompt_token_ids_list: Sequence[Sequence[int]],
    max_tokens: int,
    *,
    stop_at_eos: bool = False,
) -> List[HFGreedyResult]:
    """Greedy-decodes each prompt with `model.generate`, one prompt at a time (no padding).

    Exactly `max_tokens` tokens are generated unless `stop_at_eos` (then generation ends after
    the first EOS). No logits processor is active (no repetition penalty, no min-length EOS
    masking), which is checked: every token must be the argmax of the raw logits.
    """
    from transformers import GenerationConfig

    model = load_hf_model(str(model_dir))
    eos = model.config.eos_token_id if stop_at_eos else None
    # generate() fills settings its config leaves unset (eos_token_id=None) from the model's
    # own generation config, which would stop at EOS anyway.
    model.generation_config.eos_token_id = eos
    gen_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_tokens,
        eos_token_id=eos,
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    results = []
    for prompt in prompt_token_ids_list:
        prompt = [int(t) for t in prompt]
        input_ids = torch.tensor([prompt], dtype=torch.long)
        with torch.inference_mode(), _one_thread():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=gen_config,
            )
        generated = out.sequences[0, len(prompt):].tolist()
        res = HFGreedyResult(prompt_token_ids=prompt)
        for pos, (token, logits) in enumerate(zip(generated, out.logits)):
            logits = logits[0].float()
            top2 = torch.topk(logits, 2)
            assert int(top2.indices[0]) == token or top2.values[0] == top2.values[1], (
                f"generate picked {token} at {pos}, not the argmax: a logits processor is active"
            )
            logprobs = torch.log_softmax(logits, dim=-1)
            top = torch.topk(logprobs, NUM_TOP_LOGPROBS)
            res.token_ids.append(token)
            res.top2_gaps.append(float(top2.values[0] - top2.values[1]))
            res.logprobs.append(float(logprobs[token]))
            res.top_logprobs.append(list(zip(top.indices.tolist(), top.values.tolist())))
        results.append(res)
    return results


def _fmt(tokens: Sequence[int], mark: int) -> str:
    return " ".join(f"[{t}]" if i == mark else str(t) for i, t in enumerate(tokens))


def assert_greedy_match(
    ours: Sequence[int], ref: HFGreedyResult, tol: float = 1e-4
) -> Optional[int]:
    """Asserts our greedy tokens equal the reference's.

    At the first differing position i the check passes only if the reference's top-2 logit gap
    at i is below `tol` (a near-tie); nothing after i is compared. Without a divergence the
    lengths must agree. Returns i for a tolerated divergence, else None.
    """
    ours = [int(t) for t in ours]
    for i, (a, b) in enumerate(zip(ours, ref.token_ids)):
        if a == b:
            continue
        gap = ref.top2_gaps[i]
        if gap < tol:
            return i
        raise AssertionError(
            f"greedy mismatch at position {i}: ours {a}, HF {b}, HF top-2 logit gap {gap:.3g} "
            f">= tol {tol:g}\n  ours: {_fmt(ours, i)}\n  HF:   {_fmt(ref.token_ids, i)}\n"
            f"  prompt: {ref.prompt_token_ids}"
        )
    if len(ours) != len(ref.token_ids):
        raise AssertionError(
            f"greedy length mismatch: ours {len(ours)} tokens, HF {len(ref.token_ids)}\n"
            f"  ours: {_fmt(ours, -1)}\n  HF:   {_fmt(ref.token_ids, -1)}"
        )
    return None


def hf_prompt_logprobs(model_dir: Union[str, pathlib.Path], prompt: Sequence[int]) -> torch.Tensor:
    """HF's log-softmax (fp32) at each prompt position but the last: row i is the distribution
    of prompt token i + 1. Shape ``[len(prompt) - 1, vocab]``."""
    model = load_hf_model(str(model_dir))
    input_ids = torch.tensor([[int(t) for t in prompt]], dtype=torch.long)
    with torch.inference_mode(), _one_thread():
        logits = model(input_ids=input_ids).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def assert_prompt_logprobs_match(
    entries: Optional[list], prompt: Sequence[int], ref: torch.Tensor, k: int, tol: float = 1e-4
) -> None:
    """Asserts an engine's ``prompt_logprobs`` (vLLM's format) equal HF's ``ref``
    (``hf_prompt_logprobs``): one entry per prompt token, None first; each holding the prompt
    token with its logprob and rank, and the top ``k`` with ranks 1..k, logprobs within ``tol``.
    A rank or a top-k member may differ only where HF's logprobs tie within ``tol``."""
    assert entries is not None, "no prompt_logprobs"
    assert len(entries) == len(prompt), f"{len(entries)} entries for {len(prompt)} tokens"
    assert entries[0] is None
    for i in range(1, len(prompt)):
        entry, token, dist = entries[i], int(prompt[i]), ref[i - 1]
        where = f"position {i} (token {token})"
        assert token in entry, f"{where}: the prompt token is missing from {entry}"
        for tid, lp in entry.items():
            assert abs(lp.logprob - float(dist[tid])) <= tol, (
                f"{where}: token {tid} logprob {lp.logprob} vs HF {float(dist[tid])}")
        value = float(dist[token])
        low = int((dist > value + tol).sum()) + 1
        high = int((dist > value - tol).sum()) + 1
        assert low <= entry[token].rank <= high, (
            f"{where}: rank {entry[token].rank}, HF {low}..{high}")
        # The prompt token first, then the top k (the prompt token once, if among them).
        assert len(entry) in (k, k + 1), f"{where}: {len(entry)} entries for k={k}"
        top = entry if len(entry) == k else {t: lp for t, lp in entry.items() if t != token}
        assert sorted(lp.rank for lp in top.values()) == list(range(1, k + 1)), (
            f"{where}: top-k ranks {sorted(lp.rank for lp in top.values())}")
        if k:
            kth = float(dist.topk(k).values[-1])
            assert all(float(dist[tid]) >= kth - tol for tid in top), (
                f"{where}: {sorted(top)} are not HF's top {k}")
