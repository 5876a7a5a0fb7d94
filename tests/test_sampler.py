"""Sampler: each filtering step against its definition, distributions by counting draws."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest
import torch

from pagedserve.core.scheduler_output import NewRequestData
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.input_batch import InputBatch
from pagedserve.worker.sampler import Sampler, SamplingMetadata, apply_top_k_top_p

V = 6
LOGITS = torch.log(torch.tensor([0.05, 0.30, 0.10, 0.40, 0.05, 0.10]))


def metadata(n: int, temperature: float = 1.0, **overrides) -> SamplingMetadata:
    fields = dict(
        temperature=torch.full((n,), temperature), all_greedy=temperature == 0,
        all_random=temperature > 0, top_k=None, top_p=None, min_p=None, generators={},
        output_counts=None, seen_mask=None, repetition_penalty=None, presence_penalty=None,
        frequency_penalty=None, banned_rows=None, banned_tokens=None, max_num_logprobs=-1,
    )
    fields.update(overrides)
    return SamplingMetadata(**fields)


def empirical(logits: torch.Tensor, meta: SamplingMetadata) -> np.ndarray:
    sampled = Sampler()(logits, meta).sampled
    return np.bincount(sampled.numpy(), minlength=logits.shape[-1]) / len(sampled)


def expected(probs: list[float], keep: list[int]) -> np.ndarray:
    out = np.zeros(len(probs))
    out[keep] = np.array(probs)[keep]
    return out / out.sum()


N = 40000
TOL = 0.012  # ~5 sigma for p=0.5 at N draws


def test_greedy_is_argmax():
    logits = torch.randn(7, 50)
    out = Sampler()(logits, metadata(7, temperature=0.0))
    assert torch.equal(out.sampled, logits.argmax(-1))


def test_plain_sampling_matches_softmax():
    torch.manual_seed(0)
    got = empirical(LOGITS.repeat(N, 1), metadata(N))
    np.testing.assert_allclose(got, LOGITS.softmax(-1).numpy(), atol=TOL)


def test_temperature_sharpens():
    torch.manual_seed(1)
    got = empirical(LOGITS.repeat(N, 1), metadata(N, temperature=0.5))
    np.testing.assert_allclose(got, (LOGITS / 0.5).softmax(-1).numpy(), atol=TOL)


def test_top_k_distribution():
    torch.manual_seed(2)
    meta = metadata(N, top_k=torch.full((N,), 2, dtype=torch.long))
    got = empirical(LOGITS.repeat(N, 1), meta)
    probs = LOGITS.softmax(-1).tolist()
    np.testing.assert_allclose(got, expected(probs, [1, 3]), atol=TOL)


def test_top_p_distribution():
    torch.manual_seed(3)
    # Sorted: 0.40, 0.30, 0.10, 0.10, ...: 0.40 + 0.30 already covers 0.65, so {3, 1} remain.
    meta = metadata(N, top_p=torch.full((N,), 0.65))
    got = empirical(LOGITS.repeat(N, 1), meta)
    probs = LOGITS.softmax(-1).tolist()
    np.testing.assert_allclose(got, expected(probs, [1, 3]), atol=TOL)


def test_min_p_distribution():
    torch.manual_seed(4)
    # min_p 0.3: keep tokens with p >= 0.3 * 0.40 = 0.12 -> {1, 3}
    meta = metadata(N, min_p=torch.full((N,), 0.3))
    got = empirical(LOGITS.repeat(N, 1), meta)
    probs = LOGITS.softmax(-1).tolist()
    np.testing.assert_allclose(got, expected(probs, [1, 3]), atol=TOL)


def test_top_k_top_p_per_row_and_disabled_rows():
    logits = torch.stack([LOGITS, LOGITS, LOGITS])
    masked = apply_top_k_top_p(
        logits, torch.tensor([1, V, V]), torch.tensor([1.0, 0.5, 1.0])
    )
    assert torch.isfinite(masked[0]).tolist() == [False, False, False, True, False, False]
    assert torch.isfinite(masked[1]).tolist() == [False, True, False, True, False, False]
    assert torch.isfinite(masked[2]).all()


def test_top_p_always_keeps_the_top_token():
    masked = apply_top_k_top_p(LOGITS[None], None, torch.tensor([1e-6]))
    assert torch.isfinite(masked[0]).tolist() == [False, False, False, True, False, False]


def test_penalties():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    counts = torch.tensor([[2, 0, 1, 0]], dtype=torch.int32)
    seen = torch.tensor([[True, True, True, False]])
    meta = metadata(
        1, temperature=0.0, output_counts=counts, seen_mask=seen,
        repetition_penalty=torch.tensor([2.0]), presence_penalty=torch.tensor([0.5]),
        frequency_penalty=torch.tensor([0.25]), max_num_logprobs=-1,
    )
    sampler = Sampler()
    penalized = sampler._apply_penalties(logits, meta)
    # Repetition: positive logits divided, negative multiplied, on seen tokens only;
    # then frequency * count and presence * (count > 0) subtracted.
    want = torch.tensor([[2.0 / 2 - 0.25 * 2 - 0.5, -1.0 * 2, 0.5 / 2 - 0.25 - 0.5, 1.0]])
    torch.testing.assert_close(penalized, want)
    assert sampler(logits, meta).sampled.item() == 3


def test_min_tokens_bans_eos():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    meta = metadata(1, temperature=0.0, banned_rows=torch.tensor([0]),
                    banned_tokens=torch.tensor([1]))
    assert Sampler()(logits, meta).sampled.item() == 2


def test_logprobs_are_raw_with_rank():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    meta = metadata(1, temperature=0.0, max_num_logprobs=2,
                    banned_rows=torch.tensor([0]), banned_tokens=torch.tensor([1]))
    out = Sampler()(logits, meta)
    lp = logits.log_softmax(-1)[0]
    assert out.sampled.item() == 2
    assert out.logprob_token_ids.tolist() == [[2, 1, 2]]
    torch.testing.assert_close(out.logprobs[0], torch.stack([lp[2], lp[1], lp[2]]))
    assert out.sampled_rank.tolist() == [2]


def _batch_row(batch: InputBatch, rid: str, seed: Optional[int], temperature=1.0) -> int:
    req = NewRequestData(rid, [1, 2, 3], 3, SamplingParams(temperature=temperature, seed=seed),
                         [0], 3, frozenset(), seed)
    return batch.add(req, torch.device("cpu"))


def test_seeded_rows_ignore_the_rest_of_the_batch():
    def draw(companions: int, position: int) -> list[int]:
        batch = InputBatch(8, 16, 2, V)
        rows = [_batch_row(batch, f"o{i}", None) for i in range(companions)]
        rows.insert(position, _batch_row(batch, "seeded", 1234))
        order = np.array(rows)
        tokens = []
        for _ in range(20):
            meta = batch.sampling_metadata(order, torch.device("cpu"))
            out = Sampler()(LOGITS.repeat(len(order), 1), meta)
            tokens.append(out.sampled[position].item())
            batch.reserve_sampled(order)  # the next draw is for the next position
        return tokens

    torch.manual_seed(0)
    alone = draw(0, 0)
    torch.manual_seed(99)
    crowded = draw(5, 3)
    assert alone == crowded
    assert len(set(alone)) > 1  # it really samples


def test_a_seeded_draw_depends_only_on_the_seed_and_the_position():
    """So a request draws the same after a preemption (its row rebuilt), whatever was drawn
    before, e.g. drafts verified or a failed sampling call retried."""
    def draw(batch: InputBatch, row: int) -> int:
        meta = batch.sampling_metadata(np.array([row]), torch.device("cpu"))
        return Sampler()(LOGITS[None], meta).sampled.item()

    batch = InputBatch(8, 16, 2, V)
    row = _batch_row(batch, "seeded", 77)
    first = [draw(batch, row)]
    for _ in range(5):
        batch.reserve_sampled(np.array([row]))
        first.append(draw(batch, row))
    # A new row for the same request at its fourth position, after unrelated draws.
    other = InputBatch(8, 16, 2, V)
    row = _batch_row(other, "seeded", 77)
    torch.empty(100).exponential_(generator=other.generators[row])
    other.reserve_sampled(np.array([row]))
    other.reserve_sampled(np.array([row]))
    other.reserve_sampled(np.array([row]))
    assert draw(other, row) == first[3]
    assert len(set(first)) > 1


def test_sampling_metadata_skips_unused_steps():
    batch = InputBatch(4, 16, 2, V)
    rows = np.array([_batch_row(batch, "a", None), _batch_row(batch, "b", None, 0.0)])
    meta = batch.sampling_metadata(rows, torch.device("cpu"))
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.output_counts is None and meta.banned_rows is None
    assert not meta.all_greedy and not meta.all_random
    assert meta.max_num_logprobs == -1
    assert math.isclose(meta.temperature[1].item(), 0.0)
    greedy_only = batch.sampling_metadata(rows[1:], torch.device("cpu"))
    assert greedy_only.all_greedy and greedy_only.temperature is None


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_through_the_batch(k: int):
    batch = InputBatch(2, 16, 2, V)
    req = NewRequestData("a", [1], 1, SamplingParams(top_k=k), [0], 1, frozenset(), None)
    row = batch.add(req, torch.device("cpu"))
    meta = batch.sampling_metadata(np.array([row]), torch.device("cpu"))
    assert meta.top_k.tolist() == [k]
