"""bad_words, logit_bias and allowed_token_ids: vLLM's semantics, on a real tiny model, in
synchronous and asynchronous scheduling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.core.scheduler_output import NewRequestData
from pagedserve.tokenizer import bad_words_token_ids
from pagedserve.worker.input_batch import InputBatch
from pagedserve.worker.sampler import Sampler

PROMPTS = ["Once upon a time", "Hello world", "The quick brown fox"]
KV = 64 << 20


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), max_model_len=128, kv_cache_memory_bytes=KV)


def _tokens(llm: LLM, params: SamplingParams, prompts=PROMPTS) -> list[list[int]]:
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [c.token_ids for o in outs for c in o.outputs]


def _contains(tokens: list[int], seq: list[int]) -> bool:
    return any(tokens[i:i + len(seq)] == seq for i in range(len(tokens) - len(seq) + 1))


def _greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _assert_idle(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    assert stats.num_running == stats.num_waiting == 0


def _two_token_word(llm: LLM, tokens: list[int]) -> tuple[str, list[int]]:
    """A word the greedy output spells with two tokens, which bad_words also finds as those."""
    tok = llm.get_tokenizer()
    for i in range(len(tokens) - 1):
        pair = tokens[i:i + 2]
        word = tok.decode(pair)
        if word.strip() and pair in bad_words_token_ids([word], tok):
            return word, pair
    raise AssertionError("no two-token word in the greedy output")


def test_bad_words_never_appear(llm):
    free = _tokens(llm, _greedy())
    tok = llm.get_tokenizer()
    word, pair = _two_token_word(llm, free[0])
    single = tok.decode([free[1][3]])
    banned = bad_words_token_ids([word, single], tok)
    assert any(len(s) == 1 for s in banned) and pair in banned
    for params in (_greedy(bad_words=[word, single]),
                   SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True,
                                  n=4, bad_words=[word, single])):
        got = _tokens(llm, params)
        for tokens in got:
            for seq in banned:
                assert not _contains(tokens, seq), (seq, tokens)
    # Greedy output is only changed where a ban bit: up to the first banned word it agrees.
    got = _tokens(llm, _greedy(bad_words=[word]), PROMPTS[:1])[0]
    spellings = bad_words_token_ids([word], tok)
    first = next(i for i in range(len(free[0])) if free[0][i:i + 2] in spellings)
    assert got[: first + 1] == free[0][: first + 1] and got[first + 1] != free[0][first + 1]
    _assert_idle(llm)


def test_logit_bias_forces_a_token_and_logprobs_stay_raw(llm):
    plain = llm.generate(PROMPTS[0], _greedy(4, logprobs=5), use_tqdm=False)[0].outputs[0]
    ranked = sorted(plain.logprobs[0].items(), key=lambda kv: kv[1].rank)
    target, raw = ranked[4]  # the fifth most likely first token
    assert raw.rank == 5
    for params in (_greedy(8, logit_bias={target: 100}, logprobs=0),
                   SamplingParams.from_dict({"temperature": "1.0", "seed": "1", "max_tokens": "8",
                                             "ignore_eos": "true", "logprobs": "0",
                                             "logit_bias": f'{{"{target}": 250}}'},
                                            coerce_strings=True)):
        assert params.logit_bias == {target: 100.0}  # string key, clamped to +100
        out = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == [target] * 8
        # The sampled token's logprob is the model's, not the biased one (which is ~0).
        assert out.logprobs[0][target].logprob == pytest.approx(raw.logprob, abs=1e-4)
    # A negative bias removes the greedy choice; other rows of the batch are untouched.
    first = plain.token_ids[0]
    outs = llm.generate(PROMPTS[:2], [_greedy(4, logit_bias={first: -100}), _greedy(4)],
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids[0] == ranked[1][0]
    assert outs[1].outputs[0].token_ids == _tokens(llm, _greedy(4), PROMPTS[1:2])[0]
    _assert_idle(llm)


def test_allowed_token_ids_hold(llm):
    allowed = [7, 100, 333, 512]
    for params in (_greedy(allowed_token_ids=allowed),
                   SamplingParams(temperature=1.5, top_p=0.9, seed=7, n=3, max_tokens=24,
                                  ignore_eos=True, allowed_token_ids=allowed)):
        got = _tokens(llm, params)
        assert all(set(tokens) <= set(allowed) for tokens in got)
        assert len({t for tokens in got for t in tokens}) > 1
    _assert_idle(llm)


def test_out_of_vocabulary_ids_are_rejected(llm):
    vocab = llm.engine.model_config.vocab_size
    for field, value in (("logit_bias", {vocab: 1.0}), ("allowed_token_ids", [1, vocab]),
                         ("stop_token_ids", [vocab + 5])):
        with pytest.raises(ValueError, match=field):
            llm.generate("Hello", SamplingParams(**{field: value}), use_tqdm=False)
    _assert_idle(llm)


@pytest.mark.parametrize("values, name", [
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"1": "a"}}, "logit_bias"),
    ({"logit_bias": {"1": float("nan")}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
    ({"allowed_token_ids": [1.5]}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words"),
    ({"bad_words": [3]}, "bad_words"),
])
def test_bad_values_name_the_field(values, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**values)


def test_async_scheduling_gives_the_same_tokens(tiny_model_dir):
    """Bad words of several tokens read the previous token, which async scheduling has not
    collected yet when it prepares the next step."""
    model = str(tiny_model_dir("llama"))
    sync = LLM(model, max_model_len=128, async_scheduling=False, kv_cache_memory_bytes=KV)
    free = _tokens(sync, _greedy())
    word, pair = _two_token_word(sync, free[0])
    workload = [
        _greedy(bad_words=[word]),
        _greedy(logit_bias={free[1][2]: 8.0, free[1][0]: -5.0}),
        SamplingParams(temperature=0.9, seed=5, max_tokens=24, ignore_eos=True,
                       allowed_token_ids=list(range(200, 400)), bad_words=[word]),
    ]
    expected = [_tokens(sync, p) for p in workload]
    assert all(not _contains(t, pair) for t in expected[0])
    del sync
    lazy = LLM(model, max_model_len=128, async_scheduling=True, kv_cache_memory_bytes=KV)
    assert [_tokens(lazy, p) for p in workload] == expected
    _assert_idle(lazy)


def test_bad_word_prefix_counts_only_generated_tokens():
    """A word's last token is banned only right after the word's other tokens were generated;
    the prompt does not count (vLLM compares against the output tokens)."""
    batch = InputBatch(2, 16, 2, 8)
    params = SamplingParams(temperature=0.0)
    params.bad_words_token_ids = [[3, 4, 5], [6]]
    req = NewRequestData("a", [3, 4], 2, params, [0], 2, frozenset(), None)
    row = batch.add(req, torch.device("cpu"))
    rows = np.array([row])
    logits = torch.zeros(1, 8)
    logits[0, 5], logits[0, 6] = 2.0, 3.0

    def sample() -> int:
        return Sampler()(logits, batch.sampling_metadata(rows, torch.device("cpu"))).sampled.item()

    assert sample() == 5  # 3, 4 are the prompt: 5 is free; 6 is always banned
    for token in (3, 4):  # now generate 3, 4
        batch.token_ids[row, batch.num_tokens[row]] = token
        batch.num_tokens[row] += 1
    assert sample() == 0  # 5 now completes the word
    assert batch.needs_output_tokens
    batch.remove("a")
    assert not batch.needs_output_tokens and not batch.bad_words
