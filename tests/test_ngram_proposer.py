"""The n-gram (prompt-lookup) proposer against a plain-Python reference, its edge cases and its
config validation."""

from __future__ import annotations

import numpy as np
import pytest

from pagedserve.spec_decode.ngram_proposer import (
    PLACEHOLDER_TOKEN_ID,
    NgramConfig,
    NgramProposer,
    propose,
)


def reference_propose(history: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Obviously correct and slow: try each n from the longest down, each start from the
    earliest, compare lists."""
    length = len(history)
    for n in range(max_n, min_n - 1, -1):
        if n >= length:
            continue
        suffix = history[length - n:]
        for start in range(0, length - n):
            if history[start:start + n] == suffix:
                return history[start + n:start + n + k]
    return []


def run_one(history: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    h = np.array([history or [0]], dtype=np.int64)
    drafts, counts = propose(h, np.array([len(history)]), k, min_n, max_n)
    return drafts[0, :counts[0]].tolist()


def padded(histories: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(1, max(len(x) for x in histories))
    h = np.full((len(histories), width), pad, dtype=np.int64)
    for i, x in enumerate(histories):
        h[i, :len(x)] = x
    return h, np.array([len(x) for x in histories])


@pytest.mark.parametrize("seed", range(60))
def test_matches_the_reference_on_random_batches(seed):
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(2, 6))  # small vocabularies: many matches of every length
    min_n = int(rng.integers(1, 4))
    max_n = min_n + int(rng.integers(0, 4))
    k = int(rng.integers(1, 7))
    histories = [rng.integers(0, vocab, size=int(rng.integers(0, 60))).tolist()
                 for _ in range(int(rng.integers(1, 9)))]
    # Padding equal to a real token would expose a read past a row's length.
    h, lens = padded(histories, pad=0)
    drafts, counts = propose(h, lens, k, min_n, max_n)
    assert drafts.shape == (len(histories), k) and counts.shape == (len(histories),)
    for i, x in enumerate(histories):
        want = reference_propose(x, k, min_n, max_n)
        assert drafts[i, :counts[i]].tolist() == want, (i, x)
        assert (drafts[i, counts[i]:] == PLACEHOLDER_TOKEN_ID).all()


@pytest.mark.parametrize("seed", range(10))
def test_matches_the_reference_on_long_binary_histories(seed):
    # Vocabulary 2 over a few hundred tokens: long n-grams recur, so max_n up to 12 is exercised.
    rng = np.random.default_rng(1000 + seed)
    histories = [rng.integers(0, 2, size=int(rng.integers(200, 400))).tolist() for _ in range(4)]
    min_n, max_n, k = int(rng.integers(1, 6)), 12, 8
    drafts, counts = propose(*padded(histories, 1), k, min_n, max_n)
    for i, x in enumerate(histories):
        assert drafts[i, :counts[i]].tolist() == reference_propose(x, k, min_n, max_n), i


def test_random_comparison_is_not_vacuous():
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, 3, size=40).tolist() for _ in range(16)]
    _, counts = propose(*padded(histories, 0), 4, 2, 4)
    assert (counts > 0).sum() >= 8 and (counts == 4).sum() >= 4


def test_no_match_gives_no_draft():
    assert run_one([1, 2, 3, 4, 5], 3, 1, 3) == []
    assert run_one([1, 2, 3, 4, 5, 3], 3, 2, 3) == []  # only a 1-gram repeats, min is 2


def test_match_at_the_very_start():
    assert run_one([7, 8, 9, 1, 2, 7, 8], 2, 2, 2) == [9, 1]


def test_the_longest_ngram_wins_over_an_earlier_shorter_one():
    # "3" alone first recurs at 1 (-> 9), but "2 3" recurs at 4 (-> 5).
    assert run_one([0, 3, 9, 0, 2, 3, 5, 6, 2, 3], 2, 1, 2) == [5, 6]


def test_the_earliest_occurrence_is_used():
    assert run_one([1, 2, 5, 1, 2, 6, 1, 2], 1, 2, 2) == [5]


def test_an_overlapping_occurrence_counts():
    # A run: "4 4 4" recurs at 0, overlapping the suffix; the draft is what follows it.
    assert run_one([4, 4, 4, 4], 3, 3, 3) == [4]
    assert run_one([4, 4, 4, 4, 4, 4], 3, 2, 2) == [4, 4, 4]


def test_history_shorter_than_n():
    assert run_one([], 3, 1, 3) == []
    assert run_one([5], 3, 1, 3) == []
    assert run_one([5, 5], 3, 2, 3) == []  # the 2-gram has no earlier occurrence
    assert run_one([5, 5], 3, 1, 3) == [5]


def test_k_is_clipped_by_the_end_of_the_history():
    assert run_one([1, 2, 3, 1, 2], 5, 2, 2) == [3, 1, 2]


def test_budgets_cap_each_row():
    h, lens = padded([[1, 2, 3, 4, 1, 2], [1, 2, 3, 4, 1, 2], [1, 2, 3]], 0)
    drafts, counts = propose(h, lens, 3, 2, 2, budgets=np.array([3, 1, 0]))
    assert counts.tolist() == [3, 1, 0]
    assert drafts.tolist() == [[3, 4, 1], [3, -1, -1], [-1, -1, -1]]


def test_a_batch_with_mixed_lengths_and_padding_that_looks_like_tokens():
    histories = [[1, 2, 3, 1, 2], [], [9], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]]
    for pad in (1, 2, 3, 9):
        drafts, counts = propose(*padded(histories, pad), 4, 1, 3)
        assert counts.tolist() == [3, 0, 0, 4]
        assert drafts[0, :3].tolist() == [3, 1, 2]
        assert drafts[3].tolist() == [4, 5, 6, 7]


def test_empty_batch():
    drafts, counts = propose(np.zeros((0, 8), dtype=np.int32), np.zeros(0, dtype=np.int64),
                             2, 1, 2)
    assert drafts.shape == (0, 2) and counts.shape == (0,)


def test_the_proposer_uses_its_config():
    proposer = NgramProposer(NgramConfig(num_speculative_tokens=2, prompt_lookup_min=2))
    assert proposer.config.prompt_lookup_max == 2
    drafts, counts = proposer.propose(*padded([[1, 2, 3, 4, 1, 2]], 0))
    assert drafts.tolist() == [[3, 4]] and counts.tolist() == [2]


def test_config_defaults_follow_vllm():
    assert (NgramConfig(3).prompt_lookup_min, NgramConfig(3).prompt_lookup_max) == (5, 5)
    c = NgramConfig(3, prompt_lookup_max=4)
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (4, 4)


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(num_speculative_tokens=17), "num_speculative_tokens"),
    (dict(num_speculative_tokens=2.0), "num_speculative_tokens"),
    (dict(num_speculative_tokens=True), "num_speculative_tokens"),
    (dict(num_speculative_tokens=2, prompt_lookup_min=0), "prompt_lookup_min"),
    (dict(num_speculative_tokens=2, prompt_lookup_min=3, prompt_lookup_max=2),
     "prompt_lookup_max"),
    (dict(num_speculative_tokens=2, prompt_lookup_min=1, prompt_lookup_max="4"),
     "prompt_lookup_max"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NgramConfig(**kwargs)


def test_bad_arrays_name_the_argument():
    h = np.zeros((2, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="histories"):
        propose(h.astype(np.float32), np.array([1, 1]), 2, 1, 2)
    with pytest.raises(ValueError, match="lengths"):
        propose(h, np.array([1]), 2, 1, 2)
    with pytest.raises(ValueError, match=r"lengths.*\[0, 4\]"):
        propose(h, np.array([1, 5]), 2, 1, 2)
    with pytest.raises(ValueError, match="budgets"):
        propose(h, np.array([1, 1]), 2, 1, 2, budgets=np.array([1, -1]))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        propose(h, np.array([1, 1]), 0, 1, 2)
