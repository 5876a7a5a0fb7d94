"""The vLLM-compatible offline API: shapes, stop conditions, logprobs, seeds, bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from pagedserve import LLM, CompletionOutput, RequestOutput, SamplingParams


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(model):
    return LLM(str(model), block_size=8, max_model_len=256)


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def assert_no_leaks(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    assert stats.num_running == stats.num_waiting == 0


def test_output_shapes_and_order(llm):
    prompts = ["Hello world", "The quick brown fox", {"prompt_token_ids": [5, 6, 7]}]
    outputs = llm.generate(prompts, greedy(8, ignore_eos=True), use_tqdm=False)
    assert [type(o) for o in outputs] == [RequestOutput] * 3
    assert outputs[0].prompt == "Hello world"
    assert outputs[2].prompt is None and outputs[2].prompt_token_ids == [5, 6, 7]
    tok = llm.get_tokenizer()
    assert outputs[1].prompt_token_ids == tok("The quick brown fox").input_ids
    for out in outputs:
        assert out.finished
        (completion,) = out.outputs
        assert isinstance(completion, CompletionOutput)
        assert completion.index == 0
        assert len(completion.token_ids) == 8
        assert completion.finish_reason == "length"
        assert completion.logprobs is None and completion.cumulative_logprob is None
        assert completion.text == tok.decode(completion.token_ids, skip_special_tokens=True)
    single = llm.generate("Hello world", greedy(8, ignore_eos=True), use_tqdm=False)
    assert single[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids
    assert_no_leaks(llm)


def test_one_params_per_prompt(llm):
    outs = llm.generate(["a b", "c d"], [greedy(3, ignore_eos=True), greedy(5, ignore_eos=True)],
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["a"], [greedy(), greedy()], use_tqdm=False)


def _text_of(llm: LLM, prompt: str, n: int = 24) -> CompletionOutput:
    return llm.generate(prompt, greedy(n, ignore_eos=True), use_tqdm=False)[0].outputs[0]


def test_stop_strings(llm):
    full = _text_of(llm, "Once upon a time")
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    cut = text.index(stop)
    out = llm.generate("Once upon a time", greedy(24, ignore_eos=True, stop=[stop, "\x00zz"]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate("Once upon a time", greedy(24, ignore_eos=True, stop=stop,
                                                  include_stop_str_in_output=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[: cut + len(stop)]
    assert_no_leaks(llm)


def test_stop_token_ids_and_eos(llm):
    full = _text_of(llm, "Once upon a time")
    target = full.token_ids[5]
    first = full.token_ids.index(target)
    out = llm.generate("Once upon a time", greedy(24, ignore_eos=True, stop_token_ids=[target]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target
    tok = llm.get_tokenizer()
    assert out.text == tok.decode(full.token_ids[:first], skip_special_tokens=True)
    # EOS: make the target token the engine's EOS for this request via stop_token_ids, then
    # min_tokens must hold it back.
    held = llm.generate("Once upon a time",
                        greedy(24, ignore_eos=True, stop_token_ids=[target], min_tokens=first + 2),
                        use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= first + 2
    assert target not in held.token_ids[: first + 1]


def test_eos_stops_unless_ignored(model):
    # Rewrite the model's EOS to the token greedy decoding produces third.
    probe = LLM(str(model), max_model_len=128)
    tokens = _text_of(probe, "Hello world").token_ids
    eos = tokens[2]
    del probe
    eos_dir = model.parent / f"{model.name}-eos"
    if not eos_dir.exists():
        shutil.copytree(model, eos_dir)
        cfg = json.loads((eos_dir / "config.json").read_text())
        cfg["eos_token_id"] = eos
        (eos_dir / "config.json").write_text(json.dumps(cfg))
        (eos_dir / "generation_config.json").unlink(missing_ok=True)
    llm = LLM(str(eos_dir), max_model_len=128)
    stopped = llm.generate("Hello world", greedy(24), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == tokens[: tokens.index(eos) + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None
    ignored = llm.generate("Hello world", greedy(24, ignore_eos=True), use_tqdm=False)[0]
    assert ignored.outputs[0].token_ids == tokens


def test_logprobs(llm):
    out = llm.generate("Hello", greedy(6, ignore_eos=True, logprobs=3), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 6
    total = 0.0
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry
        assert entry[token].rank == 1  # greedy picks the most likely token
        assert 3 <= len(entry) <= 4
        ranks = sorted(lp.rank for tid, lp in entry.items() if tid != token or lp.rank == 1)
        assert ranks[:3] == [1, 2, 3]
        total += entry[token].logprob
        assert isinstance(entry[token].decoded_token, str)
    assert completion.cumulative_logprob == pytest.approx(total)


def test_seed_reproducible_across_batches(llm):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    alone = llm.generate("Seeded prompt", params, use_tqdm=False)[0].outputs[0].token_ids
    crowd = ["noise one", "noise two is longer", "Seeded prompt", "x"]
    others = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(crowd, [others, others, params, others], use_tqdm=False)
    assert outs[2].outputs[0].token_ids == alone
    unseeded = llm.generate(["Seeded prompt"] * 4, others, use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in unseeded}) > 1


def test_n_completions_with_seed_differ(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    out = llm.generate("Parallel", params, use_tqdm=False)[0]
    assert len(out.outputs) == 3
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate("Parallel", params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert_no_leaks(llm)


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ("", greedy(), "prompt must not be empty"),
        ({"prompt_token_ids": []}, greedy(), "prompt must not be empty"),
        ({"prompt_token_ids": [1, 10**6]}, greedy(), "prompt_token_ids"),
        ({"prompt_token_ids": [-1]}, greedy(), "prompt_token_ids"),
        ({"prompt_token_ids": [5] * 300}, greedy(), "too long"),
        ({"prompt": "a", "prompt_token_ids": [1]}, greedy(), "exactly one"),
        (42, greedy(), "prompt must be"),
    ],
)
def test_bad_prompts(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(["fine prompt", prompt], params, use_tqdm=False)
    assert_no_leaks(llm)
    assert llm.generate("still serving", greedy(2), use_tqdm=False)[0].finished


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(n=0), "n"),
        (dict(min_p=2.0), "min_p"),
        (dict(logprobs=-2), "logprobs"),
        (dict(bogus=1), "bogus"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_engine_argument_is_named(model):
    with pytest.raises(ValueError, match="max_num_seq"):
        LLM(str(model), max_num_seq=4)


def test_unsupported_architecture_lists_supported(model, tmp_path):
    bad = tmp_path / "gpt2ish"
    shutil.copytree(model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(bad))


def test_too_small_kv_cache_is_explained(model):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(model), num_kv_blocks=4, block_size=16, max_model_len=512)


def test_a_deleted_engine_is_freed_when_the_next_one_starts(model):
    """Start-up freezes the objects alive then (away from the garbage collector); an engine
    deleted later must still be reclaimed, or its KV cache would leave the next one no room."""
    import gc
    import weakref

    first = LLM(str(model), max_model_len=64)
    # A reference cycle, like the runner's with its CUDA graphs: only a collection frees it.
    first.engine.runner.owner = first.engine
    kv_cache = weakref.ref(first.engine.runner.kv_caches[0])
    del first
    gc.collect()
    LLM(str(model), max_model_len=64)
    assert kv_cache() is None


def test_min_tokens_beyond_the_room_left_stops_at_max_model_len(llm):
    out = llm.generate({"prompt_token_ids": [5] * 200},
                       greedy(None, min_tokens=500), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 56  # max_model_len 256
    assert out.finish_reason == "length"
    assert_no_leaks(llm)
