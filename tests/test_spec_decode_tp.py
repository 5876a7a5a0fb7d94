"""Speculative decoding with tensor parallelism: with n-gram lookup, a draft model and an EAGLE-3
head (each on rank 0 alone), tensor_parallel_size 2 (mp, gloo on the CPU, fp32) gives the
greedy tokens one rank gives without speculation, drafts accepted, stop tokens and max_tokens
met inside accepted runs; and a worker's batch, corrected by rank 0's tokens, equals rank 0's
row for row after every step, accepted drafts included (checked on the arrays, with a worker's
runner beside rank 0's in one process).

Every test asserts that drafts were proposed and accepted, so that it cannot pass by never
speculating."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from spec_workload import NGRAM, PROMPTS, TARGET, TRAINED, spec_counts

from pagedserve import LLM, SamplingParams
from pagedserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedserve.executor.rank import follow_rank_zero, rank_zero_tokens, take_rank_zero_tokens
from pagedserve.worker.input_batch import InputBatch
from pagedserve.worker.model_runner import ModelRunner

ENGINE = dict(dtype="float32", max_model_len=256)
DRAFT_MODEL = {"method": "draft_model", "model": str(TRAINED / "draft_model"),
               "num_speculative_tokens": 3, "adaptive": False}
# The shipped head has no embedding of its own: on rank 0 it takes a whole copy of the
# target's, whose ranks each hold half.
EAGLE3 = {"method": "eagle3", "model": str(TRAINED / "eagle3_head"),
          "num_speculative_tokens": 3, "adaptive": False}


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def tokens(llm: LLM, prompts: list, params: list[SamplingParams]) -> list:
    return [(c.token_ids, c.finish_reason)
            for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]


@pytest.fixture(scope="module")
def one_rank() -> LLM:
    return LLM(str(TARGET), **ENGINE)


@pytest.mark.parametrize("spec", [
    NGRAM,
    # Adaptive: the controller's start-up timings run the target's forwards on both ranks.
    {**DRAFT_MODEL, "adaptive": True},
    EAGLE3,
], ids=["ngram", "draft_model", "eagle3"])
def test_two_ranks_speculating_give_one_ranks_tokens(one_rank, spec):
    # A stop token and a max_tokens bound met inside the repetitive prompts' accepted runs.
    [looping] = one_rank.generate(PROMPTS[3], greedy(24), use_tqdm=False)
    stop = looping.outputs[0].token_ids[10]
    prompts = PROMPTS + [PROMPTS[3], PROMPTS[1], PROMPTS[0]]
    params = [greedy(32)] * len(PROMPTS) + [
        greedy(32, stop_token_ids=[stop]), greedy(5), greedy(1)]
    expected = tokens(one_rank, prompts, params)
    assert expected[4][1] == "stop" and len(expected[4][0]) <= 11
    llm = LLM(str(TARGET), tensor_parallel_size=2, speculative_config=spec, **ENGINE)
    assert llm.engine.config.executor_backend == "mp"
    assert llm.engine.runner.proposer is not None  # rank 0's
    if spec is EAGLE3:  # the head's embedding: the whole table, as one rank's target holds it
        torch.testing.assert_close(llm.engine.runner.eagle3.head.embed_tokens.weight,
                                   one_rank.engine.runner.model.model.embed_tokens.weight,
                                   rtol=0, atol=0)
    assert tokens(llm, prompts, params) == expected
    drafted, accepted = spec_counts(llm)
    assert drafted > 0 and accepted > 0, "nothing was speculated"
    llm.engine.shutdown()


def assert_same_rows(rank_zero: InputBatch, worker: InputBatch, failed: set[str]) -> None:
    """The two batches hold the same requests in the same rows, each with the same known
    tokens, count and computed positions; but for the rows of requests rank 0 ``failed``,
    which both leave at the next step, unread."""
    assert worker.row_of == rank_zero.row_of
    rows = np.array(sorted(row for req_id, row in rank_zero.row_of.items()
                           if req_id not in failed), dtype=np.int64)
    np.testing.assert_array_equal(worker.num_tokens[rows], rank_zero.num_tokens[rows])
    np.testing.assert_array_equal(worker.num_computed[rows], rank_zero.num_computed[rows])
    for row in rows.tolist():
        n = int(rank_zero.num_tokens[row])
        np.testing.assert_array_equal(worker.token_ids[row, :n], rank_zero.token_ids[row, :n])


def counts_differ(rank_zero: InputBatch, worker: InputBatch) -> bool:
    rows = np.array(sorted(rank_zero.row_of.values()), dtype=np.int64)
    return bool((worker.num_tokens[rows] != rank_zero.num_tokens[rows]).any()
                or (worker.num_computed[rows] != rank_zero.num_computed[rows]).any())


@dataclass
class Steps:
    """What happened at the steps a worker's runner ran beside rank 0's."""

    counts_differed: list[bool] = field(default_factory=list)  # before taking the tokens
    failed_with_drafts: int = 0  # steps where rank 0 alone failed a row, drafts scheduled


def beside_a_worker(llm: LLM, monkeypatch: pytest.MonkeyPatch,
                    before_step: Callable[[SchedulerOutput], None] = lambda sched: None,
                    ) -> Steps:
    """From now on every step of ``llm`` (one rank) also runs on a worker's runner (no
    proposer, nothing sampled or verified) with the same scheduler output, which then takes
    rank 0's tokens as a tensor-parallel worker does; its batch must then equal rank 0's.
    ``before_step`` sees each step's scheduler output first."""
    engine = llm.engine
    rank_zero = engine.runner
    worker = ModelRunner(engine.config, engine.model_config, proposes=False)
    follow_rank_zero(worker)
    assert worker.proposer is None
    worker.initialize_kv_cache(rank_zero.kv_caches[0].shape[1])
    run_rank_zero = engine.executor.execute_model
    steps = Steps()

    def both_ranks(sched: SchedulerOutput) -> ModelRunnerOutput:
        before_step(sched)
        output = run_rank_zero(sched)
        worker.execute_model(sched)
        # Its tokens are placeholders: it computes no logprobs of them, even where asked.
        assert worker._latest is None or worker._latest.logprobs_host is None
        if output.req_ids:
            steps.counts_differed.append(counts_differ(rank_zero.batch, worker.batch))
        if rank_zero.failures and sched.scheduled_spec_decode_tokens:
            steps.failed_with_drafts += 1
        take_rank_zero_tokens(worker, rank_zero_tokens(rank_zero, output))
        assert_same_rows(rank_zero.batch, worker.batch, set(rank_zero.failures))
        return output

    monkeypatch.setattr(engine.executor, "execute_model", both_ranks)
    return steps


@pytest.mark.parametrize("spec, kwargs", [
    (NGRAM, {}),
    # 20 blocks of 16 tokens (a 256-token request needs 16) and a 24-token step budget:
    # preemption and chunked prefill.
    (NGRAM, dict(num_kv_blocks=20, block_size=16, max_num_batched_tokens=24)),
    (DRAFT_MODEL, {}),
    (EAGLE3, {}),
], ids=["ngram", "ngram-preempting", "draft_model", "eagle3"])
def test_a_workers_batch_equals_rank_zeros_after_taking_its_tokens(monkeypatch, spec, kwargs):
    """Before taking rank 0's tokens the worker's batch must differ in counts at some step
    (drafts accepted), or the check proves nothing about the correction."""
    llm = LLM(str(TARGET), speculative_config=spec, **{**ENGINE, **kwargs})
    steps = beside_a_worker(llm, monkeypatch)
    # A seeded sampled request too: the worker's placeholders differ from its tokens; it asks
    # for logprobs, which rank 0 alone computes.
    params = [greedy(24)] * len(PROMPTS) + [
        SamplingParams(temperature=0.8, seed=3, max_tokens=24, logprobs=2)]
    llm.generate(PROMPTS + PROMPTS[:1], params, use_tqdm=False)
    assert any(steps.counts_differed)
    if "num_kv_blocks" in kwargs:
        assert llm.engine.get_stats().num_preemptions_total > 0
    drafted, accepted = spec_counts(llm)
    assert drafted > 0 and accepted > 0, "nothing was speculated"


def test_a_row_that_fails_on_rank_zero_alone(monkeypatch):
    """A row whose verification and sampling fail on rank 0 alone (its logprobs count set past
    the vocabulary in rank 0's batch, at a step that verifies its drafts): rank 0 names the
    rows it sampled, the others' drafts are dropped on both ranks, and the worker's batch
    still equals rank 0's."""
    llm = LLM(str(TARGET), speculative_config=NGRAM, **ENGINE)
    engine = llm.engine
    rank_zero = engine.runner.batch

    def break_rank_zeros_row(sched: SchedulerOutput) -> None:
        if "bad" in (sched.scheduled_spec_decode_tokens or {}) and not steps.failed_with_drafts:
            rank_zero.num_logprobs[rank_zero.row_of["bad"]] = engine.model_config.vocab_size + 5

    steps = beside_a_worker(llm, monkeypatch, break_rank_zeros_row)
    for i, prompt in enumerate(PROMPTS[1:3]):
        engine.add_request(f"good-{i}", prompt, greedy(32))
    engine.add_request("bad", PROMPTS[3], greedy(32, logprobs=1))
    finished, errors = set(), []
    while engine.has_unfinished_requests():
        finished |= {out.request_id for out in engine.step() if out.finished}
        errors += engine.take_request_errors()
    assert finished == {"good-0", "good-1"}
    assert [(e.request_id, e.stage) for e in errors] == [("bad", "sampling")]
    assert steps.failed_with_drafts == 1 and any(steps.counts_differed)
