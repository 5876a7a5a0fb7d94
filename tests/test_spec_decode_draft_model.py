"""Speculative decoding with a draft model (speculative_config method "draft_model"): greedy
output token-identical to decoding without it (fp32, CPU) under chunked prefill, preemption,
prefix caching, n>1 and length edges, with drafts proposed and accepted; the draft's KV cache
is written only in blocks its rows own; no KV block leaks under random traffic with aborts; a
draft that cannot serve fails at start, naming speculative_config 'model'."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from spec_workload import (
    KV,
    SCENARIOS,
    TRAINED,
    assert_idle,
    blocks_written,
    run,
    trained_target_run,
)
from traffic import play, random_traffic

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineArgs
from pagedserve.engine.llm_engine import LLMEngine


def lookalike_draft(target: Path, out: Path, noise: float, seed: int = 0) -> Path:
    """A draft with other dimensions that computes nearly the target's function: one more
    layer whose attention and MLP write nothing (o_proj and down_proj zero: the residual
    passes through), a wider MLP whose extra units feed zero columns of down_proj, and
    ``noise`` (relative) added to every q/k projection, so that it agrees with the target
    often but not always. Same tokenizer and vocabulary."""
    out.mkdir(parents=True, exist_ok=True)
    for f in target.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    config = json.loads((target / "config.json").read_text())
    weights = load_file(target / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    layers, extra = config["num_hidden_layers"], 32
    for name in [n for n in weights if n.startswith("model.layers.0.")]:
        weights[name.replace("layers.0.", f"layers.{layers}.")] = weights[name].clone()
    weights[f"model.layers.{layers}.self_attn.o_proj.weight"].zero_()
    weights[f"model.layers.{layers}.mlp.down_proj.weight"].zero_()
    for i in range(layers + 1):
        prefix = f"model.layers.{i}.mlp."
        for name in ("gate_proj.weight", "up_proj.weight"):
            w = weights[prefix + name]
            weights[prefix + name] = torch.cat(
                [w, torch.randn(extra, w.shape[1], generator=gen) * w.std()])
        down = weights[prefix + "down_proj.weight"]
        weights[prefix + "down_proj.weight"] = torch.cat(
            [down, torch.zeros(down.shape[0], extra)], dim=1)
    for name, w in weights.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            weights[name] = w + noise * w.std() * torch.randn(w.shape, generator=gen)
    config.update(num_hidden_layers=layers + 1,
                  intermediate_size=config["intermediate_size"] + extra)
    (out / "config.json").write_text(json.dumps(config))
    save_file({n: w.contiguous() for n, w in weights.items()}, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def target(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def drafts(target, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drafts")
    return {
        # The target itself: every draft must be accepted, whatever the KV bookkeeping meets.
        "self": target,
        # Other dims, agrees about half the time: acceptances and rejections.
        "lookalike": lookalike_draft(target, root / "lookalike", noise=0.06),
        # Unrelated weights and dims (hidden 32, 1 layer, 2 heads): nearly all rejected.
        "unrelated": tiny_model_dir("llama", hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1,
                                    intermediate_size=48, seed=7),
    }


def spec(draft: Path, k: int = 3, **extra) -> dict:
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k,
            "adaptive": False, **extra}


_reference: dict[str, list] = {}


@pytest.mark.parametrize("draft", ["self", "lookalike", "unrelated"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_output_equals_no_speculation(target, drafts, scenario, draft):
    kwargs, extra = SCENARIOS[scenario]
    if scenario not in _reference:
        _reference[scenario], base = run(target, **kwargs)
        assert [r[1] for r in _reference[scenario]].count("length") == len(_reference[scenario])
    got, llm = run(target, spec(drafts[draft], k=4 if draft == "self" else 3, **extra),
                   **kwargs)
    assert got == _reference[scenario]
    assert_idle(llm)
    stats = llm.engine.get_stats()
    s = stats.spec_decoding
    assert s.num_draft_tokens > 0
    if draft == "self":
        assert s.num_accepted_tokens == s.num_draft_tokens
    elif draft == "lookalike":
        assert 0 < s.num_accepted_tokens < s.num_draft_tokens
    if scenario == "preempting":
        assert stats.num_preemptions_total > 0
    if scenario == "prefix-caching":
        assert stats.prefix_cache_hits_total > 0


def test_adaptive_speculation_keeps_the_output(target, drafts):
    """The controller chooses k per step (from timings: not deterministic); the output may
    not depend on it."""
    kwargs = SCENARIOS["plain"][0]
    expected, _ = run(target, **kwargs)
    got, llm = run(target, {**spec(drafts["lookalike"], k=4), "adaptive": True}, **kwargs)
    assert got == expected
    assert llm.engine.get_stats().spec_decoding.num_draft_tokens > 0


@pytest.mark.parametrize("k", [2, 4])
def test_trained_pair_greedy_output_equals_no_speculation(k):
    expected, got, llm = trained_target_run(spec(TRAINED / "draft_model", k))
    assert got == expected
    s = llm.engine.get_stats().spec_decoding
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens > 0


def test_draft_writes_only_blocks_its_rows_own(target, drafts):
    """Every target block the draft wrote was one the target wrote too (the cache starts at
    zero, and the scheduler allocates a block only for tokens the target computes); past
    them, only the rows' scratch blocks."""
    _, llm = run(target, spec(drafts["lookalike"], k=4), **SCENARIOS["preempting"][0])
    runner = llm.engine.runner
    draft = runner.draft_model
    num_blocks = draft.scratch.first

    by_draft, by_target = blocks_written(draft.kv_caches), blocks_written(runner.kv_caches)
    assert by_draft and {b for b in by_draft if b < num_blocks} <= by_target
    assert max(by_draft) < num_blocks + llm.engine.config.max_num_seqs * draft.scratch.per_row


@pytest.mark.parametrize("draft", ["self", "lookalike"])
def test_draft_recomputes_only_what_it_must(target, drafts, draft, monkeypatch):
    """After a request's first catch-up (its prompt), a draft forward feeds a row at most
    k + 2 tokens: the accepted drafts it already fed stay valid, so it feeds the token after
    them, and only when it wrote past the row's blocks (scratch) the k - 1 drafts and the
    last known token there again. Most forwards feed one."""
    from pagedserve.spec_decode.draft_model import DraftModelProposer

    query_lens: list[int] = []
    greedy = DraftModelProposer._greedy

    def recording(self, ids, positions, meta, last=None):
        query_lens.append(meta.max_query_len)
        return greedy(self, ids, positions, meta, last)

    monkeypatch.setattr(DraftModelProposer, "_greedy", recording)
    llm = LLM(str(target), max_model_len=128, block_size=8, kv_cache_memory_bytes=KV,
              speculative_config=spec(drafts[draft], k=4))
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    llm.generate("Once upon a time", params, use_tqdm=False)
    s = llm.engine.get_stats().spec_decoding
    assert s.num_accepted_tokens > 0
    assert len(query_lens) > 20 and query_lens[0] > 4
    assert max(query_lens[1:]) <= 4 + 2
    assert query_lens.count(1) > len(query_lens) / 2


@pytest.mark.parametrize("seed", [3, 11])
def test_random_traffic_with_aborts_leaks_nothing(target, drafts, seed):
    """Requests arriving, aborted, preempted under KV pressure, greedy and random: greedy
    requests that are not aborted get the tokens they get without speculation, and every KV
    block is free at the end."""
    plan = random_traffic(seed, 30, last_arrival=50, last_abort=60, num_aborts=6)

    def run(speculative_config) -> tuple[dict[str, tuple], LLMEngine]:
        eng = LLMEngine(EngineArgs(str(target), max_model_len=128, block_size=8,
                                   num_kv_blocks=30, max_num_batched_tokens=24, max_num_seqs=8,
                                   speculative_config=speculative_config))
        return play(eng, plan, min_steps=60)[0], eng

    expected, _ = run(None)
    got, eng = run(spec(drafts["lookalike"]))
    s = eng.get_stats().spec_decoding
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens > 0
    greedy = {rid for _, rid, _, p in plan.arrivals if p.temperature == 0} - plan.aborted
    assert {r: got[r] for r in greedy} == {r: expected[r] for r in greedy}
    assert set(got) | plan.aborted >= {rid for _, rid, _, _ in plan.arrivals}


def test_kv_budget_covers_both_caches(target, drafts):
    budget = 4 << 20
    llm = LLM(str(target), max_model_len=128, block_size=8, kv_cache_memory_bytes=budget,
              speculative_config=spec(drafts["unrelated"]))
    runner = llm.engine.runner
    draft = runner.draft_model.model_config
    # K and V, 8 tokens a block, fp32, every layer: the target's and the draft's.
    per_block = sum(2 * 8 * mc.num_kv_heads * mc.head_dim * 4 * mc.num_layers
                    for mc in (runner.model_config, draft))
    assert runner.bytes_per_block() == per_block
    num_blocks = llm.engine.get_stats().num_kv_blocks
    assert num_blocks == budget // per_block
    assert runner.draft_model.kv_caches[0].shape[1] >= num_blocks


@pytest.mark.parametrize("kind,message", [
    ("vocab", r"speculative_config 'model' .* vocab_size 1100, the target model 1024"),
    ("positions", r"speculative_config 'model' .* 64 positions .* max_model_len \(128\)"),
    ("architecture", r"speculative_config 'model' .* 'GPT2LMHeadModel' is not supported"),
    ("missing", r"speculative_config 'model' .* not a directory"),
])
def test_a_draft_that_cannot_serve_fails_at_start(target, tiny_model_dir, tmp_path, kind,
                                                    message):
    if kind == "vocab":
        draft = tiny_model_dir("llama", vocab_size=1100)
    elif kind == "positions":
        draft = tiny_model_dir("llama", max_position_embeddings=64)
    elif kind == "architecture":
        draft = tmp_path / "gpt2"
        shutil.copytree(target, draft)
        config = json.loads((draft / "config.json").read_text())
        config["architectures"] = ["GPT2LMHeadModel"]
        (draft / "config.json").write_text(json.dumps(config))
    else:
        draft = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=message):
        LLM(str(target), max_model_len=128, kv_cache_memory_bytes=KV,
            speculative_config=spec(draft))


def test_decode_steps_advance_as_rebuilt_metadata():
    """A drafter's one-token steps, moved on in place, carry the metadata ragged_metadata
    builds for the next position, across a block boundary into another block."""
    from pagedserve.spec_decode.paged_drafting import DecodeSteps, ragged_metadata

    table = np.array([[4, 9, 2], [7, 1, 30]])
    steps = DecodeSteps(np.array([6, 13]), table, block_size=8, device=torch.device("cpu"))
    for position in ([7, 14], [8, 15], [9, 16]):
        steps.advance()
        positions = np.array(position)
        ones = np.ones(2, dtype=np.int64)
        expected, _ = ragged_metadata(positions, table, ones, positions + 1, 8,
                                      torch.device("cpu"))
        got = steps.meta
        assert steps.positions_t.tolist() == position
        for field in ("slot_mapping", "seq_lens", "seq_lens_cpu", "query_start_loc",
                      "block_table"):
            assert torch.equal(getattr(got, field), getattr(expected, field)), field
        assert (got.max_seq_len, got.max_query_len) == (expected.max_seq_len, 1)


def test_reused_step_metadata_gives_the_drafts_of_rebuilt_metadata(target, drafts,
                                                                 monkeypatch):
    """Every proposal equals the one made with each step's metadata built afresh."""
    from pagedserve.spec_decode import paged_drafting
    from pagedserve.spec_decode.draft_model import DraftModelProposer

    def proposals() -> list:
        made: list = []
        propose = DraftModelProposer.propose

        def recording(self, batch, rows, k):
            drafts_, counts = propose(self, batch, rows, k)
            made.append((drafts_.tolist(), counts.tolist()))
            return drafts_, counts

        with monkeypatch.context() as m:
            m.setattr(DraftModelProposer, "propose", recording)
            run(target, spec(drafts["lookalike"], k=4), **SCENARIOS["plain"][0])
        return made

    reused = proposals()

    def rebuild(self):  # what advance() replaces: the next position's metadata from scratch
        self.positions += 1
        self.meta, _ = paged_drafting.ragged_metadata(
            self.positions, self.table, np.ones(len(self.positions), dtype=np.int64),
            self.positions + 1, self.block_size, torch.device("cpu"))
        self.positions_t = torch.from_numpy(self.positions.copy())

    monkeypatch.setattr(paged_drafting.DecodeSteps, "advance", rebuild)
    rebuilt = proposals()
    assert len(reused) > 20 and reused == rebuilt
    assert any(max(counts) == 4 for _, counts in reused)


def test_draft_runs_dense_linears_with_the_packed_weights():
    """The draft's linear layers run as dense matmuls of exactly the weights oneDNN held."""
    from pagedserve.layers.linear import onednn_pack, onednn_unpack

    weight = torch.randn(40, 24)
    packed = onednn_pack(weight)
    if packed is None:
        pytest.skip("oneDNN packing does not apply here")
    assert torch.equal(onednn_unpack(packed, 24, torch.float32), weight)
