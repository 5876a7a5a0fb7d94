"""Generation through the server: gRPC streams, HTTP generate/generate_stream, genai-perf
payloads, and the ensemble's exact streamed text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
from serving_client import GrpcStream, sse_events, sse_token_ids, tensor

pytestmark = pytest.mark.triton_server

# Spaces and multi-byte characters (2-, 3- and 4-byte UTF-8) in the prompts.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Grüße aus Köln: 東京 и Москва 🚀 done",
    "def fibonacci(n):\n    return n",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def reference(serving_checkpoint):
    """The in-process engine's greedy completions of PROMPTS (token ids and text)."""
    from pagedserve import SamplingParams
    from pagedserve.entrypoints.llm import LLM

    llm = LLM(str(serving_checkpoint))
    outputs = llm.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False
    )
    return [(o.outputs[0].token_ids, o.outputs[0].text) for o in outputs]


@pytest.fixture(scope="module")
def tokenizer(serving_checkpoint):
    from pagedserve.tokenizer.tokenizer import load_tokenizer

    return load_tokenizer(serving_checkpoint)


def _greedy(max_tokens: int = MAX_TOKENS, **extra) -> str:
    return json.dumps({"temperature": "0", "max_tokens": str(max_tokens), **extra})


def test_grpc_stream_equals_in_process_greedy(triton_server, reference):
    stream = GrpcStream(triton_server.grpc_url)
    try:
        ids = [
            stream.send("llm", [
                tensor("text_input", prompt),
                tensor("stream", True),
                tensor("sampling_parameters", _greedy()),
                tensor("return_num_input_tokens", True),
                tensor("return_finish_reason", True),
            ])
            for prompt in PROMPTS
        ]
        results = stream.collect(ids)
    finally:
        stream.close()
    for rid, (ref_ids, ref_text) in zip(ids, reference):
        result = results[rid]
        assert result.error is None, result.error
        assert result.ids() == ref_ids
        assert result.text() == ref_text
        # Streamed: a response per step, except that deltas queued behind a slow sender are
        # merged (never split, never dropped); the final flag rides on the last one.
        assert 1 < len(result.responses) <= len(ref_ids)
        reasons = [r["finish_reason"][0].decode() for r in result.responses]
        assert reasons[:-1] == ["None"] * (len(reasons) - 1)
        assert reasons[-1] in ("length", "stop")
        assert all(int(r["num_input_tokens"][0]) > 0 for r in result.responses)


def test_http_generate_and_generate_stream(triton_server, reference):
    prompt, (ref_ids, ref_text) = PROMPTS[1], reference[1]
    # Sampling fields as top-level keys become request parameters: vllm_backend's fallback.
    r = requests.post(
        f"{triton_server.http_url}/v2/models/llm/generate",
        json={"text_input": prompt, "temperature": 0, "max_tokens": MAX_TOKENS,
              "return_num_output_tokens": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text_output"] == prompt + ref_text  # the prompt is prepended by default
    assert body["num_output_tokens"] == len(ref_ids)

    r = requests.post(
        f"{triton_server.http_url}/v2/models/llm/generate_stream",
        json={"text_input": prompt, "stream": True, "sampling_parameters": _greedy()},
        stream=True,
        timeout=60,
    )
    assert r.status_code == 200
    events = sse_events(r)
    assert all("error" not in e for e in events), events
    assert "".join(e["text_output"] for e in events) == ref_text
    assert sse_token_ids(events) == ref_ids
    assert 1 < len(events) <= len(ref_ids)  # merged only while the sender lags


def test_input_ids_prompt_and_postprocessing(triton_server, reference, tokenizer):
    """input_ids replaces text_input; postprocessing turns output_ids back into text."""
    prompt_ids = tokenizer(PROMPTS[0]).input_ids
    stream = GrpcStream(triton_server.grpc_url)
    try:
        rid = stream.send("llm", [
            tensor("input_ids", prompt_ids),
            tensor("exclude_input_in_output", True),
            tensor("sampling_parameters", _greedy()),
        ])
        result = stream.collect([rid])[rid]
    finally:
        stream.close()
    assert result.error is None, result.error
    assert len(result.responses) == 1  # not streamed: one response
    assert result.ids() == reference[0][0]
    assert result.text() == reference[0][1]

    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{triton_server.http_port}")
    ids = httpclient.InferInput("output_ids", [len(result.ids())], "INT32")
    ids.set_data_from_numpy(np.array(result.ids(), dtype=np.int32))
    try:
        decoded = client.infer("postprocessing", [ids]).as_numpy("text_output")[0].decode()
    finally:
        client.close()
    assert decoded == tokenizer.decode(result.ids(), skip_special_tokens=True)


def test_genai_perf_vllm_payload(triton_server):
    """genai-perf --backend vllm: text_input, exclude_input_in_output, stream, and
    sampling_parameters whose values are strings."""
    stream = GrpcStream(triton_server.grpc_url)
    try:
        rid = stream.send("llm", [
            tensor("text_input", PROMPTS[0]),
            tensor("exclude_input_in_output", True),
            tensor("stream", True),
            tensor("sampling_parameters", '{"max_tokens": "16", "min_tokens": "16"}'),
        ])
        result = stream.collect([rid])[rid]
    finally:
        stream.close()
    assert result.error is None, result.error
    assert result.final_seen
    assert len(result.ids()) == 16
    assert 1 < len(result.responses) <= 16  # streamed; merged only while the sender lags


def _naive_concat(tokenizer, deltas: list[list[int]]) -> str:
    """What a stateless per-response postprocessing would stream: each delta decoded alone."""
    return "".join(tokenizer.decode(d, skip_special_tokens=True) for d in deltas)


def test_ensemble_stream_text_equals_non_streamed(triton_server, tokenizer):
    def ensemble(prompt: str, stream_it: bool) -> list[str]:
        stream = GrpcStream(triton_server.grpc_url)
        try:
            rid = stream.send("ensemble", [
                tensor("text_input", prompt, batch=True),
                tensor("max_tokens", 40, batch=True),
                tensor("temperature", 0.0, batch=True),
                tensor("stream", stream_it, batch=True),
                tensor("exclude_input_in_output", True, batch=True),
                tensor("return_num_input_tokens", True, batch=True),
                tensor("return_num_output_tokens", True, batch=True),
            ])
            result = stream.collect([rid])[rid]
        finally:
            stream.close()
        assert result.error is None, result.error
        assert sum(int(r["num_output_tokens"].sum()) for r in result.responses) == 40
        assert all(int(r["num_input_tokens"].sum()) > 0 for r in result.responses)
        return result.texts()

    garbled_somewhere = multibyte_somewhere = False
    for prompt in PROMPTS:
        deltas = ensemble(prompt, True)
        (full,) = ensemble(prompt, False)
        assert 1 < len(deltas) <= 40  # merged only while the sender lags
        assert "".join(deltas) == full
        # The same request on the llm model directly: same tokens, same text.
        stream = GrpcStream(triton_server.grpc_url)
        try:
            rid = stream.send("llm", [
                tensor("text_input", prompt), tensor("stream", True),
                tensor("sampling_parameters", _greedy(40)),
            ])
            direct = stream.collect([rid])[rid]
        finally:
            stream.close()
        assert direct.text() == full
        naive = _naive_concat(tokenizer, [list(r["output_ids"]) for r in direct.responses])
        garbled_somewhere |= naive != full
        multibyte_somewhere |= any(ord(ch) > 127 and ch != "\ufffd" for ch in full)
        assert " " in full
    # The comparison above is meaningful: the texts hold multi-byte characters, and decoding
    # each delta alone (stateless postprocessing) loses spaces or bytes.
    assert multibyte_somewhere
    assert garbled_somewhere
