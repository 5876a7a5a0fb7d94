"""Engine arguments from <model>/1/model.json: a bad key or value fails the load, naming it."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.triton_server


@pytest.mark.parametrize(
    "engine_args, named",
    [
        ({"model": "default_model", "max_num_seqz": 8}, "max_num_seqz"),
        ({"model": "default_model", "block_size": 7}, "block_size"),
    ],
    ids=["unknown-key", "bad-value"],
)
def test_bad_model_json_fails_the_load_naming_it(triton_server, engine_args, named):
    name = f"llm_bad_{named}"
    target = triton_server.repository / name
    shutil.copytree(triton_server.repository / "llm", target)
    (target / "1" / "model.json").write_text(json.dumps(engine_args))
    client = httpclient.InferenceServerClient(f"127.0.0.1:{triton_server.http_port}")
    try:
        with pytest.raises(InferenceServerException) as failure:
            client.load_model(name)
        assert named in str(failure.value)
        assert not client.is_model_ready(name)
    finally:
        client.close()
    # The other models are untouched.
    r = requests.post(
        f"{triton_server.http_url}/v2/models/llm/generate",
        json={"text_input": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text


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
