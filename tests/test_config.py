"""Engine arguments: one validation point, errors that name the argument."""

from __future__ import annotations

import json
import sys

import pytest

from pagedserve.config import EngineArgs, resolve_engine_config


@pytest.mark.parametrize(
    "values, name",
    [
        ({"block_size": "16"}, "block_size"),
        ({"block_size": 12}, "block_size"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"enable_prefix_caching": "yes"}, "enable_prefix_caching"),
        ({"dtype": "float64"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"attention_backend": "magic"}, "attention_backend"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"tensor_parallel_size": 2.0}, "tensor_parallel_size"),
        ({"distributed_executor_backend": "threads"}, "distributed_executor_backend"),
        ({"distributed_executor_backend": "uni", "tensor_parallel_size": 2}, "needs mp"),
        ({"distributed_timeout_seconds": 0}, "distributed_timeout_seconds"),
        ({"num_kv_blocks": 1}, "num_kv_blocks"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"max_model_len": 2**31}, "max_model_len"),
        ({"max_num_seqs": 2**40}, "max_num_seqs"),
        ({"max_num_batched_tokens": -5}, "max_num_batched_tokens"),
        ({"num_kv_blocks": 2**31}, "num_kv_blocks"),
        ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes"),
        ({"kv_cache_memory_bytes": 2**63}, "kv_cache_memory_bytes"),
        ({"gpu_memory_utilization": float("nan")}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": True}, "gpu_memory_utilization"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"max_logprobs": -2}, "max_logprobs"),
        ({"max_logprobs": 1.5}, "max_logprobs"),
        ({"async_scheduling": "on"}, "async_scheduling"),
        ({"unknown_key": 1}, "unknown_key"),
    ],
)
def test_bad_values_are_named(values, name):
    with pytest.raises(ValueError, match=name):
        EngineArgs.from_dict({"model": "m", **values})


def test_model_is_required():
    with pytest.raises(ValueError, match="'model' is required"):
        EngineArgs.from_dict({"dtype": "auto"})


def test_model_json_relative_paths(tmp_path):
    version = tmp_path / "llm" / "1"
    (version / "weights").mkdir(parents=True)
    (version / "model.json").write_text(json.dumps(
        {"model": "weights", "disable_log_requests": True, "gpu_memory_utilization": 0.5,
         "enforce_eager": True}))
    args = EngineArgs.from_json_file(version / "model.json")
    assert args.model == str(version / "weights")
    assert args.enforce_eager and args.gpu_memory_utilization == 0.5


def test_model_json_must_be_an_object(tmp_path):
    path = tmp_path / "model.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        EngineArgs.from_json_file(path)
    path.write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        EngineArgs.from_json_file(path)


def test_resolution_against_the_model():
    args = EngineArgs(model="m")
    config = resolve_engine_config(args, 4096, "float16", cuda_device_count=0)
    assert config.device == "cpu" and config.dtype == "float32"  # no fp16 matmuls on CPUs
    assert config.max_model_len == 4096
    assert resolve_engine_config(args, 4096, "bfloat16", sliding_window=1024).max_model_len == 1024
    with pytest.raises(ValueError, match="max_model_len"):
        resolve_engine_config(EngineArgs(model="m", max_model_len=8192), 4096, "float32")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_engine_config(EngineArgs(model="m", device="cuda"), 4096, "float32")
    with pytest.raises(ValueError, match="chunked prefill"):
        resolve_engine_config(
            EngineArgs(model="m", enable_chunked_prefill=False, max_num_batched_tokens=512),
            4096, "float32",
        )


@pytest.mark.parametrize("device, tp, gpus, backend", [
    ("cpu", 1, 0, "uni"),
    ("cpu", 8, 0, "mp"),  # CPU ranks always fit this machine
    ("cuda", 2, 2, "mp"),
    ("cuda", 4, 2, "ray"),  # past this machine's GPUs
])
def test_auto_executor_backend(device, tp, gpus, backend):
    args = EngineArgs(model="m", device=device, tensor_parallel_size=tp)
    config = resolve_engine_config(args, 4096, "float32", cuda_device_count=gpus)
    assert config.executor_backend == backend


def test_ray_missing_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without ray imports
    with pytest.raises(ValueError, match=r"'distributed_executor_backend' names the Ray "
                                         r"executor, but ray is not installed: pip install"):
        EngineArgs(model="m", tensor_parallel_size=2, distributed_executor_backend="ray")
    args = EngineArgs(model="m", device="cuda", tensor_parallel_size=4)
    with pytest.raises(ValueError, match=r"'tensor_parallel_size' \(4\) needs more GPUs than "
                                         r"this machine has \(2\).*not installed: pip install"):
        resolve_engine_config(args, 4096, "float32", cuda_device_count=2)
    # One machine's ranks need no Ray.
    assert resolve_engine_config(args, 4096, "float32",
                                 cuda_device_count=4).executor_backend == "mp"


@pytest.mark.parametrize("spec", [
    {"method": "ngram", "num_speculative_tokens": 2},
    {"model": "draft", "num_speculative_tokens": 2},  # method draft_model
    {"method": "eagle3", "model": "head", "num_speculative_tokens": 2},
], ids=["ngram", "draft_model", "eagle3"])
def test_speculation_with_several_ranks(spec):
    args = EngineArgs.from_dict({"model": "m", "tensor_parallel_size": 2,
                                 "speculative_config": spec})
    assert args.tensor_parallel_size == 2 and args.speculative_config == spec
