"""Bad input of every kind, over gRPC streams, HTTP generate / generate_stream, the llm model,
tensorrt_llm_bls and the ensemble: each gets a client error that names the problem, then a
good request over the same way gets the same greedy text, and no KV block is left in use.
Plus what must be accepted (a stop string that looks like JSON, the generate extension's own
example with an "id").

gRPC requests go one per stream opened with ``triton_grpc_error: true``, so the error's gRPC
status is checked too (a plain stream carries only the message).
"""

from __future__ import annotations

import json
import queue
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from serving_client import sse_events, tensor, wait_for_metrics

pytestmark = pytest.mark.triton_server

PROMPT = "Bad input, then"
GOOD = {"temperature": 0, "max_tokens": 8}
KV, RUNNING = "vllm:kv_cache_usage_perc", "vllm:num_requests_running"
# Triton 2.51's HTTP frontend answers JSON it cannot parse (a body that is not an object, a
# text_input that is not a string) with 500 before any model sees the request.
FRONTEND_JSON = {"400", "500"}
# A request Triton itself rejects (wrong data type or shape) is answered on a gRPC stream
# without a gRPC status in 2.51, even with triton_grpc_error: the message names the input.
CORE = {"INVALID_ARGUMENT", "None"}


@dataclass
class Answer:
    """What a client saw: an error (status, message) or the text."""

    status: str
    message: str = ""
    text: Optional[str] = None


# ---- transports -------------------------------------------------------------------------------

def grpc(server, model: str, inputs: list) -> Answer:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)),
                        headers={"triton_grpc_error": "true"})
    text = []
    try:
        client.async_stream_infer(model, inputs)
        while True:
            result, error = received.get(timeout=60)
            if error is not None:
                return Answer(str(error.status()).removeprefix("StatusCode."), error.message())
            text.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                return Answer("OK", text="".join(text))
    finally:
        client.stop_stream()
        client.close()


def http(server, model: str, body: str, endpoint: str = "generate") -> Answer:
    with requests.post(f"{server.http_url}/v2/models/{model}/{endpoint}", data=body,
                       headers={"Content-Type": "application/json"}, timeout=60,
                       stream=True) as r:
        if r.headers.get("Content-Type", "").startswith("text/event-stream"):
            events = sse_events(r)  # generate_stream: errors are events too, on a 400
            errors = [e["error"] for e in events if "error" in e]
            if errors or r.status_code != 200:
                return Answer(str(r.status_code), errors[0] if errors else r.text)
            return Answer("200", text="".join(e["text_output"] for e in events))
        if r.status_code != 200:
            return Answer(str(r.status_code), r.json().get("error", r.text))
        return Answer("200", text=r.json()["text_output"])


def _llm_inputs(**sampling) -> list:
    return [tensor("text_input", PROMPT), tensor("exclude_input_in_output", True),
            tensor("sampling_parameters", json.dumps(sampling))]


def _trtllm_inputs(drop: tuple[str, ...] = (), **fields) -> list:
    values = {"text_input": PROMPT, "max_tokens": GOOD["max_tokens"],
              "exclude_input_in_output": True, **fields}
    return [tensor(name, value, batch=True) for name, value in values.items()
            if name not in drop]


def _body(**fields) -> str:
    return json.dumps({"text_input": PROMPT, "exclude_input_in_output": True, **fields})


# ---- the good request of each way in ------------------------------------------------------------

GOOD_REQUESTS: dict[str, Callable] = {
    "grpc llm": lambda s: grpc(s, "llm", _llm_inputs(**GOOD)),
    "http llm": lambda s: http(s, "llm", _body(**GOOD)),
    "sse llm": lambda s: http(s, "llm", _body(stream=True, **GOOD), "generate_stream"),
    "grpc tensorrt_llm_bls": lambda s: grpc(s, "tensorrt_llm_bls", _trtllm_inputs()),
    "grpc ensemble": lambda s: grpc(s, "ensemble", _trtllm_inputs()),
    "http ensemble": lambda s: http(s, "ensemble", _body(max_tokens=GOOD["max_tokens"])),
    "grpc preprocessing": lambda s: grpc(s, "llm", _llm_inputs(**GOOD)),
    "grpc postprocessing": lambda s: grpc(s, "llm", _llm_inputs(**GOOD)),
}


def _ids(values) -> np.ndarray:
    return np.array(values, dtype=np.int32)


# (name, way in, send the bad request, accepted statuses, what the message must name)
CASES: list[tuple[str, str, Callable, set, str]] = [
    # -- the llm model over gRPC streams
    ("sampling not JSON", "grpc llm", lambda s: grpc(s, "llm", [
        tensor("text_input", PROMPT), tensor("sampling_parameters", '{"max_tokens": 4')]),
     {"INVALID_ARGUMENT"}, "not valid JSON"),
    ("sampling a JSON list", "grpc llm", lambda s: grpc(s, "llm", [
        tensor("text_input", PROMPT), tensor("sampling_parameters", "[1, 2]")]),
     {"INVALID_ARGUMENT"}, "JSON object"),
    ("unknown sampling field", "grpc llm", lambda s: grpc(s, "llm", _llm_inputs(foo=1)),
     {"INVALID_ARGUMENT"}, "'foo'"),
    ("negative temperature", "grpc llm", lambda s: grpc(s, "llm", _llm_inputs(temperature=-1)),
     {"INVALID_ARGUMENT"}, "temperature"),
    ("NaN temperature", "grpc llm", lambda s: grpc(s, "llm", _llm_inputs(temperature="nan")),
     {"INVALID_ARGUMENT"}, "temperature"),
    ("top_p above 1", "grpc llm", lambda s: grpc(s, "llm", _llm_inputs(top_p=2)),
     {"INVALID_ARGUMENT"}, "top_p"),
    ("seed beyond 64 bits", "grpc llm", lambda s: grpc(s, "llm", _llm_inputs(seed=2**64)),
     {"INVALID_ARGUMENT"}, "seed"),
    ("n above its cap", "grpc llm", lambda s: grpc(s, "llm", _llm_inputs(n=10000)),
     {"INVALID_ARGUMENT"}, "max_num_seqs"),
    ("logprobs above max_logprobs", "grpc llm", lambda s: grpc(s, "llm", _llm_inputs(logprobs=21)),
     {"INVALID_ARGUMENT"}, "max_logprobs"),
    ("max_tokens 0", "grpc llm", lambda s: grpc(s, "llm", _llm_inputs(max_tokens=0)),
     {"INVALID_ARGUMENT"}, "max_tokens"),
    ("LoRA adapter asked for", "grpc llm", lambda s: grpc(s, "llm", _llm_inputs(lora_name="x")),
     {"INVALID_ARGUMENT"}, "LoRA"),
    ("no prompt", "grpc llm", lambda s: grpc(s, "llm", [tensor("stream", True)]),
     {"INVALID_ARGUMENT"}, "no prompt"),
    ("text_input and input_ids", "grpc llm", lambda s: grpc(s, "llm", [
        tensor("text_input", PROMPT), tensor("input_ids", _ids([1, 2]))]),
     {"INVALID_ARGUMENT"}, "not both"),
    ("input_ids outside the vocabulary", "grpc llm", lambda s: grpc(s, "llm", [
        tensor("input_ids", _ids([1, 10**6]))]), {"INVALID_ARGUMENT"}, "vocabulary"),
    ("input_ids empty", "grpc llm", lambda s: grpc(s, "llm", [
        tensor("input_ids", _ids([]).reshape(0))]), {"INVALID_ARGUMENT"}, "input_ids"),
    ("prompt too long", "grpc llm", lambda s: grpc(s, "llm", [
        tensor("text_input", "hello " * 5000)]), {"INVALID_ARGUMENT"}, "too long"),
    ("text_input not UTF-8", "grpc llm", lambda s: grpc(s, "llm", [
        tensor("text_input", b"\xff\xfe")]), {"INVALID_ARGUMENT"}, "UTF-8"),
    ("text_input as INT32", "grpc llm", lambda s: grpc(s, "llm", [
        tensor("text_input", 5)]), CORE, "text_input"),
    ("two prompts in text_input", "grpc llm", lambda s: grpc(s, "llm", [
        tensor("text_input", ["a", "b"])]), CORE, "text_input"),
    ("streaming with the prompt echoed", "grpc llm", lambda s: grpc(s, "llm", [
        tensor("text_input", PROMPT), tensor("stream", True),
        tensor("exclude_input_in_output", False)]),
     {"INVALID_ARGUMENT"}, "exclude_input_in_output"),
    # -- the llm model over HTTP generate
    ("body is a JSON array", "http llm", lambda s: http(s, "llm", '[{"text_input": "hi"}]'),
     FRONTEND_JSON, "non-object"),
    ("malformed JSON", "http llm", lambda s: http(s, "llm", '{"text_input": "hi", '),
     FRONTEND_JSON, "JSON"),
    ("text_input a number", "http llm", lambda s: http(s, "llm", '{"text_input": 5}'),
     FRONTEND_JSON, "non-string"),
    ("text_input an object", "http llm", lambda s: http(s, "llm", '{"text_input": {"a": 1}}'),
     FRONTEND_JSON, "non-string"),
    ("text_input a list of two", "http llm", lambda s: http(s, "llm",
                                                             '{"text_input": ["a", "b"]}'),
     {"400"}, "text_input"),
    ("unknown top-level field", "http llm", lambda s: http(s, "llm", _body(bogus_field=3)),
     {"400"}, "'bogus_field'"),
    ("temperature as a negative string", "http llm",
     lambda s: http(s, "llm", _body(temperature="-1")), {"400"}, "temperature"),
    ("top_k not a number", "http llm", lambda s: http(s, "llm", _body(top_k="x")),
     {"400"}, "top_k"),
    ("empty prompt", "http llm", lambda s: http(s, "llm", _body(text_input="")),
     {"400"}, "empty"),
    ("stream with the prompt echoed", "http llm",
     lambda s: http(s, "llm", _body(stream=True, exclude_input_in_output=False)),
     {"400"}, "exclude_input_in_output"),
    # -- the llm model over HTTP generate_stream
    ("SSE: top_p above 1", "sse llm", lambda s: http(
        s, "llm", _body(stream=True, top_p=2), "generate_stream"), {"400"}, "top_p"),
    ("SSE: no prompt", "sse llm", lambda s: http(
        s, "llm", '{"stream": true}', "generate_stream"), {"400"}, "no prompt"),
    ("SSE: malformed JSON", "sse llm", lambda s: http(
        s, "llm", '{"text_input": ', "generate_stream"), FRONTEND_JSON, "JSON"),
    ("SSE: body is a JSON array", "sse llm", lambda s: http(
        s, "llm", "[1, 2]", "generate_stream"), FRONTEND_JSON, "non-object"),
    ("SSE: seed beyond 64 bits", "sse llm", lambda s: http(
        s, "llm", _body(stream=True, seed=2**64), "generate_stream"),
     {"400"}, "seed"),
    # -- tensorrt_llm_bls over gRPC streams
    ("BLS: no max_tokens", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(drop=("max_tokens",))),
     {"INVALID_ARGUMENT"}, "'max_tokens' is required"),
    ("BLS: no text_input", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(drop=("text_input",))),
     {"INVALID_ARGUMENT"}, "'text_input' is required"),
    ("BLS: empty text_input", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(text_input="")),
     {"INVALID_ARGUMENT"}, "'text_input' is empty"),
    ("BLS: NaN temperature", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(temperature=float("nan"))),
     {"INVALID_ARGUMENT"}, "temperature"),
    ("BLS: negative temperature", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(temperature=-1.0)),
     {"INVALID_ARGUMENT"}, "temperature"),
    ("BLS: beam search", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(beam_width=4)),
     {"INVALID_ARGUMENT"}, "beam_width"),
    ("BLS: negative top_p", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(top_p=-0.5)), {"INVALID_ARGUMENT"}, "top_p"),
    ("BLS: end_id outside the vocabulary", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(end_id=10**6)), {"INVALID_ARGUMENT"}, "end_id"),
    ("BLS: min_tokens and min_length disagree", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(min_tokens=1, min_length=2)),
     {"INVALID_ARGUMENT"}, "min_length"),
    ("BLS: context logits asked for", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(return_context_logits=True)),
     {"INVALID_ARGUMENT"}, "return_context_logits"),
    ("BLS: bias words and weights differ in length", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(embedding_bias_words=["a", "b"],
                                              embedding_bias_weights=np.array([1.0],
                                                                             np.float32))),
     {"INVALID_ARGUMENT"}, "embedding_bias"),
    ("BLS: one bad item in a batch", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", [tensor("text_input", np.array([[b"a"], [b""]], dtype=object)),
                                tensor("max_tokens", np.array([[4], [4]], dtype=np.int32))]),
     {"INVALID_ARGUMENT"}, "batch item 1"),
    ("BLS: text_input as INT32", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", [tensor("text_input", 5, batch=True),
                                tensor("max_tokens", 4, batch=True)]),
     CORE, "text_input"),
    ("BLS: no return sequences", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(num_return_sequences=0)),
     {"INVALID_ARGUMENT"}, "SamplingParams.n"),
    ("BLS: prompt too long", "grpc tensorrt_llm_bls", lambda s: grpc(
        s, "tensorrt_llm_bls", _trtllm_inputs(text_input="hello " * 5000)),
     {"INVALID_ARGUMENT"}, "too long"),
    # -- the ensemble, over gRPC streams (no silence) and HTTP
    ("ensemble: no max_tokens", "grpc ensemble", lambda s: grpc(
        s, "ensemble", _trtllm_inputs(drop=("max_tokens",))),
     {"INVALID_ARGUMENT"}, "'max_tokens' is required"),
    ("ensemble: no text_input", "grpc ensemble", lambda s: grpc(
        s, "ensemble", _trtllm_inputs(drop=("text_input",))),
     {"INVALID_ARGUMENT"}, "'text_input' is required"),
    ("ensemble: NaN temperature", "grpc ensemble", lambda s: grpc(
        s, "ensemble", _trtllm_inputs(temperature=float("nan"))),
     {"INVALID_ARGUMENT"}, "temperature"),
    ("ensemble: negative temperature", "grpc ensemble", lambda s: grpc(
        s, "ensemble", _trtllm_inputs(temperature=-2.0)), {"INVALID_ARGUMENT"}, "temperature"),
    ("ensemble: top_k below -1", "grpc ensemble", lambda s: grpc(
        s, "ensemble", _trtllm_inputs(top_k=-5)), {"INVALID_ARGUMENT"}, "top_k"),
    ("ensemble: max_tokens 0", "grpc ensemble", lambda s: grpc(
        s, "ensemble", _trtllm_inputs(max_tokens=0)), {"INVALID_ARGUMENT"}, "max_tokens"),
    ("ensemble over HTTP: no max_tokens", "http ensemble", lambda s: http(
        s, "ensemble", json.dumps({"text_input": PROMPT})), {"400"}, "'max_tokens' is required"),
    # -- the helper models
    ("preprocessing: empty text_input", "grpc preprocessing", lambda s: grpc(
        s, "preprocessing", [tensor("text_input", ""), tensor("max_tokens", 4)]),
     {"INVALID_ARGUMENT"}, "'text_input' is empty"),
    ("postprocessing: ids outside the vocabulary", "grpc postprocessing", lambda s: grpc(
        s, "postprocessing", [tensor("output_ids", _ids([3, 10**6]))]),
     {"INVALID_ARGUMENT"}, "output_ids"),
]


@pytest.fixture(scope="module")
def reference(triton_server) -> str:
    answer = GOOD_REQUESTS["grpc llm"](triton_server)
    assert answer.status == "OK", answer
    return answer.text


def test_the_table_is_broad():
    assert len(CASES) >= 40
    assert len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "way", "send", "statuses", "named"), CASES,
                         ids=[case[0] for case in CASES])
def test_bad_input_is_a_client_error_then_the_same_text(
    triton_server, reference, name, way, send, statuses, named
):
    answer = send(triton_server)
    assert answer.status in statuses and named in answer.message, answer
    good = GOOD_REQUESTS[way](triton_server)
    assert good.status in ("OK", "200") and good.text == reference, good
    values = wait_for_metrics(triton_server.metrics_url,
                              lambda m: m.get(RUNNING) == 0 and m.get(KV) == 0)
    assert values.get(RUNNING) == 0 and values.get(KV) == 0, values


# ---- what must be accepted ----------------------------------------------------------------------

def test_a_stop_string_that_looks_like_json_is_a_stop_string(triton_server, reference):
    stop = reference[3:6]
    expected = reference[: reference.index(stop)]
    for answer in (
        grpc(triton_server, "llm", _llm_inputs(stop="[INST]", **GOOD)),
        http(triton_server, "llm", _body(stop="[INST]", **GOOD)),
        grpc(triton_server, "tensorrt_llm_bls", _trtllm_inputs(stop_words=["[INST]"])),
    ):
        assert answer.text == reference, answer  # "[INST]" never comes: the full text
    answer = http(triton_server, "llm", _body(stop=stop, **GOOD))
    assert answer.text == expected, answer


def test_the_generate_extensions_own_example_with_an_id(triton_server, reference):
    """Triton's generate extension documents {"id": ..., "text_input": ...,
    "parameters": {...}}; Triton forwards "id" as a request parameter, which is no sampling
    field and must be ignored."""
    body = json.dumps({"id": "42", "text_input": PROMPT,
                       "parameters": {"exclude_input_in_output": True, **GOOD}})
    answer = http(triton_server, "llm", body)
    assert answer.status == "200" and answer.text == reference, answer
