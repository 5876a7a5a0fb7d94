"""Random request traffic for engine tests: a plan of arrivals and aborts, played step by step
against a real engine, which must end with every KV block free."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pagedserve import SamplingParams
from pagedserve.engine.llm_engine import LLMEngine


@dataclass
class TrafficPlan:
    """Requests (the step each arrives at, id, prompt ids, params) and aborts by step."""

    arrivals: list[tuple[int, str, list[int], SamplingParams]]
    aborts: dict[int, str]

    @property
    def aborted(self) -> set[str]:
        return set(self.aborts.values())


def random_traffic(seed: int, num_requests: int, last_arrival: int, last_abort: int,
                   num_aborts: int) -> TrafficPlan:
    """Every third request sampled with a seed, the others greedy (some with min_tokens, some
    stopping at EOS); prompts of 1-60 random ids below 1000."""
    rng = random.Random(seed)
    arrivals = []
    for i in range(num_requests):
        max_tokens = rng.randint(1, 30)
        if i % 3 == 0:
            params = SamplingParams(temperature=0.9, top_p=0.9, seed=i, ignore_eos=True,
                                    max_tokens=max_tokens)
        else:
            params = SamplingParams(temperature=0.0, ignore_eos=i % 5 != 0,
                                    max_tokens=max_tokens,
                                    min_tokens=min(max_tokens, rng.choice([0, 0, 3])))
        prompt = [rng.randrange(5, 1000) for _ in range(rng.randint(1, 60))]
        arrivals.append((rng.randint(0, last_arrival), f"r{i}", prompt, params))
    aborts = {rng.randint(1, last_abort): f"r{i}"
              for i in rng.sample(range(num_requests), num_aborts)}
    return TrafficPlan(arrivals, aborts)


def play(engine: LLMEngine, plan: TrafficPlan, min_steps: int) -> tuple[dict[str, tuple], int]:
    """Runs the plan to the end; returns each finished request's (token ids, finish reason)
    and how many aborts hit a live request. Asserts that preemption happened and that every
    KV block is free at the end."""
    finished: dict[str, tuple] = {}
    step = num_live_aborted = 0
    while step <= min_steps or engine.has_unfinished_requests():
        for at, rid, prompt, params in plan.arrivals:
            if at == step:
                engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        if step in plan.aborts:
            num_live_aborted += len(engine.abort_request([plan.aborts[step]]))
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                finished[out.request_id] = (tuple(c.token_ids), c.finish_reason)
        step += 1
        assert step < 2000
    stats = engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    assert stats.num_preemptions_total > 0
    return finished, num_live_aborted


def run_beside_a_failing_row(engine: LLMEngine, requests: list[tuple[str, SamplingParams]],
                             with_bad: bool) -> tuple[list, list]:
    """Runs ``requests`` (prompt, params) to the end on ``engine``, with one more request whose
    sampling fails (``with_bad``: a logprobs count above the vocabulary, set after validation,
    which makes the batched sampling call fail); returns each request's completions' tokens
    and the request errors taken meanwhile."""
    ids = [f"good-{i}" for i in range(len(requests))]
    for rid, (prompt, params) in zip(ids, requests):
        engine.add_request(rid, prompt, params)
    if with_bad:
        bad = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
        engine.add_request("bad", "a bad row", bad)
        bad.logprobs = engine.model_config.vocab_size + 5
    done, errors = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [c.token_ids for c in out.outputs]
        errors += engine.take_request_errors()
    return [done[rid] for rid in ids], errors
