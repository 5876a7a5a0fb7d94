"""Checkpoint loading variants against HF: sharded files, Llama-3 rope scaling, old rope keys."""

from __future__ import annotations

import pytest
from hf_reference import assert_greedy_match, hf_greedy

from pagedserve import LLM, SamplingParams
from pagedserve.models.model_config import ModelConfig

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_shard_size="100KB"),
        dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
        dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, legacy_rope_keys=True),
        dict(tie_word_embeddings=True),
    ],
    ids=["sharded", "llama3-rope", "llama3-rope-legacy-keys", "tied"],
)
def test_variant_matches_hf(tiny_model_dir, kwargs):
    model = tiny_model_dir("llama", **kwargs)
    config = ModelConfig.from_pretrained(model)
    if "rope_scaling" in kwargs:
        assert config.rope_scaling["rope_type"] == "llama3"
        assert config.rope_theta == 500000.0
    if "max_shard_size" in kwargs:
        assert (model / "model.safetensors.index.json").is_file()
    # Prompts past original_max_position_embeddings exercise the scaled frequencies.
    prompts = [[5 + (7 * i) % 900 for i in range(n)] for n in (90, 3)]
    llm = LLM(str(model), kv_cache_memory_bytes=16 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, ref in zip(outs, hf_greedy(model, prompts, 16)):
        assert_greedy_match(out.outputs[0].token_ids, ref)


def test_missing_weights_are_reported(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_model_dir("llama")
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    weights.pop("model.norm.weight")
    save_file(weights, dst / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight"):
        LLM(str(dst))


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))
