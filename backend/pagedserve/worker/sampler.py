"""Turns one step's logits into tokens, for a batch of requests with their own parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from pagedserve.core.scheduler_output import LogprobsLists

_EPS = 1e-5
# A seeded draw's generator seed: seed * stride + position (mod 2**64, what torch takes).
_SEED_STRIDE = 0x9E3779B97F4A7C15
_SEED_MODULUS = 2**64


def seed_generator(generator: torch.Generator, seed: int, position: int) -> None:
    """Seeds a seeded request's generator for the token at ``position``: a draw depends on
    nothing but the request's seed and the position, so a request draws the same after a
    preemption, in any batch, and with or without speculation."""
    generator.manual_seed((seed * _SEED_STRIDE + position) % _SEED_MODULUS)


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters of the rows that sample this step, as tensors.

    A field is None when no row needs that step, so the common cases skip it entirely.
    """

    temperature: Optional[torch.Tensor]  # [n] fp32, rows below _EPS greedy; None if all are
    all_greedy: bool
    all_random: bool
    top_k: Optional[torch.Tensor]  # [n] int64; vocab size where disabled
    top_p: Optional[torch.Tensor]  # [n] fp32
    min_p: Optional[torch.Tensor]  # [n] fp32
    generators: dict[int, torch.Generator]  # row -> its seeded generator
    # Penalties: token counts of the outputs so far, and which tokens the prompt+output hold.
    output_counts: Optional[torch.Tensor]  # [n, vocab] int32
    seen_mask: Optional[torch.Tensor]  # [n, vocab] bool
    repetition_penalty: Optional[torch.Tensor]  # [n] fp32
    presence_penalty: Optional[torch.Tensor]  # [n] fp32
    frequency_penalty: Optional[torch.Tensor]  # [n] fp32
    # (row, token) pairs to forbid this step: EOS and stop token ids under min_tokens, and
    # the tokens that would complete a bad word.
    banned_rows: Optional[torch.Tensor]
    banned_tokens: Optional[torch.Tensor]
    max_num_logprobs: int  # -1 when no row asks for logprobs
    # allowed_token_ids: the rows that have them, and per such row the tokens NOT allowed.
    allowed_rows: Optional[torch.Tensor] = None  # [k] int64
    disallowed: Optional[torch.Tensor] = None  # [k, vocab] bool
    # logit_bias: (row, token, value) triples to add.
    bias_rows: Optional[torch.Tensor] = None
    bias_tokens: Optional[torch.Tensor] = None
    bias_values: Optional[torch.Tensor] = None  # fp32
    # Seeded rows: row -> (the request's seed, the position of the token sampled next); the
    # generator is seeded for that position (``seed_generator``). Verification seeds it for
    # each later position it samples at.
    generator_seeds: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass
class SamplerOutput:
    """The sampled ids of one step and, when asked, their logprobs and ranks."""

    sampled: torch.Tensor  # [n] int64
    # Sampled token first, then the top-k: ids [n, k+1] and logprobs [n, k+1].
    logprob_token_ids: Optional[torch.Tensor] = None
    logprobs: Optional[torch.Tensor] = None
    sampled_rank: Optional[torch.Tensor] = None  # [n] 1 = the most likely token


class Sampler:
    """Samples one token per row. Steps, in order (the bans come last here, first in vLLM;
    a banned token is -inf either way, so the results are vLLM's):

    1. allowed_token_ids: every other token gets -inf, on the rows that have them;
    2. logit_bias: added to the rows that have one;
    3. penalties: repetition (prompt and output tokens), then frequency and presence (output
       tokens);
    4. bans: EOS and stop token ids get -inf until a row has min_tokens of output, and a bad
       word's last token gets -inf when the tokens before it were just generated;
    5. logprobs, when asked, from the model's raw logits (vLLM's default);
    6. greedy rows take the argmax;
    7. the others: divide by temperature, apply min-p, then top-k and top-p, and draw
       ``argmax(probs / Exp(1))`` (an exact draw from ``probs``); rows with a seed draw their
       noise from their own generator, so their tokens do not depend on the rest of the batch.
    """

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        raw = logits
        logits = self.process_logits(logits, meta)
        out = SamplerOutput(sampled=torch.empty(0))
        if meta.all_greedy:
            out.sampled = argmax(logits)
        else:
            sampled = self._sample_random(logits, meta)
            if not meta.all_random:
                greedy = meta.temperature < _EPS
                sampled = torch.where(greedy, argmax(logits), sampled)
            out.sampled = sampled
        if meta.max_num_logprobs >= 0:
            out.logprob_token_ids, out.logprobs, out.sampled_rank = gather_logprobs(
                raw, out.sampled, meta.max_num_logprobs
            )
        return out

    @classmethod
    def process_logits(cls, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Steps 1-4 (allowed ids, bias, penalties, bans); ``logits`` is never modified."""
        raw = logits
        logits = cls._restrict_and_bias(logits, meta)
        logits = cls._apply_penalties(logits, meta)
        if meta.banned_rows is not None:
            logits = logits.clone() if logits is raw else logits
            logits[meta.banned_rows, meta.banned_tokens] = float("-inf")
        return logits

    @staticmethod
    def _restrict_and_bias(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        if meta.allowed_rows is None and meta.bias_rows is None:
            return logits
        logits = logits.clone()
        if meta.allowed_rows is not None:
            rows = meta.allowed_rows
            logits[rows] = logits[rows].masked_fill(meta.disallowed, float("-inf"))
        if meta.bias_rows is not None:
            logits.index_put_(
                (meta.bias_rows, meta.bias_tokens), meta.bias_values, accumulate=True
            )
        return logits

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        if meta.repetition_penalty is None and meta.output_counts is None:
            return logits
        logits = logits.clone()
        if meta.repetition_penalty is not None:
            penalty = meta.repetition_penalty[:, None].expand_as(logits)
            scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(meta.seen_mask, scaled, logits)
        if meta.output_counts is not None:
            counts = meta.output_counts.to(logits.dtype)
            logits -= meta.frequency_penalty[:, None] * counts
            logits -= meta.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
        return logits

    @staticmethod
    def random_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Step 7 up to the draw: the distribution a random row samples from, after temperature
        (greedy rows divide by 1), min-p, top-k and top-p."""
        temperature = torch.where(meta.temperature < _EPS, 1.0, meta.temperature)
        logits = logits / temperature[:, None]
        if meta.min_p is not None:
            probs = logits.softmax(dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * meta.min_p[:, None]
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        return logits.softmax(dim=-1)

    @classmethod
    def _sample_random(cls, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        probs = cls.random_probs(logits, meta)
        noise = torch.empty_like(probs).exponential_()
        for row, generator in meta.generators.items():
            noise[row].exponential_(generator=generator)
        return argmax(probs.div_(noise))


def gather_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of raw ``logits``: the logprob of ``token_ids[row]`` and its rank (1 = most
    likely; tokens tied with it do not count), then the ``num_logprobs`` most likely tokens.
    Returns ids and logprobs ``[n, num_logprobs + 1]`` (the given token first) and ranks
    ``[n]``. Log-softmax runs in fp32 whatever the logits' dtype (as vLLM's)."""
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
    chosen = logprobs.gather(1, token_ids[:, None])
    rank = (logprobs > chosen).sum(dim=-1) + 1
    if num_logprobs == 0:
        return token_ids[:, None], chosen, rank
    top_lp, top_ids = logprobs.topk(num_logprobs, dim=-1)
    return torch.cat([token_ids[:, None], top_ids], 1), torch.cat([chosen, top_lp], 1), rank


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (first index on ties, like torch). On the CPU numpy's is ~7x faster than
    torch's for a [256, 8192] batch, which matters once per step."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
        return torch.from_numpy(np.argmax(x.contiguous().numpy(), axis=-1))
    return x.argmax(dim=-1)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor]
) -> torch.Tensor:
    """Masks (-inf) everything outside each row's top-k, then outside its top-p nucleus.

    ``top_k`` holds the vocabulary size for rows without top-k; ``top_p`` holds 1.0 for rows
    without top-p. The token with the highest probability always survives.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k.clamp(1, vocab))[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        outside = cumulative <= (1.0 - top_p)[:, None]
        outside[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def logprobs_lists(wanted: np.ndarray, token_ids: torch.Tensor, logprobs: torch.Tensor,
                   ranks: torch.Tensor) -> LogprobsLists:
    """A step's logprobs as the engine returns them: per sampled row, the sampled token and
    its ``wanted`` top alternatives (none where ``wanted`` is negative), from a
    SamplerOutput's [n, k+1] tensors."""
    ids, lps = token_ids.tolist(), logprobs.tolist()
    out_ids: list[list[int]] = []
    out_lps: list[list[float]] = []
    for i, k in enumerate(wanted.tolist()):
        out_ids.append(ids[i][: k + 1] if k >= 0 else [])
        out_lps.append(lps[i][: k + 1] if k >= 0 else [])
    return LogprobsLists(out_ids, out_lps, ranks.tolist())
