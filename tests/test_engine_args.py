"""Engine arguments as vLLM names them: supported ones honoured (request and stats logging,
trust_remote_code, sliding windows, hub ids from the local cache), the others named as not
supported by pagedserve."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from pagedserve import LLM, EngineArgs, SamplingParams
from pagedserve.config_vllm import UNSUPPORTED_ENGINE_ARGS
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.models.model_config import ModelConfig

SMALL = dict(max_model_len=128, kv_cache_memory_bytes=16 << 20)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(model):
    return LLM(str(model), **SMALL).generate("Hello world", GREEDY, use_tqdm=False)[0].outputs[0]


def _text(llm: LLM) -> list[int]:
    return llm.generate("Hello world", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


# ---- which keys --------------------------------------------------------------------------------


def test_a_vllm_backend_model_json_loads(tmp_path, model):
    (tmp_path / "model.json").write_text(json.dumps({
        "model": str(model), "disable_log_requests": True, "gpu_memory_utilization": 0.5,
        "enforce_eager": True, "max_logprobs": 5, "disable_log_stats": True,
        "quantization": None, "kv_cache_dtype": "auto", "swap_space": 4,
        "pipeline_parallel_size": 1, "tokenizer_mode": "auto", "load_format": "auto",
        "revision": None, "download_dir": None, "disable_sliding_window": False,
        "num_gpu_blocks_override": 64, "served_model_name": None,
    }))
    args = EngineArgs.from_json_file(tmp_path / "model.json")
    assert args.max_logprobs == 5 and args.num_kv_blocks == 64 and not args.log_requests


@pytest.mark.parametrize("key, value", [
    ("enable_lora", True), ("calculate_kv_scales", True),
    ("pipeline_parallel_size", 2), ("speculative_model", "x"),
    ("tokenizer_mode", "slow"), ("cpu_offload_gb", 4), ("served_model_name", "m"),
])
def test_unsupported_vllm_keys_are_named(key, value):
    assert key in UNSUPPORTED_ENGINE_ARGS
    with pytest.raises(ValueError, match=f"'{key}' .*not supported by pagedserve"):
        EngineArgs.from_dict({"model": "m", key: value})


def test_unknown_keys_stay_unknown():
    with pytest.raises(ValueError, match=r"unknown engine argument\(s\) 'max_num_seq'; known:"):
        EngineArgs.from_dict({"model": "m", "max_num_seq": 4})


def test_num_gpu_blocks_override_is_num_kv_blocks():
    args = EngineArgs.from_dict({"model": "m", "num_gpu_blocks_override": 40})
    assert args.num_kv_blocks == 40
    with pytest.raises(ValueError, match="disagree"):
        EngineArgs.from_dict({"model": "m", "num_gpu_blocks_override": 40, "num_kv_blocks": 8})


@pytest.mark.parametrize("values, logs", [
    ({}, False),
    ({"enable_log_requests": True}, True),
    ({"disable_log_requests": False}, True),
    ({"disable_log_requests": True}, False),
    ({"enable_log_requests": False, "disable_log_requests": True}, False),
])
def test_which_request_logging(values, logs):
    assert EngineArgs.from_dict({"model": "m", **values}).log_requests is logs


def test_contradicting_request_logging_is_an_error():
    with pytest.raises(ValueError, match="enable_log_requests"):
        EngineArgs(model="m", enable_log_requests=True, disable_log_requests=True)


# ---- logging -----------------------------------------------------------------------------------


def test_requests_and_stats_are_logged(model, reference, caplog):
    llm = LLM(str(model), enable_log_requests=True, disable_log_stats=False, **SMALL)
    llm.engine.stat_logger.interval_s = 0.0  # a line at every step
    with caplog.at_level(logging.INFO, logger="pagedserve.engine"):
        assert _text(llm) == reference.token_ids
    lines = [r.getMessage() for r in caplog.records if r.name == "pagedserve.engine"]
    received = [m for m in lines if m.startswith("Received request")]
    finished = [m for m in lines if m.startswith("Finished request")]
    assert len(received) == len(finished) == 1
    assert "'Hello world'" in received[0] and "max_tokens=8" in received[0]
    assert "finish_reason: length" in finished[0] and "generated tokens: 8" in finished[0]
    stats = [m for m in lines if m.startswith("Avg prompt throughput")]
    assert stats and "Running: " in stats[0] and "KV cache usage" in stats[0]
    assert any(not m.startswith("Avg prompt throughput: 0.0") for m in stats)


def test_nothing_is_logged_by_default(model, caplog):
    llm = LLM(str(model), **SMALL)
    assert llm.engine.request_logger is None and llm.engine.stat_logger is None
    with caplog.at_level(logging.INFO, logger="pagedserve.engine"):
        _text(llm)
    assert not [r for r in caplog.records if r.name == "pagedserve.engine"]


# ---- trust_remote_code and sliding windows ----------------------------------------------------

_REMOTE_CONFIG = '''
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote_llama"
'''


def test_remote_code_needs_trust_remote_code(model, reference, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(model, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["model_type"] = "tiny_remote_llama"
    cfg["auto_map"] = {"AutoConfig": "configuration_tiny.TinyRemoteConfig"}
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "configuration_tiny.py").write_text(_REMOTE_CONFIG)
    with pytest.raises(ValueError, match="trust_remote_code"):
        LLM(str(remote), **SMALL)
    assert _text(LLM(str(remote), trust_remote_code=True, **SMALL)) == reference.token_ids


@pytest.mark.parametrize("use_sliding_window, expected", [(False, 1024), (True, 64),
                                                          (None, 64)])
def test_use_sliding_window_is_honoured(tiny_model_dir, tmp_path, use_sliding_window, expected):
    qwen = tmp_path / "qwen2"
    shutil.copytree(tiny_model_dir("qwen2"), qwen)
    cfg = json.loads((qwen / "config.json").read_text())
    cfg.update(sliding_window=64, max_position_embeddings=1024)
    cfg.pop("use_sliding_window", None)
    if use_sliding_window is not None:
        cfg["use_sliding_window"] = use_sliding_window
    (qwen / "config.json").write_text(json.dumps(cfg))
    assert ModelConfig.from_pretrained(qwen).sliding_window == (None if expected == 1024
                                                                  else 64)
    for disable in (False, True):  # attention is full either way: the window caps the length
        engine = LLMEngine(EngineArgs(str(qwen), disable_sliding_window=disable,
                                      kv_cache_memory_bytes=16 << 20))
        assert engine.config.max_model_len == expected
        del engine


# ---- hub ids -----------------------------------------------------------------------------------


def _cache_with(model, cache, repo="tiny-org/tiny-llama", revisions=("main",)):
    """A Hugging Face cache layout holding ``model`` as ``repo``: refs name a snapshot."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    for rev in revisions:
        (repo_dir / "refs" / rev).write_text(commit)
    return commit


def test_a_hub_id_resolves_through_the_local_cache(model, reference, tmp_path, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    _cache_with(model, cache, revisions=("main", "v1"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert _text(LLM("tiny-org/tiny-llama", **SMALL)) == reference.token_ids
    llm = LLM("tiny-org/tiny-llama", tokenizer="tiny-org/tiny-llama", revision="v1", **SMALL)
    assert _text(llm) == reference.token_ids
    with pytest.raises(ValueError, match=r"'tiny-org/tiny-llama' at revision 'v2' is not in"):
        LLM("tiny-org/tiny-llama", revision="v2", **SMALL)


def test_download_dir_and_hf_hub_cache(model, reference, tmp_path, monkeypatch):
    _cache_with(model, tmp_path / "elsewhere")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    llm = LLM("tiny-org/tiny-llama", download_dir=str(tmp_path / "elsewhere"), **SMALL)
    assert _text(llm) == reference.token_ids
    with pytest.raises(ValueError) as info:
        LLM("tiny-org/tiny-llama", **SMALL)
    message = str(info.value)
    assert "'tiny-org/tiny-llama'" in message and str(tmp_path / "empty") in message
    assert "does not download" in message


def test_a_missing_path_is_named(model, tmp_path):
    with pytest.raises(ValueError, match="'model'.*is not a directory"):
        LLM(str(tmp_path / "no" / "such" / "dir"), **SMALL)
    with pytest.raises(ValueError, match="'tokenizer'.*not-there/tok"):
        LLM(str(model), tokenizer="not-there/tok", **SMALL)
