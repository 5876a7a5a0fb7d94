"""N-gram (prompt-lookup) proposer: drafts the tokens that followed an earlier occurrence of a
request's latest n-gram in its own history (prompt + output), as vLLM's ``method="ngram"``.

Semantics, per request with history ``h`` of length ``L``:

- the matched n-gram is the longest suffix ``h[L-n:L]`` with ``prompt_lookup_min <= n <=
  prompt_lookup_max`` that also occurs at some earlier start ``p < L-n`` (occurrences may overlap
  the suffix, as in a repeating pattern);
- among the occurrences of that n-gram, the **earliest** one (smallest ``p``) is used, as vLLM's
  KMP scan does; this makes the result a pure function of the history;
- the draft is ``h[p+n : p+n+k]``: up to ``k`` tokens, fewer when the history ends first (at
  least one, since ``p+n <= L-1``); no match gives zero tokens.

The batch is scanned with numpy over all positions at once: one vectorized comparison per
n-gram length (at most ``prompt_lookup_max`` of them; the scan stops at the first length that
recurs in no row), no Python loop over tokens or over requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The longest draft a step may verify; small k is where drafting pays (see issue 11).
MAX_NUM_SPECULATIVE_TOKENS = 16
# Filler for the draft slots past a row's count (vLLM's PLACEHOLDER_TOKEN_ID).
PLACEHOLDER_TOKEN_ID = -1


@dataclass(frozen=True)
class NgramConfig:
    """The n-gram proposer's settings, in vLLM's ``speculative_config`` names; validated here.

    As in vLLM, an omitted ``prompt_lookup_min``/``prompt_lookup_max`` takes the other's value,
    and both default to 5 when both are omitted.
    """

    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None

    def __post_init__(self) -> None:
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            lo = hi = 5
        elif lo is None:
            lo = hi
        elif hi is None:
            hi = lo
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)
        k = self.num_speculative_tokens
        if not _is_int(k) or not 1 <= k <= MAX_NUM_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config 'num_speculative_tokens' must be an integer in "
                             f"[1, {MAX_NUM_SPECULATIVE_TOKENS}], got {k!r}")
        if not _is_int(lo) or lo < 1:
            raise ValueError(f"speculative_config 'prompt_lookup_min' must be an integer >= 1, "
                             f"got {lo!r}")
        if not _is_int(hi) or hi < lo:
            raise ValueError(f"speculative_config 'prompt_lookup_max' must be an integer >= "
                             f"prompt_lookup_min ({lo}), got {hi!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class NgramProposer:
    """Drafts tokens for a batch of requests by prompt lookup; owns only its config (it keeps
    no per-request state: each call reads the histories it is given)."""

    def __init__(self, config: NgramConfig) -> None:
        self.config = config

    def propose(self, histories: np.ndarray, lengths: np.ndarray,
                budgets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        return propose(histories, lengths, c.num_speculative_tokens, c.prompt_lookup_min,
                       c.prompt_lookup_max, budgets)


def propose(histories: np.ndarray, lengths: np.ndarray, k: int, min_n: int, max_n: int,
            budgets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draft up to ``k`` tokens per request (semantics in the module docstring).

    ``histories`` is ``[B, T]`` integer token ids, row ``b`` valid in ``[:lengths[b]]`` (the rest
    is padding and never read as history). ``budgets`` (optional, ``[B]``, >= 0) caps each row's
    count further, for the caller's ``max_model_len`` / ``max_tokens`` limits. Returns
    ``(drafts [B, k] int64, counts [B] int64)``; ``drafts[b, counts[b]:]`` is
    ``PLACEHOLDER_TOKEN_ID``.
    """
    NgramConfig(k, min_n, max_n)  # one place validates k and the n-gram bounds
    h = np.asarray(histories)
    if h.ndim != 2 or not np.issubdtype(h.dtype, np.integer):
        raise ValueError(f"'histories' must be a 2-D integer array, got shape {h.shape} "
                         f"dtype {h.dtype}")
    num_reqs, width = h.shape
    lens = np.asarray(lengths)
    if lens.shape != (num_reqs,) or not np.issubdtype(lens.dtype, np.integer):
        raise ValueError(f"'lengths' must be {num_reqs} integers, got shape {lens.shape} "
                         f"dtype {lens.dtype}")
    if num_reqs and (lens.min() < 0 or lens.max() > width):
        raise ValueError(f"'lengths' must lie in [0, {width}] (the histories' width), got "
                         f"min {lens.min()} max {lens.max()}")
    if budgets is not None:
        budgets = np.asarray(budgets)
        if budgets.shape != (num_reqs,) or not np.issubdtype(budgets.dtype, np.integer) or (
                num_reqs and budgets.min() < 0):
            raise ValueError(f"'budgets' must be {num_reqs} integers >= 0, got shape "
                             f"{budgets.shape} dtype {budgets.dtype}")
    lens = lens.astype(np.int64)
    drafts = np.full((num_reqs, k), PLACEHOLDER_TOKEN_ID, dtype=np.int64)
    counts = np.zeros(num_reqs, dtype=np.int64)
    if num_reqs == 0 or width < 2:
        return drafts, counts

    rows = np.arange(num_reqs)[:, None]
    # matched[b, e]: an occurrence ending at e (inclusive) leaves a token after it inside the
    # history (e <= L-2) and h[b, e-j] == h[b, L-1-j] for every j < n (grown one j per pass).
    matched = np.arange(width)[None, :] <= (lens - 2)[:, None]
    equal = np.empty_like(matched)
    best_end = np.full(num_reqs, -1, dtype=np.int64)  # end of the chosen occurrence, -1: none
    for n in range(1, max_n + 1):
        if n >= width:  # no row can hold an n-gram plus an earlier occurrence of it
            break
        j = n - 1
        suffix_token = h[rows[:, 0], np.maximum(lens - 1 - j, 0)]
        np.equal(h[:, :width - j], suffix_token[:, None], out=equal[:, j:])
        matched[:, j:] &= equal[:, j:]
        if j:
            # e = j-1 has no token at e-j: from now on nothing ends there (earlier e already out).
            matched[:, j - 1] = False
        # Rows with L < n+1 (no room for the suffix and an earlier occurrence) are all False
        # here already: their e <= L-2 < n-1 were cleared; the clamped suffix index is harmless.
        found = matched.any(axis=1)
        if not found.any():
            break  # no n-gram this long recurs in any row, so no longer one does
        if n >= min_n:
            # Longer n-grams win: later passes overwrite; argmax gives the earliest occurrence.
            best_end = np.where(found, matched.argmax(axis=1), best_end)

    hit = best_end >= 0
    start = best_end + 1  # first drafted position
    limit = np.minimum(lens - start, k)
    if budgets is not None:
        limit = np.minimum(limit, budgets)
    counts = np.where(hit, limit, 0).astype(np.int64)  # limit >= 0: start <= L-1 on a hit
    offsets = np.arange(k)[None, :]
    take = offsets < counts[:, None]
    idx = np.minimum(start[:, None] + offsets, width - 1)
    drafts = np.where(take, h[rows, idx], PLACEHOLDER_TOKEN_ID).astype(np.int64)
    return drafts, counts
