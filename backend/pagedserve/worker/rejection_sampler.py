"""Verifies speculative draft tokens against the target's logits, losslessly.

Greedy rows accept drafts while they equal the target's argmax. Random rows whose drafts are
point masses (n-gram lookup, a greedy draft model: no ``draft_probs``) sample the target at every
position exactly as plain decoding would, with the same noise, and accept drafts while they
equal those samples. Accepting x then happens with probability p(x) and a rejection emits a draw
from p without x, which is Leviathan et al.'s rule for q = a point mass on x; and because the
noise is plain decoding's (a seeded row's is keyed by its seed and the position), a seeded
request emits exactly the tokens it would without speculation.

With the draft's distribution q (``draft_probs``), random rows follow Leviathan et al. (2023):
draft token x is accepted with probability min(1, p(x) / q(x)); the first rejection emits a token
drawn from normalize(max(0, p - q)); when every draft is accepted, a bonus token is drawn from p
at the position after the last draft. p is the target distribution after exactly the Sampler's
processing (its ``process_logits`` and ``random_probs``). Either way the emitted tokens are
distributed as plain sampling from p would be.

Everything is batch tensor ops over ``[B, 1 + k, V]``; no loop over tokens or positions. The
only per-row Python work is for rows with a seeded generator, which draw their own noise (as in
the Sampler) so that their tokens do not depend on the rest of the batch or its padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .sampler import _EPS, Sampler, SamplingMetadata, argmax, seed_generator

PLACEHOLDER_TOKEN_ID = -1  # pads the output rows after each request's emitted tokens


@dataclass
class RejectionSamplerOutput:
    """One step's verified tokens per request: the accepted drafts then one recovered or bonus
    token, padded with PLACEHOLDER_TOKEN_ID."""

    token_ids: torch.Tensor  # [B, 1 + k_max] int64
    num_accepted: torch.Tensor  # [B] int64: accepted drafts; num_accepted + 1 tokens emitted


def acceptance_threshold(target_prob: torch.Tensor, draft_prob: torch.Tensor) -> torch.Tensor:
    """The probability of accepting a draft token: min(1, p(x) / q(x)). A token the draft
    could not have proposed (q(x) = 0) is accepted when the target allows it."""
    ratio = target_prob / draft_prob
    return torch.where(draft_prob > 0, ratio.clamp(max=1.0), (target_prob > 0).to(ratio.dtype))


def pad_flat_logits(logits: torch.Tensor, num_draft: torch.Tensor) -> torch.Tensor:
    """``[sum(1 + k_i), V]`` (each request's 1 + k_i positions in order) -> ``[B, 1 + k_max, V]``;
    padded positions repeat the request's last row and are never read."""
    width = int(num_draft.max()) + 1 if num_draft.numel() else 1
    starts = torch.cumsum(num_draft + 1, 0) - (num_draft + 1)
    offsets = torch.arange(width, device=logits.device)[None, :]
    index = starts[:, None] + torch.minimum(offsets, num_draft[:, None])
    return logits[index]


class RejectionSampler:
    """Owns verification of one step's drafts: which are accepted and the token after them.

    Inputs per request i of B: ``draft_token_ids[i, :num_draft[i]]`` (padded ``[B, k_max]``),
    the target's logits at its 1 + num_draft[i] positions (padded ``[B, 1 + k_max, V]`` or flat
    ``[sum(1 + k_i), V]``), optionally the draft's probabilities ``[B, k_max, V]`` at each draft
    position, and the Sampler's metadata for the B requests (one row each).

    Penalties see, at position j, the output counts as if drafts 0..j-1 had been emitted (they
    have, whenever position j is read). Bans (min_tokens, bad words), allowed ids and logit bias
    apply at every position as they do at the first; a min_tokens bound that is crossed inside
    a run is therefore enforced for the whole step (conservative). Logprobs are not computed.
    """

    def __call__(
        self,
        draft_token_ids: torch.Tensor,
        num_draft: torch.Tensor,
        target_logits: torch.Tensor,
        meta: SamplingMetadata,
        draft_probs: Optional[torch.Tensor] = None,
    ) -> RejectionSamplerOutput:
        if target_logits.dim() == 2:
            target_logits = pad_flat_logits(target_logits, num_draft)
        batch, width, vocab = target_logits.shape
        k_max = width - 1
        draft_token_ids = draft_token_ids[:, :k_max]
        positions = torch.arange(width, device=target_logits.device)
        is_draft = positions[None, :k_max] < num_draft[:, None]  # [B, k]
        drafts = torch.where(is_draft, draft_token_ids, 0)

        flat_meta = _per_position_metadata(meta, drafts, is_draft, width)
        logits = Sampler.process_logits(target_logits.reshape(batch * width, vocab), flat_meta)
        target_argmax = argmax(logits).view(batch, width)

        if meta.all_greedy:
            matches = (drafts == target_argmax[:, :k_max]) & is_draft
            num_accepted = _leading_true(matches)
            chosen = target_argmax.gather(1, num_accepted[:, None])[:, 0]
        else:
            probs = Sampler.random_probs(logits, flat_meta).view(batch, width, vocab)
            if draft_probs is None:
                sampled = argmax(
                    probs.div_(_position_noise(meta, probs)).view(batch * width, vocab)
                ).view(batch, width)
                num_accepted = _leading_true(draft_matches(drafts, sampled[:, :k_max]) & is_draft)
                chosen = sampled.gather(1, num_accepted[:, None])[:, 0]
            else:
                uniforms, noise = _draw_noise(meta, num_draft, batch, k_max, probs)
                num_accepted, chosen = _verify_random(
                    probs, drafts, is_draft, num_draft, draft_probs, uniforms, noise
                )
            if not meta.all_random:
                greedy = meta.temperature < _EPS
                matches = (drafts == target_argmax[:, :k_max]) & is_draft
                greedy_accepted = _leading_true(matches)
                greedy_chosen = target_argmax.gather(1, greedy_accepted[:, None])[:, 0]
                num_accepted = torch.where(greedy, greedy_accepted, num_accepted)
                chosen = torch.where(greedy, greedy_chosen, chosen)

        token_ids = torch.full(
            (batch, width), PLACEHOLDER_TOKEN_ID, dtype=torch.int64, device=drafts.device
        )
        accepted = positions[None, :k_max] < num_accepted[:, None]
        token_ids[:, :k_max] = torch.where(accepted, drafts, token_ids[:, :k_max])
        token_ids.scatter_(1, num_accepted[:, None], chosen[:, None])
        return RejectionSamplerOutput(token_ids=token_ids, num_accepted=num_accepted)


def draft_matches(drafts: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """Which point-mass drafts equal the token the target sampled at their position."""
    return drafts == sampled


def _position_noise(meta: SamplingMetadata, probs: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise ``[B, width, V]``: plain decoding's at each position. A seeded row draws
    position j's from its generator seeded for its (j+1)-th next token, as the Sampler would
    when it got there."""
    noise = torch.empty_like(probs).exponential_()
    for row, generator in meta.generators.items():
        seeds = meta.generator_seeds.get(row)  # None: draw on from the generator's state
        for j in range(probs.shape[1]):
            if seeds is not None:
                seed_generator(generator, seeds[0], seeds[1] + j)
            noise[row, j].exponential_(generator=generator)
    return noise


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading entries are True."""
    return mask.to(torch.int64).cumprod(dim=1).sum(dim=1)


def _verify_random(
    probs: torch.Tensor,
    drafts: torch.Tensor,
    is_draft: torch.Tensor,
    num_draft: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    uniforms: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leviathan acceptance over all positions at once, then one draw per row from the
    recovered distribution at the first rejection, or from p at the bonus position."""
    batch, width, _ = probs.shape
    k_max = width - 1
    target_at_draft = probs[:, :k_max].gather(2, drafts[..., None])[..., 0]
    if draft_probs is None:
        draft_at_draft = torch.ones_like(target_at_draft)  # a point mass on the draft token
    else:
        draft_probs = draft_probs[:, :k_max].to(probs.dtype)
        draft_at_draft = draft_probs.gather(2, drafts[..., None])[..., 0]
    accept = (uniforms < acceptance_threshold(target_at_draft, draft_at_draft)) & is_draft
    num_accepted = _leading_true(accept)

    # Only the distribution at each row's stop position is needed: the residual there if a
    # draft was rejected, the target itself at the bonus position.
    rows = torch.arange(batch, device=probs.device)
    dist = probs[rows, num_accepted]
    if k_max:
        rejected = num_accepted < num_draft
        stop = num_accepted.clamp(max=k_max - 1)
        if draft_probs is None:
            residual = dist.scatter(1, drafts[rows, stop][:, None], 0.0)
        else:
            residual = (dist - draft_probs[rows, stop]).clamp(min=0.0)
        # A residual of all zeros (p == q up to rounding) is only reachable by rounding; p is
        # then the right distribution to fall back on.
        empty = residual.sum(dim=-1, keepdim=True) <= 0
        residual = torch.where(empty, dist, residual)
        dist = torch.where(rejected[:, None], residual, dist)
    # argmax(dist / Exp(1)) is an exact draw from normalize(dist), as in the Sampler.
    return num_accepted, argmax(dist / noise)


def _draw_noise(
    meta: SamplingMetadata, num_draft: torch.Tensor, batch: int, k_max: int, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniforms [B, k] for acceptance and Exp(1) noise [B, V] for the final draw. A seeded row
    draws exactly num_draft[i] uniforms and then V exponentials from its own generator, so its
    stream does not depend on the batch's padding or neighbours."""
    uniforms = torch.rand((batch, k_max), device=probs.device, dtype=probs.dtype)
    noise = torch.empty((batch, probs.shape[-1]), device=probs.device, dtype=probs.dtype)
    noise.exponential_()
    for row, generator in meta.generators.items():
        count = int(num_draft[row])
        if count:
            uniforms[row, :count] = torch.rand(
                count, generator=generator, device=probs.device, dtype=probs.dtype
            )
        noise[row].exponential_(generator=generator)
    return uniforms, noise


def _per_position_metadata(
    meta: SamplingMetadata, drafts: torch.Tensor, is_draft: torch.Tensor, width: int
) -> SamplingMetadata:
    """Expands each request's row to its ``width`` positions (row i -> rows i*width + j)."""

    def per_position(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.repeat_interleave(width, dim=0)

    def position_rows(rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if rows is None:
            return None
        offsets = torch.arange(width, device=rows.device)
        return (rows[:, None] * width + offsets[None, :]).reshape(-1)

    output_counts, seen_mask = meta.output_counts, meta.seen_mask
    if output_counts is not None or seen_mask is not None:
        vocab = (output_counts if output_counts is not None else seen_mask).shape[-1]
        one_hot = torch.nn.functional.one_hot(drafts, vocab) * is_draft[..., None]
        before = torch.zeros(
            (drafts.shape[0], width, vocab), dtype=torch.int32, device=drafts.device
        )
        before[:, 1:] = one_hot.cumsum(dim=1).to(torch.int32)  # drafts 0..j-1 at position j
        if output_counts is not None:
            output_counts = (output_counts[:, None] + before).reshape(-1, vocab)
        if seen_mask is not None:
            seen_mask = (seen_mask[:, None] | (before > 0)).reshape(-1, vocab)

    return replace(
        meta,
        temperature=per_position(meta.temperature),
        top_k=per_position(meta.top_k),
        top_p=per_position(meta.top_p),
        min_p=per_position(meta.min_p),
        generators={},
        generator_seeds={},
        output_counts=output_counts,
        seen_mask=seen_mask,
        repetition_penalty=per_position(meta.repetition_penalty),
        presence_penalty=per_position(meta.presence_penalty),
        frequency_penalty=per_position(meta.frequency_penalty),
        banned_rows=position_rows(meta.banned_rows),
        banned_tokens=per_position(meta.banned_tokens),
        max_num_logprobs=-1,
        allowed_rows=position_rows(meta.allowed_rows),
        disallowed=per_position(meta.disallowed),
        bias_rows=position_rows(meta.bias_rows),
        bias_tokens=per_position(meta.bias_tokens),
        bias_values=per_position(meta.bias_values),
    )
