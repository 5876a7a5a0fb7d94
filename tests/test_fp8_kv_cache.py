"""kv_cache_dtype fp8 through the engine (CPU, torch backend): the argument, the block count,
output close to the model-dtype cache, checkpoint scales, prefix caching and preemption."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pagedserve import LLM, EngineArgs, SamplingParams
from pagedserve.models.model_config import ModelConfig

FIXTURES = Path(__file__).parent / "fixtures" / "quant"
KV_MEMORY = 1 << 20
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


def prompts_of(lengths: list[int], seed: int, vocab: int = 1000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


# ---- the argument ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["int8", "fp8_e4m3fn", "FP8", ""])
def test_bad_kv_cache_dtype_is_named_with_the_allowed_values(bad):
    with pytest.raises(ValueError, match=r"'kv_cache_dtype' must be one of auto, fp8, fp8_e4m3, "
                                         r"fp8_e5m2"):
        EngineArgs(model="m", kv_cache_dtype=bad)


def test_kv_cache_dtype_from_model_json(tmp_path, model):
    (tmp_path / "model.json").write_text(json.dumps({"model": str(model),
                                                     "kv_cache_dtype": "fp8"}))
    assert EngineArgs.from_json_file(tmp_path / "model.json").kv_cache_dtype == "fp8"
    (tmp_path / "model.json").write_text(json.dumps({"model": str(model),
                                                     "kv_cache_dtype": 8}))
    with pytest.raises(ValueError, match="'kv_cache_dtype' has the wrong type"):
        EngineArgs.from_json_file(tmp_path / "model.json")


# ---- memory and accuracy -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype, factor", [("float32", 4), ("bfloat16", 2)])
def test_fp8_cache_holds_more_blocks_in_the_same_memory(model, dtype, factor):
    counts = {}
    for kv in ("auto", "fp8", "fp8_e5m2"):
        llm = LLM(str(model), dtype=dtype, kv_cache_dtype=kv, kv_cache_memory_bytes=KV_MEMORY)
        cache = llm.engine.runner.kv_caches[0]
        counts[kv] = llm.engine.get_stats().num_kv_blocks
        assert cache.shape[1] == counts[kv]
        assert cache.dtype == {"auto": getattr(torch, dtype), "fp8": torch.float8_e4m3fn,
                               "fp8_e5m2": torch.float8_e5m2}[kv]
        del llm
    assert counts["fp8"] == counts["fp8_e5m2"] == factor * counts["auto"]


def _teacher_forced(llm: LLM, sequences: list[list[int]], prompt_lens: list[int]):
    """Per completion position of ``sequences``: the logprob of its token, and whether it is
    the engine's top-1 there (the greedy choice given the same context)."""
    outs = generate(llm, sequences, greedy(1, prompt_logprobs=1))
    logprobs, top1 = [], []
    for out, seq, start in zip(outs, sequences, prompt_lens):
        for pos in range(start, len(seq)):
            entry = out.prompt_logprobs[pos]
            logprobs.append(entry[seq[pos]].logprob)
            top1.append(entry[seq[pos]].rank == 1)
    return torch.tensor(logprobs), torch.tensor(top1)


# Measured on this tiny model (whose logits are sharp: bf16 weights and activations alone move
# its logprobs by 0.07 on average and flip 7 of 128 greedy choices): e4m3 0.36 mean, 77% of the
# greedy tokens kept; e5m2 (2 mantissa bits) 1.1 and 64%. Bounds with a margin; a scale applied
# twice or not at all, or a misplaced block, moves every logprob by whole nats.
ACCURACY = {"fp8": (0.6, 0.7), "fp8_e5m2": (1.6, 0.55)}


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_logprobs_stay_close_to_the_model_dtype_cache(model, kv_cache_dtype):
    prompts = prompts_of([6, 11, 17, 30], seed=1)
    auto = LLM(str(model), kv_cache_memory_bytes=KV_MEMORY)
    completions = generate(auto, prompts, greedy())
    sequences = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, completions)]
    lens = [len(p) for p in prompts]
    base, base_top1 = _teacher_forced(auto, sequences, lens)
    assert base_top1.all()
    del auto
    fp8 = LLM(str(model), kv_cache_dtype=kv_cache_dtype, kv_cache_memory_bytes=KV_MEMORY)
    logprobs, top1 = _teacher_forced(fp8, sequences, lens)
    mean_diff, min_agree = ACCURACY[kv_cache_dtype]
    diff = (logprobs - base).abs()
    assert diff.mean() < mean_diff, f"mean |dlogprob| {diff.mean():.3f}, max {diff.max():.3f}"
    assert top1.float().mean() >= min_agree, f"greedy agreement {top1.float().mean():.2f}"


def test_prefix_caching_and_preemption_keep_fp8_outputs(model):
    """A prefix hit reads the fp8 blocks another request wrote, and a preempted request
    recomputes into fresh ones; both give what one uncached, unconstrained run gives."""
    shared = prompts_of([37], seed=4)[0]
    prompts = [shared + t for t in prompts_of([3, 11, 1, 20], seed=5)]
    args = dict(kv_cache_dtype="fp8", block_size=8, max_model_len=96)
    plain = LLM(str(model), enable_prefix_caching=False, **args)
    want = generate(plain, prompts, greedy())
    del plain
    cached = LLM(str(model), **args)
    generate(cached, prompts[:1], greedy())
    got = generate(cached, prompts, greedy())
    assert cached.engine.get_stats().prefix_cache_hits_total > 0
    del cached
    tight = LLM(str(model), num_kv_blocks=14, enable_prefix_caching=False, **args)
    squeezed = generate(tight, prompts, greedy())
    assert tight.engine.get_stats().num_preemptions_total > 0
    for outputs in (got, squeezed):
        assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in want]


# ---- checkpoint scales -------------------------------------------------------------------------

KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
             "symmetric": True, "group_size": None, "observer": "minmax"}


def _with_kv_scales(tmp_path: Path, scheme, tensors: dict[str, torch.Tensor],
                    name: str = "ckpt") -> Path:
    """llm-compressor's W4A16 fixture (as a user has it: without the producer's logits file,
    with base/'s tokenizer), with a kv_cache_scheme and KV-cache scale tensors."""
    src = FIXTURES / "ct-w4a16-g128-sym"
    out = tmp_path / name
    out.mkdir()
    for name in ("model.safetensors", *[p.name for p in (FIXTURES / "base").iterdir()
                                        if p.suffix == ".json" and p.name != "config.json"]):
        shutil.copy((src if name == "model.safetensors" else FIXTURES / "base") / name,
                    out / name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = scheme
    (out / "config.json").write_text(json.dumps(config))
    if tensors:
        save_file(tensors, str(out / "kv_scales.safetensors"))
    return out


# Both spellings vLLM accepts: the attention's own scale, and k/v_proj's output scale.
SCALES = {
    "model.layers.0.self_attn.k_scale": torch.tensor(0.25),
    "model.layers.0.self_attn.v_scale": torch.tensor([4.0]),
    "model.layers.1.self_attn.k_proj.output_scale": torch.tensor(0.5),
    "model.layers.1.self_attn.v_proj.output_scale": torch.tensor(2.0),
}


def _attention_scales(llm: LLM) -> list[tuple[float, float]]:
    return [(layer.self_attn.attn.k_scale_float, layer.self_attn.attn.v_scale_float)
            for layer in llm.engine.runner.model.model.layers]


def test_checkpoint_scales_are_loaded_and_used(tmp_path):
    """Power-of-two scales leave the fp8 grid's relative spacing unchanged, so a model with
    scales computes what the same model without them does (up to the subnormal range: 0.015
    at most, measured, in fp32), while its cache holds x / scale:
    the write divides by each layer's scale and the read multiplies it back (a read that
    ignored a scale of 4 would change the output by far more than the bounds here)."""
    scaled_dir = _with_kv_scales(tmp_path, KV_SCHEME, SCALES)
    plain_dir = _with_kv_scales(tmp_path, None, {}, name="plain")
    prompts = prompts_of([9, 21], seed=7, vocab=200)
    runs = {}
    for name, path in (("scaled", scaled_dir), ("plain", plain_dir)):
        llm = LLM(str(path), dtype="float32", kv_cache_dtype="fp8",
                  kv_cache_memory_bytes=KV_MEMORY, enable_prefix_caching=False)
        outs = generate(llm, prompts, greedy(8, logprobs=0))
        runs[name] = (llm, outs, _attention_scales(llm))
    scaled, plain = runs["scaled"], runs["plain"]
    assert scaled[2] == [(0.25, 4.0), (0.5, 2.0)] and plain[2] == [(1.0, 1.0), (1.0, 1.0)]
    for a, b in zip(scaled[1], plain[1]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        lp_a = [lp[t].logprob for lp, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
        lp_b = [lp[t].logprob for lp, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)]
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), atol=0.05, rtol=0)
    # Layer 0's keys and values depend on the embeddings only: identical in both runs.
    k_scale, v_scale = scaled[2][0]
    stored = scaled[0].engine.runner.kv_caches[0].float()
    reference = plain[0].engine.runner.kv_caches[0].float()
    used = reference.abs().amax(dim=(2, 3, 4))[0] > 0  # blocks written
    assert used.sum() > 0
    # 2^-10: the subnormal quantum differs with the scale (values below 2^-6 of the range).
    torch.testing.assert_close(stored[0][used] * k_scale, reference[0][used], atol=2**-10,
                               rtol=0)
    torch.testing.assert_close(stored[1][used] * v_scale, reference[1][used], atol=2**-8,
                               rtol=0)


def test_legacy_kv_scale_serves_both_and_query_scales_are_skipped(tmp_path):
    path = _with_kv_scales(tmp_path, KV_SCHEME, {
        "model.layers.0.self_attn.kv_scale": torch.tensor(0.5),
        "model.layers.1.self_attn.q_scale": torch.tensor(2.0),
    })
    llm = LLM(str(path), kv_cache_dtype="fp8", kv_cache_memory_bytes=KV_MEMORY)
    assert _attention_scales(llm) == [(0.5, 0.5), (1.0, 1.0)]


def test_scales_are_ignored_by_a_model_dtype_cache(tmp_path):
    path = _with_kv_scales(tmp_path, KV_SCHEME, SCALES)
    prompts = prompts_of([9], seed=7, vocab=200)
    outs = {}
    for name, p in (("scaled", path), ("plain", _with_kv_scales(tmp_path, None, {}, "plain"))):
        llm = LLM(str(p), kv_cache_memory_bytes=KV_MEMORY)
        outs[name] = generate(llm, prompts, greedy(8))[0].outputs[0].token_ids
        del llm
    assert outs["scaled"] == outs["plain"]


@pytest.mark.parametrize("key, value", [("num_bits", 4), ("type", "int"),
                                        ("strategy", "attn_head"), ("dynamic", True),
                                        ("symmetric", False)])
def test_unsupported_kv_cache_scheme_is_named(tmp_path, key, value):
    path = _with_kv_scales(tmp_path, {**KV_SCHEME, key: value}, {})
    with pytest.raises(ValueError, match=rf"quantization_config\.kv_cache_scheme\.{key} is"):
        ModelConfig.from_pretrained(path)


@pytest.mark.parametrize("name, tensor, match", [
    ("model.layers.0.self_attn.k_scale", torch.tensor([0.5, 0.5]), r"per-head scales"),
    ("model.layers.1.self_attn.v_scale", torch.tensor(0.0), r"positive finite"),
    ("model.layers.1.self_attn.v_scale", torch.tensor(float("nan")), r"positive finite"),
])
def test_bad_checkpoint_scales_are_named(tmp_path, name, tensor, match):
    path = _with_kv_scales(tmp_path, KV_SCHEME, {name: tensor})
    with pytest.raises(ValueError, match=rf"model\.layers\.\d\.self_attn.*{match}"):
        LLM(str(path), kv_cache_dtype="fp8", kv_cache_memory_bytes=KV_MEMORY)
