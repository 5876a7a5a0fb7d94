"""Speculative decoding with an EAGLE-3 head (speculative_config method "eagle3"): the head's
drafts equal a plain-torch reference that recomputes everything from the row's tokens (the
target's aux states from HF, the head over the whole sequence), so its catch-up and KV
bookkeeping are right; greedy output token-identical to decoding without it (fp32, CPU) under
chunked prefill, preemption, prefix caching, n>1 and length edges; the head writes only blocks
its rows own; no KV block leaks under random traffic with aborts; heads that cannot serve fail
at start, naming speculative_config 'model'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import load_hf_model
from spec_workload import (
    KV,
    SCENARIOS,
    TRAINED,
    assert_idle,
    blocks_written,
    run,
    trained_target_run,
)
from test_eagle3_head import _reference_weights, reference_head
from traffic import play, random_traffic

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineArgs
from pagedserve.devtools.eagle3_head import build_eagle3_head
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.models.eagle3 import Eagle3LlamaForCausalLM
from pagedserve.spec_decode.eagle3_proposer import Eagle3Proposer

AUX_LAYERS = [0, 1, 1]  # the tiny target has two layers


@pytest.fixture(scope="module")
def target(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def heads(target, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eagle3_heads")
    return {
        # The published default: the target's shapes and embedding, half its vocabulary.
        "shared": build_eagle3_head(root / "shared", target, draft_vocab_size=512,
                                    aux_layer_ids=AUX_LAYERS, seed=5),
        # Narrower, its own embedding, GQA, the whole vocabulary (no d2t offsets).
        "narrow": build_eagle3_head(root / "narrow", target, hidden_size=32,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    intermediate_size=80, with_embedding=True,
                                    aux_layer_ids=AUX_LAYERS, seed=6),
    }


def spec(head: Path, k: int = 3, **extra) -> dict:
    return {"method": "eagle3", "model": str(head), "num_speculative_tokens": k,
            "adaptive": False, **extra}


_reference: dict[str, list] = {}


@pytest.mark.parametrize("head", ["shared", "narrow"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_output_equals_no_speculation(target, heads, scenario, head):
    kwargs, extra = SCENARIOS[scenario]
    if scenario not in _reference:
        _reference[scenario], _ = run(target, **kwargs)
    got, llm = run(target, spec(heads[head], k=3, **extra), **kwargs)
    assert got == _reference[scenario]
    assert_idle(llm)
    stats = llm.engine.get_stats()
    assert stats.spec_decoding.num_draft_tokens > 0
    if scenario == "preempting":
        assert stats.num_preemptions_total > 0
    if scenario == "prefix-caching":
        assert stats.prefix_cache_hits_total > 0


class _Recorder:
    """Every propose call's rows: (their known tokens, the drafts proposed, the first
    position the head attended to)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[list[int], list[int], int]] = []
        propose = Eagle3Proposer.propose
        recorder = self

        def recording(self, batch, rows, k):
            drafts, counts = propose(self, batch, rows, k)
            for row, d, n in zip(np.asarray(rows).tolist(), drafts.tolist(), counts.tolist()):
                known = batch.token_ids[row, : batch.num_tokens[row]].tolist()
                recorder.calls.append((known, d[:n], int(self.kv_start[row])))
            return drafts, counts

        monkeypatch.setattr(Eagle3Proposer, "propose", recording)


def _reference_drafts(target: Path, head: Path, tokens: list[int], k: int,
                      start: int = 0) -> list[int]:
    """The head's k greedy drafts after ``tokens``, recomputed from scratch in float64: the
    target's aux states at every position from HF, the head over (token[p + 1], fc(aux[p])) for
    every p from ``start`` (its context after a long dormant spell), then k - 1 steps feeding
    each draft with the head's pre-norm output."""
    hf = load_hf_model(str(target))
    cfg = json.loads((head / "config.json").read_text())
    w = _reference_weights(head, target)
    with torch.no_grad():
        states = hf(torch.tensor([tokens]), output_hidden_states=True).hidden_states
    layers = cfg["eagle_aux_hidden_state_layer_ids"]
    aux = torch.cat([states[i][0] for i in layers], -1).double()[start:-1]
    ids = torch.tensor(tokens[start + 1:])
    hidden = aux @ w["fc.weight"].T
    to_target = torch.arange(len(w["d2t"])) + w["d2t"].long()
    drafts: list[int] = []
    for _ in range(k):
        positions = torch.arange(start, start + len(ids))
        pre, _, logits = reference_head(w, cfg, ids, positions, hidden)
        drafts.append(int(to_target[logits[-1].argmax()]))
        ids = torch.cat([ids, torch.tensor(drafts[-1:])])
        hidden = torch.cat([hidden, pre[-1:]])
    return drafts


@pytest.mark.parametrize("head", ["shared", "narrow"])
@pytest.mark.parametrize("scenario", ["plain", "chunked", "preempting", "intermittent"])
def test_drafts_equal_a_reference_recomputed_from_the_tokens(target, heads, head, scenario,
                                                             monkeypatch):
    """Whatever the step (a prefill in chunks, a verification that accepted some drafts, a
    request resumed after preemption, the first drafting step after steps without drafts),
    the drafts are those of the head run over the row's whole history at once (from the
    window it restarted from after a long dormant spell): the catch-up fed every position
    with the right token and features, and the head's KV holds nothing stale where it
    attends."""
    kwargs, extra = SCENARIOS[scenario]
    kwargs = dict(kwargs, enable_prefix_caching=False)
    recorder = _Recorder(monkeypatch)
    _, llm = run(target, spec(heads[head], k=3, **extra), **kwargs)
    calls = [c for c in recorder.calls if c[1]]
    if scenario == "intermittent":  # long dormant spells: windows, as well as whole contexts
        assert {c[2] == 0 for c in calls} == {True, False}
    else:  # the head drafted from every step's features: whole contexts
        assert all(c[2] == 0 for c in calls)
    # A spread of calls (the reference is slow): every 7th, and the last ones; intermittent
    # drafting has fewer, all of them checked.
    if scenario == "intermittent":
        assert len(calls) > 15
        sample = calls
    else:
        assert len(calls) > 50
        sample = calls[::7] + calls[-5:]
    mismatched = [(tokens, drafts) for tokens, drafts, start in sample
                  if _reference_drafts(target, heads[head], tokens, len(drafts), start) != drafts]
    # fp32 against fp64 may flip a near-tie now and then; a bookkeeping error flips most.
    assert len(mismatched) <= len(sample) // 20, mismatched[:2]


def test_a_dormant_head_writes_nothing_and_resumes_from_a_window(target, heads, monkeypatch):
    """While the engine drafts nothing (here: while more than one request runs) the head only
    keeps the target's features: no KV written, no forward. Once one request is left it drafts
    again: after a pause longer than its ring holds, from a window that starts at a block
    boundary; the output stays that of plain decoding, and drafts are made."""
    written = {False: 0, True: 0}
    steps = {False: 0, True: 0}
    drafting_now = [False]
    catch_up, write_kv = Eagle3Proposer.catch_up, Eagle3LlamaForCausalLM.write_kv

    def counting_catch_up(self, batch, step, drafting):
        drafting_now[0] = drafting
        steps[drafting] += 1
        return catch_up(self, batch, step, drafting)

    def counting_write_kv(self, input_ids, *args):
        written[drafting_now[0]] += len(input_ids)
        return write_kv(self, input_ids, *args)

    monkeypatch.setattr(Eagle3Proposer, "catch_up", counting_catch_up)
    monkeypatch.setattr(Eagle3LlamaForCausalLM, "write_kv", counting_write_kv)
    recorder = _Recorder(monkeypatch)
    prompts = ["Once upon a time", "The same long shared prefix"]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (60, 90)]
    kwargs = dict(max_model_len=128, block_size=8, kv_cache_memory_bytes=KV)

    def tokens(llm: LLM) -> list:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    expected = tokens(LLM(str(target), **kwargs))
    llm = LLM(str(target), **kwargs,
              speculative_config=spec(heads["shared"], disable_by_batch_size=1))
    assert tokens(llm) == expected
    assert steps[False] >= 50 and written[False] == 0  # dormant: ~60 steps, nothing written
    assert steps[True] > 0 and written[True] > 0
    starts = {start for _, drafts, start in recorder.calls if drafts}
    assert starts and all(s > 0 and s % 8 == 0 for s in starts)  # a window, block-aligned
    assert llm.engine.get_stats().spec_decoding.num_draft_tokens > 0


def test_seeded_random_sampling_is_identical(target, heads):
    """A seeded request draws the same tokens with and without drafts (its draws are keyed
    by its seed and the position)."""
    prompts = ["Once upon a time", "The same long shared prefix", "Short"]
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=30,
                             ignore_eos=True) for s in (1, 2, 3)]

    def tokens(llm: LLM) -> list:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    kwargs = dict(max_model_len=128, block_size=8, kv_cache_memory_bytes=KV)
    expected = tokens(LLM(str(target), **kwargs))
    llm = LLM(str(target), **kwargs, speculative_config=spec(heads["narrow"]))
    assert tokens(llm) == expected
    assert llm.engine.get_stats().spec_decoding.num_draft_tokens > 0


def test_adaptive_speculation_keeps_the_output(target, heads):
    kwargs = SCENARIOS["plain"][0]
    expected, _ = run(target, **kwargs)
    got, llm = run(target, {**spec(heads["shared"], k=4), "adaptive": True}, **kwargs)
    assert got == expected
    assert llm.engine.get_stats().spec_decoding.num_draft_tokens > 0


def test_head_writes_only_blocks_its_rows_own(target, heads):
    """Every target block the head wrote was one the target wrote too; past them, only the
    rows' scratch blocks."""
    _, llm = run(target, spec(heads["shared"], k=4), **SCENARIOS["preempting"][0])
    runner = llm.engine.runner
    proposer = runner.eagle3
    num_blocks = proposer.scratch.first

    by_head, by_target = blocks_written(proposer.kv_caches), blocks_written(runner.kv_caches)
    assert by_head and {b for b in by_head if b < num_blocks} <= by_target
    assert max(by_head) < num_blocks + llm.engine.config.max_num_seqs * proposer.scratch.per_row


@pytest.mark.parametrize("seed", [3, 11])
def test_random_traffic_with_aborts_leaks_nothing(target, heads, seed):
    plan = random_traffic(seed, 30, last_arrival=50, last_abort=60, num_aborts=6)

    def run_plan(speculative_config) -> tuple[dict[str, tuple], LLMEngine]:
        eng = LLMEngine(EngineArgs(str(target), max_model_len=128, block_size=8,
                                   num_kv_blocks=30, max_num_batched_tokens=24, max_num_seqs=8,
                                   speculative_config=speculative_config))
        return play(eng, plan, min_steps=60)[0], eng

    expected, _ = run_plan(None)
    got, eng = run_plan(spec(heads["shared"]))
    assert eng.get_stats().spec_decoding.num_draft_tokens > 0
    greedy = {rid for _, rid, _, p in plan.arrivals if p.temperature == 0} - plan.aborted
    assert {r: got[r] for r in greedy} == {r: expected[r] for r in greedy}
    assert set(got) | plan.aborted >= {rid for _, rid, _, _ in plan.arrivals}


def test_kv_budget_covers_both_caches(target, heads):
    budget = 4 << 20
    llm = LLM(str(target), max_model_len=128, block_size=8, kv_cache_memory_bytes=budget,
              speculative_config=spec(heads["narrow"]))
    runner = llm.engine.runner
    head = runner.eagle3.model_config
    per_block = (2 * 8 * runner.model_config.num_kv_heads * runner.model_config.head_dim * 4
                 * runner.model_config.num_layers + 2 * 8 * head.num_kv_heads * head.head_dim * 4)
    assert runner.bytes_per_block() == per_block
    num_blocks = llm.engine.get_stats().num_kv_blocks
    assert num_blocks == budget // per_block
    assert runner.eagle3.kv_caches[0].shape[1] >= num_blocks
    runner._profile_run()  # what sizes the cache on CUDA: the target's and the head's forwards


@pytest.mark.parametrize("kind,message", [
    ("vocab", r"speculative_config 'model' .* vocab_size 1100 differs from the target's"),
    ("not-a-head", r"speculative_config 'model' .* not an EAGLE-3 head"),
    ("aux-layers", r"speculative_config 'model' .* eagle_aux_hidden_state_layer_ids"),
    ("missing", r"speculative_config 'model' .* not a directory"),
])
def test_a_head_that_cannot_serve_fails_at_start(target, tiny_model_dir, tmp_path, kind,
                                                  message):
    if kind == "vocab":
        other = tiny_model_dir("llama", vocab_size=1100)
        head = build_eagle3_head(tmp_path / "head", other, aux_layer_ids=AUX_LAYERS)
    elif kind == "not-a-head":
        head = target
    elif kind == "aux-layers":  # vLLM's default ids (2, 1, -1) do not fit two layers
        head = build_eagle3_head(tmp_path / "head", target)
    else:
        head = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=message):
        LLM(str(target), max_model_len=128, kv_cache_memory_bytes=KV,
            speculative_config=spec(head))


@pytest.mark.parametrize("k,extra,max_tokens", [
    (2, {}, (32, 32)),
    (4, {}, (32, 32)),
    # Drafts only once one request is left: dormant for 56 steps before, then from a window.
    (3, {"disable_by_batch_size": 1}, (56, 100)),
])
def test_trained_head_greedy_output_equals_no_speculation(k, extra, max_tokens):
    """The shipped head on the shipped target: the same tokens, most drafts accepted."""
    expected, got, llm = trained_target_run(spec(TRAINED / "eagle3_head", k, **extra),
                                            max_tokens)
    assert got == expected
    s = llm.engine.get_stats().spec_decoding
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens > 0.3 * s.num_draft_tokens
