"""Engine arguments from <model>/1/model.json: a bad key or value fails the load, naming it."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.triton_server


NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


@pytest.mark.parametrize(
    "engine_args, named",
    [
        ({"model": "default_model", "max_num_seqz": 8}, "max_num_seqz"),
        ({"model": "default_model", "block_size": 7}, "block_size"),
        ({"model": "default_model", "speculative_config": {**NGRAM, "method": "lookahead"}},
         "speculative_config 'method' must be one of ngram, draft_model, eagle3"),
        ({"model": "default_model",
          "speculative_config": {**NGRAM, "num_speculative_tokens": 0}},
         "speculative_config 'num_speculative_tokens' must be an integer in [1, "),
        # Resolved against the machine where the placement is (config.py), in the engine's
        # build: on a CPU-only server Triton refuses KIND_GPU itself, before the backend.
        pytest.param({"model": "default_model", "device": "cuda"},
                     "engine argument 'device' is 'cuda' but no CUDA device is available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(),
                                              reason="loads where there is a GPU")),
    ],
    ids=["unknown-key", "bad-value", "spec-method", "spec-num-tokens", "device-cuda"],
)
def test_bad_model_json_fails_the_load_naming_it(triton_server, engine_args, named, request):
    name = f"llm_bad_{request.node.callspec.id.replace('-', '_')}"
    target = triton_server.repository / name
    shutil.copytree(triton_server.repository / "llm", target)
    (target / "1" / "model.json").write_text(json.dumps(engine_args))
    client = httpclient.InferenceServerClient(f"127.0.0.1:{triton_server.http_port}")
    try:
        with pytest.raises(InferenceServerException) as failure:
            client.load_model(name)
        assert named in str(failure.value)
        assert named in triton_server.log(tail=200_000)  # and the server's log says it too
        assert not client.is_model_ready(name)
    finally:
        client.close()
        # A restart of the shared server (the supervisor's answer to a dead stub) loads every
        # model in the repository; one that cannot load would make it exit.
        shutil.rmtree(target)
    # The other models are untouched.
    r = requests.post(
        f"{triton_server.http_url}/v2/models/llm/generate",
        json={"text_input": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_a_bad_gpu_device_ids_parameter_fails_the_load_naming_it(triton_server):
    """config.pbtxt's GPU_DEVICE_IDS (placement.py) is read by model.py from the instance's
    args: a malformed list fails the load, whatever the device, and the message reaches the
    client and the server's log."""
    name = "llm_bad_gpu_ids"
    target = triton_server.repository / name
    shutil.copytree(triton_server.repository / "llm", target)
    with open(target / "config.pbtxt", "a") as config:
        config.write('parameters: { key: "GPU_DEVICE_IDS" value: { string_value: "0;1" } }\n')
    named = f"model '{name}': instance {name}_0_0: GPU_DEVICE_IDS must be a comma-separated"
    client = httpclient.InferenceServerClient(f"127.0.0.1:{triton_server.http_port}")
    try:
        with pytest.raises(InferenceServerException) as failure:
            client.load_model(name)
        assert named in str(failure.value)
        assert named in triton_server.log(tail=200_000)
    finally:
        client.close()
        shutil.rmtree(target)  # see above: a restart must be able to load every model


def test_unload_lets_inflight_streams_finish_then_shuts_down(triton_server):
    """Triton unloads a model once its in-flight requests are done: a running stream ends
    normally, then finalize() stops the engine."""
    from serving_client import GrpcStream, tensor

    name = "llm_unload"
    shutil.copytree(triton_server.repository / "llm", triton_server.repository / name)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{triton_server.http_port}")
    stream = GrpcStream(triton_server.grpc_url)
    try:
        client.load_model(name)
        rid = stream.send(name, [
            tensor("text_input", "A long story"), tensor("stream", True),
            tensor("sampling_parameters", '{"max_tokens": 300, "ignore_eos": true}'),
        ])
        first = stream.queue.get(timeout=30)
        client.unload_model(name)
        result = stream.collect([rid], timeout=60)[rid]
        assert result.error is None, result.error
        assert first[1] is None
        first_ids = first[0].as_numpy("output_ids")
        assert len(first_ids) + len(result.ids()) == 300
        deadline = time.monotonic() + 30
        while client.is_model_ready(name) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not client.is_model_ready(name)
    finally:
        stream.close()
        client.close()
    deadline = time.monotonic() + 30
    while f"model '{name}' shut down" not in triton_server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"pagedserve: model '{name}' shut down" in triton_server.log()


def test_a_quantized_checkpoint_serves_with_quantization_in_model_json(start_triton_server):
    """model.json naming ``quantization``: the GPTQ checkpoint serves, and so does the
    unquantized model with ``fp8`` (quantized at load), each greedy text equal to the offline
    engine's; a method that disagrees with the checkpoint fails the load naming it.
    A server of its own: a stub crash here must not take the shared one down."""
    from pagedserve import LLM, SamplingParams
    from pagedserve.devtools.quantized_model import write_quantized

    triton_server = start_triton_server()
    source = triton_server.repository / "llm" / "1" / "default_model"
    config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
              "desc_act": False, "checkpoint_format": "gptq"}
    # A load on the loaded 2-core machine took over the client's default 60 s.
    client = httpclient.InferenceServerClient(
        f"127.0.0.1:{triton_server.http_port}", connection_timeout=600, network_timeout=600
    )
    try:
        for name, method in (("llm_gptq", "gptq"), ("llm_gptq_as_awq", "awq"),
                             ("llm_fp8_online", "fp8")):
            target = triton_server.repository / name
            shutil.copytree(triton_server.repository / "llm", target,
                            ignore=shutil.ignore_patterns("default_model"))
            if method == "fp8":
                shutil.copytree(source, target / "1" / "quantized")
            else:
                write_quantized(source, target / "1" / "quantized", target / "twin", "gptq",
                                config, bits=4, group_size=32, sym=True)
            (target / "1" / "model.json").write_text(json.dumps(
                {"model": "quantized", "quantization": method, "kv_cache_memory_bytes": 1 << 24}))
            if method == "awq":
                with pytest.raises(InferenceServerException) as failure:
                    client.load_model(name)
                assert "'quantization' is 'awq'" in str(failure.value)
                continue
            client.load_model(name)
            r = requests.post(
                f"{triton_server.http_url}/v2/models/{name}/generate",
                json={"text_input": "Hello world", "exclude_input_in_output": True,
                      "sampling_parameters": json.dumps({"max_tokens": 8, "temperature": 0})},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            llm = LLM(str(target / "1" / "quantized"), kv_cache_memory_bytes=1 << 24,
                      quantization=method)
            offline = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=8),
                                   use_tqdm=False)[0].outputs[0].text
            assert r.json()["text_output"] == offline
            client.unload_model(name)
    finally:
        client.close()
