"""Where an engine's ranks run (issue 12, phase 3; pagedserve/placement.py): a KIND_GPU
instance on GPU d takes GPUs d..d+tp-1, any other instance and an in-process engine GPUs
0..tp-1; more GPUs than exist fails naming the fields; a CPU engine ignores the placement.
The ``cuda`` tests run on a GPU (scripts/gpu_check.sh's placement stage)."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest
import torch

from pagedserve import SamplingParams
from pagedserve.config import EngineArgs, ray_installed, resolve_engine_config
from pagedserve.engine.async_engine import AsyncLLMEngine
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.placement import InstancePlacement, rank_devices

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU, MODEL, CPU = "GPU", "MODEL", "CPU"


@pytest.mark.parametrize(
    "kind, device_id, tp, count, expected",
    [
        (GPU, 0, 1, 1, (0,)),
        (GPU, 3, 1, 4, (3,)),  # tp 1 x 4 instances: each on its own GPU
        (GPU, 0, 2, 4, (0, 1)),  # tp 2 x 2 instances, gpus: [0, 2]
        (GPU, 2, 2, 4, (2, 3)),
        (GPU, 1, 3, 4, (1, 2, 3)),
        (GPU, 0, 8, 8, tuple(range(8))),
        (MODEL, 0, 1, 1, (0,)),
        (MODEL, 0, 2, 4, (0, 1)),
        (MODEL, 5, 2, 4, (0, 1)),  # only KIND_GPU's device id counts
        (CPU, 3, 1, 4, (0,)),
        (CPU, 0, 4, 4, (0, 1, 2, 3)),
    ],
)
def test_the_ranks_take_consecutive_gpus_from_the_instance_s_own(kind, device_id, tp, count,
                                                                 expected):
    assert rank_devices(InstancePlacement(kind, device_id), tp, count) == expected


@pytest.mark.parametrize(
    "kind, ids, tp, count, expected",
    [
        (MODEL, (3,), 1, 4, (3,)),
        (MODEL, (2, 3), 2, 4, (2, 3)),
        (MODEL, (3, 0), 2, 4, (3, 0)),  # in the order listed: rank 0 on GPU 3
        (CPU, (1, 0), 2, 2, (1, 0)),
    ],
)
def test_gpu_device_ids_place_a_model_instance_s_ranks(kind, ids, tp, count, expected):
    """vllm_backend's GPU_DEVICE_IDS parameter: KIND_MODEL's ranks on the GPUs listed."""
    assert rank_devices(InstancePlacement(kind, 0, ids), tp, count) == expected


@pytest.mark.parametrize(
    "kind, device_id, tp, count, named",
    [
        (GPU, 1, 1, 1, "model_instance_device_id 1 and tensor_parallel_size 1 needs GPUs 1..1, "
                       "but only 1 CUDA device is visible (index 0)"),
        (GPU, 0, 2, 1, "model_instance_device_id 0 and tensor_parallel_size 2 needs GPUs 0..1, "
                       "but only 1 CUDA device is visible"),
        (GPU, 3, 2, 4, "model_instance_device_id 3 and tensor_parallel_size 2 needs GPUs 3..4, "
                       "but only 4 CUDA devices are visible (indices 0..3)"),
        (GPU, 0, 1, 0, "but no CUDA device is visible"),
        (MODEL, 0, 2, 1, "tensor_parallel_size 2 needs 2 GPUs, but only 1 CUDA device"),
        (CPU, 0, 8, 4, "tensor_parallel_size 8 needs 8 GPUs, but only 4 CUDA devices"),
    ],
)
def test_more_gpus_than_exist_fails_naming_the_fields(kind, device_id, tp, count, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        rank_devices(InstancePlacement(kind, device_id), tp, count)


@pytest.mark.parametrize(
    "ids, tp, count, named",
    [
        ((0, 4), 2, 4, "GPU_DEVICE_IDS [0, 4] names GPU 4, but only 4 CUDA devices are visible"),
        ((0, 1), 1, 4, "GPU_DEVICE_IDS lists 2 GPU(s) [0, 1], but tensor_parallel_size is 1"),
        ((2,), 2, 4, "GPU_DEVICE_IDS lists 1 GPU(s) [2], but tensor_parallel_size is 2"),
    ],
)
def test_gpu_device_ids_that_do_not_fit_fail_naming_them(ids, tp, count, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        rank_devices(InstancePlacement(MODEL, 0, ids), tp, count)


def _model_config(gpu_device_ids: str) -> str:
    return json.dumps({"name": "llm", "parameters": {
        "GPU_DEVICE_IDS": {"string_value": gpu_device_ids}}})


def test_placement_from_triton_args():
    args = {"model_instance_kind": "GPU", "model_instance_device_id": "2", "model_name": "llm",
            "model_config": json.dumps({"name": "llm"})}
    assert InstancePlacement.from_triton_args(args) == InstancePlacement(GPU, 2)
    assert InstancePlacement.from_triton_args({}) == InstancePlacement()  # as KIND_MODEL
    listed = {"model_instance_kind": "MODEL", "model_instance_device_id": "0",
              "model_config": _model_config(" 2, 3 ")}
    assert InstancePlacement.from_triton_args(listed) == InstancePlacement(MODEL, 0, (2, 3))
    listed["model_config"] = _model_config("")  # an empty parameter lists nothing
    assert InstancePlacement.from_triton_args(listed) == InstancePlacement(MODEL, 0)
    for bad, named in (
        ({"model_instance_kind": "TPU"}, "model_instance_kind must be one of GPU, CPU, MODEL"),
        ({"model_instance_device_id": "x"}, "model_instance_device_id must be an integer"),
        ({"model_instance_device_id": "-1"}, "model_instance_device_id must be an integer"),
        ({"model_config": _model_config("0;1")}, "GPU_DEVICE_IDS must be a comma-separated"),
        ({"model_config": _model_config("1,1")}, "GPU_DEVICE_IDS must list distinct GPU"),
        ({"model_config": _model_config("-1")}, "GPU_DEVICE_IDS must list distinct GPU"),
        ({"model_instance_kind": "GPU", "model_config": _model_config("0")},
         "GPU_DEVICE_IDS is for KIND_MODEL instances"),
    ):
        with pytest.raises(ValueError, match=named):
            InstancePlacement.from_triton_args(bad)


def _resolve(placement: InstancePlacement, count: int, **args: object):
    return resolve_engine_config(EngineArgs(model="m", **args), 4096, "float32",
                                 cuda_device_count=count, placement=placement)


def test_the_resolved_config_carries_each_rank_s_device():
    config = _resolve(InstancePlacement(GPU, 2), 4, tensor_parallel_size=2)
    assert config.device == "cuda" and config.devices == (2, 3)
    assert [config.rank_device(r) for r in range(2)] == ["cuda:2", "cuda:3"]
    assert _resolve(InstancePlacement(), 4).devices == (0,)  # in-process: GPU 0
    with pytest.raises(ValueError, match="model_instance_device_id 1 and tensor_parallel_size 2"):
        _resolve(InstancePlacement(GPU, 1), 2, tensor_parallel_size=2)


@pytest.mark.skipif(not ray_installed(), reason="ray is not installed")
def test_with_ray_the_placement_is_rank_0_s_and_the_others_see_their_own_gpu():
    """Past this machine's GPUs auto picks Ray: the instance's placement gives rank 0's GPU
    (KIND_GPU 1: GPU 1) and each actor sees only the GPU Ray gives it, its device 0."""
    config = _resolve(InstancePlacement(GPU, 1), 2, tensor_parallel_size=4)
    assert config.executor_backend == "ray"
    assert config.devices == (1, 0, 0, 0)


def test_a_cpu_engine_ignores_the_placement(caplog):
    """device cpu (asked, or auto with no GPU): no GPUs, whatever the instance kind; a KIND_GPU
    instance loads, with a warning, as vllm_backend's does."""
    with caplog.at_level(logging.WARNING, logger="pagedserve.config"):
        config = _resolve(InstancePlacement(GPU, 5), 2, device="cpu", tensor_parallel_size=4)
    assert config.device == "cpu" and config.devices == ()
    assert config.rank_device(0) == config.rank_device(3) == "cpu"
    assert "the instance's GPUs (KIND_GPU on GPU 5) are not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pagedserve.config"):
        config = _resolve(InstancePlacement(MODEL, 0, (3,)), 4, device="cpu",
                          tensor_parallel_size=2)  # the list's length is not checked
    assert config.devices == () and "(GPU_DEVICE_IDS [3]) are not used" in caplog.text
    caplog.clear()
    config = _resolve(InstancePlacement(MODEL, 0), 0, tensor_parallel_size=2)
    assert config.device == "cpu" and config.devices == () and not caplog.text


def _stream(engine: AsyncLLMEngine, prompt: str) -> list[int]:
    async def run() -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        async for out in engine.generate(prompt, params, "0"):
            tokens = out.outputs[0].token_ids
        return list(tokens)

    return asyncio.run(run())


ENGINE = dict(dtype="float32", max_model_len=64, num_kv_blocks=16, max_num_seqs=2)


def test_an_engine_on_the_cpu_given_a_gpu_placement_runs_on_the_cpu(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    engine = AsyncLLMEngine(EngineArgs(model, device="cpu", **ENGINE),
                            placement=InstancePlacement(GPU, 3))
    try:
        assert engine.engine.config.devices == ()
        runner = engine.engine.runner
        assert runner.device == torch.device("cpu")
        assert {p.device.type for p in runner.model.parameters()} == {"cpu"}
        reference = LLMEngine(EngineArgs(model, device="cpu", **ENGINE))
        tokens = _stream(engine, "Placement")
        assert len(tokens) == 6
        reference.add_request("r", "Placement",
                              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        done = []
        while reference.has_unfinished_requests():
            done += [o for o in reference.step() if o.finished]
        assert list(done[0].outputs[0].token_ids) == tokens
    finally:
        engine.shutdown()


# ---- on a GPU (scripts/gpu_check.sh: placement) -------------------------------------------

@needs_cuda
@pytest.mark.parametrize("placement, device", [
    (InstancePlacement(GPU, 0), 0),
    (InstancePlacement(GPU, 1), 1),
    (InstancePlacement(MODEL, 0, (1,)), 1),  # GPU_DEVICE_IDS "1"
], ids=["kind-gpu-0", "kind-gpu-1", "gpu-device-ids-1"])
def test_cuda_an_instance_runs_on_its_gpu(tiny_model_dir, placement, device):
    """tp 1 on the instance's GPU: the model, the KV cache and the steps (on the engine's own
    thread) are there. GPU 1 needs a second GPU."""
    if device >= torch.cuda.device_count():
        pytest.skip(f"needs {device + 1} GPUs")
    model = str(tiny_model_dir("llama"))
    engine = AsyncLLMEngine(EngineArgs(model, enforce_eager=True, **ENGINE),
                            placement=placement)
    try:
        runner = engine.engine.runner
        expected = torch.device("cuda", device)
        assert engine.engine.config.devices == (device,)
        assert runner.device == expected
        assert {p.device for p in runner.model.parameters()} == {expected}
        assert len(_stream(engine, "Placement")) == 6
    finally:
        engine.shutdown()


@needs_cuda
@pytest.mark.parametrize("tp, device_id_past_the_last", [(2, False), (1, True)])
def test_cuda_more_gpus_than_exist_fails_the_engine_naming_them(tiny_model_dir, tp,
                                                                 device_id_past_the_last):
    count = torch.cuda.device_count()
    device_id = count if device_id_past_the_last else count - 1
    with pytest.raises(ValueError, match=(
            f"model_instance_device_id {device_id} and tensor_parallel_size {tp} needs GPUs")):
        LLMEngine(EngineArgs(str(tiny_model_dir("llama")), tensor_parallel_size=tp, **ENGINE),
                  InstancePlacement(GPU, device_id))
