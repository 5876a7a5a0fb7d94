"""The tensor contract without a server: request parsing, response tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pagedserve import CompletionOutput, Logprob, RequestOutput, RequestOutputKind
from pagedserve.serving.contract import InvalidRequest, parse_request
from pagedserve.serving.metrics import build_1_2_5_buckets
from pagedserve.serving.responses import ResponseBuilder


def _s(text: str) -> np.ndarray:
    return np.array([text.encode()], dtype=np.object_)


def _b(value: bool) -> np.ndarray:
    return np.array([value])


def test_vllm_defaults_prepend_the_prompt_only_without_streaming():
    plain = parse_request({"text_input": _s("hi")})
    assert plain.prompt == "hi" and not plain.stream and plain.prepend_input
    assert plain.params.output_kind == RequestOutputKind.FINAL_ONLY
    assert plain.params.max_tokens == 16
    streamed = parse_request({"text_input": _s("hi"), "stream": _b(True)})
    assert streamed.stream and not streamed.prepend_input
    assert streamed.params.output_kind == RequestOutputKind.DELTA


def test_sampling_parameters_take_strings_and_fall_back_to_request_parameters():
    parsed = parse_request({
        "text_input": _s("hi"),
        "sampling_parameters": _s('{"temperature": "0.7", "max_tokens": "8", "stop": "x"}'),
    })
    assert parsed.params.temperature == pytest.approx(0.7)
    assert parsed.params.max_tokens == 8 and parsed.params.stop == ["x"]
    fallback = parse_request(
        {"text_input": _s("hi")},
        json.dumps({"max_tokens": 3, "triton_enable_empty_final_response": True}),
    )
    assert fallback.params.max_tokens == 3


def test_input_ids_replace_text_input():
    parsed = parse_request({"input_ids": np.array([1, 5, 9], dtype=np.int32)})
    assert parsed.prompt == {"prompt_token_ids": [1, 5, 9]}


@pytest.mark.parametrize(
    "tensors, parameters, named",
    [
        ({}, "", "no prompt"),
        ({"text_input": _s("a"), "input_ids": np.array([1], dtype=np.int32)}, "", "not both"),
        ({"input_ids": np.array([], dtype=np.int32)}, "", "input_ids"),
        ({"text_input": np.array([b"\xff"], dtype=np.object_)}, "", "UTF-8"),
        ({"text_input": _s("a"), "sampling_parameters": _s("{")}, "", "not valid JSON"),
        ({"text_input": _s("a"), "sampling_parameters": _s("3")}, "", "JSON object"),
        ({"text_input": _s("a")}, '{"bogus": 1}', "'bogus'"),
        ({"text_input": _s("a"), "sampling_parameters": _s('{"top_k": "x"}')}, "", "top_k"),
        ({"text_input": _s("a"), "sampling_parameters": _s('{"top_p": 0}')}, "", "top_p"),
        ({"text_input": _s("a"), "sampling_parameters": _s('{"lora_name": "x"}')}, "", "LoRA"),
        ({"text_input": _s("a"), "stream": _b(True), "exclude_input_in_output": _b(False)},
         "", "exclude_input_in_output"),
    ],
)
def test_bad_requests_name_the_problem(tensors, parameters, named):
    with pytest.raises(InvalidRequest, match=named):
        parse_request(tensors, parameters)


def test_cumulative_logprob_alone_computes_but_does_not_return_logprobs():
    parsed = parse_request({"text_input": _s("a"), "return_cumulative_logprob": _b(True)})
    assert parsed.params.logprobs == 0 and not parsed.client_logprobs


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "<" + ",".join(map(str, ids)) + ">"


def _output(text, ids, finished, prompt="hi", reason=None, index=0):
    lp = [{t: Logprob(-0.5, 1, f"t{t}")} for t in ids]
    completion = CompletionOutput(index, text, ids, -0.5 * len(ids), lp, reason)
    return RequestOutput("r", prompt, [1, 2, 3], [completion], finished)


def test_streamed_responses_carry_deltas_and_requested_outputs():
    parsed = parse_request({
        "text_input": _s("hi"), "stream": _b(True),
        "return_finish_reason": _b(True), "return_num_input_tokens": _b(True),
        "return_num_output_tokens": _b(True), "return_logprobs": _b(True),
        "sampling_parameters": _s('{"logprobs": 1}'),
    })
    builder = ResponseBuilder(parsed, _Tokenizer(), frozenset({"text_output", "output_ids"}))
    first = builder.build(_output("Hel", [7, 8], False))
    last = builder.build(_output("lo é", [9], True, reason="length"))
    assert first["text_output"].tolist() == [b"Hel"]
    assert last["text_output"][0].decode() == "lo é"
    assert first["finish_reason"].tolist() == [b"None"]
    assert last["finish_reason"].tolist() == [b"length"]
    assert first["num_input_tokens"].tolist() == [3]
    assert first["num_output_tokens"].tolist() == [2] and last["num_output_tokens"].tolist() == [1]
    assert last["output_ids"].dtype == np.int32 and last["output_ids"].tolist() == [9]
    entry = json.loads(last["logprobs"][0])
    assert entry == [{"9": {"logprob": -0.5, "rank": 1, "decoded_token": "t9"}}]
    assert "cumulative_logprob" not in last


def test_prompt_logprobs_are_sent_with_their_flag():
    parsed = parse_request({
        "text_input": _s("hi"), "stream": _b(True), "return_prompt_logprobs": _b(True),
        "sampling_parameters": _s('{"prompt_logprobs": "1"}'),
    })
    assert parsed.params.prompt_logprobs == 1 and parsed.wants("return_prompt_logprobs")
    builder = ResponseBuilder(parsed, _Tokenizer(), frozenset({"text_output"}))
    first = _output("a", [7], False)
    first.prompt_logprobs = [None, {2: Logprob(-1.5, 3, "t2"), 5: Logprob(-0.25, 1, "t5")}]
    later = _output("b", [8], True, reason="length")
    later.prompt_logprobs = []
    sent = builder.build(first)["prompt_logprobs"]
    assert sent.shape == (1,) and json.loads(sent[0]) == [None, {
        "2": {"logprob": -1.5, "rank": 3, "decoded_token": "t2"},
        "5": {"logprob": -0.25, "rank": 1, "decoded_token": "t5"},
    }]
    assert builder.build(later)["prompt_logprobs"].tolist() == [b"[]"]
    unflagged = parse_request({"text_input": _s("hi"),
                               "sampling_parameters": _s('{"prompt_logprobs": 1}')})
    out = ResponseBuilder(unflagged, _Tokenizer(), frozenset({"text_output"})).build(first)
    assert "prompt_logprobs" not in out


def test_non_streamed_response_prepends_the_prompt():
    parsed = parse_request({"input_ids": np.array([1, 2, 3], dtype=np.int32)})
    builder = ResponseBuilder(parsed, _Tokenizer(), frozenset({"text_output"}))
    out = builder.build(_output(" world", [4], True, prompt=None, reason="stop"))
    assert out["text_output"].tolist() == [b"<1,2,3> world"]  # decoded ids: no prompt text
    assert "output_ids" not in out


def test_token_count_buckets():
    assert build_1_2_5_buckets(1024) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
