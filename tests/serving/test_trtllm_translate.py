"""TensorRT-LLM's request fields and responses, without a server (pagedserve.serving.trtllm,
pagedserve.serving.trtllm_outputs)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from pagedserve import SamplingParams
from pagedserve.serving.abort_channel import (
    ABORT_PARAMETER,
    AbortRegistry,
    abort_target,
    new_request_id,
)
from pagedserve.serving.contract import InvalidRequest
from pagedserve.serving.trtllm import (
    TrtllmTranslator,
    batch_size,
    resolve_tokenizer_dir,
    split_batch,
)
from pagedserve.serving.trtllm_outputs import TrtllmResponses, is_final, llm_inputs

HAS_BAD_WORDS = "bad_words" in {f.name for f in dataclasses.fields(SamplingParams)}


class _Tokenizer:
    """Token ids are the characters' code points; 1 is BOS."""

    def __len__(self) -> int:
        return 1000

    def __call__(self, text, add_special_tokens=True):
        ids = ([1] if add_special_tokens else []) + [ord(c) % 1000 for c in text]
        return type("Encoding", (), {"input_ids": ids})()


@pytest.fixture
def translator():
    return TrtllmTranslator(_Tokenizer())


def _s(*words: str) -> np.ndarray:
    return np.array([w.encode() for w in words], dtype=np.object_)


def _i(value: int) -> np.ndarray:
    return np.array([value], dtype=np.int32)


def _f(value: float) -> np.ndarray:
    return np.array([value], dtype=np.float32)


BASE = {"text_input": _s("hi"), "max_tokens": _i(8)}


def test_no_top_k_or_top_p_is_greedy_whatever_the_temperature(translator):
    assert translator.sampling_parameters({**BASE, "temperature": _f(0.7)}) == {
        "max_tokens": 8, "temperature": 0.0}
    assert translator.sampling_parameters({**BASE, "top_k": _i(0), "top_p": _f(0.0)}) == {
        "max_tokens": 8, "temperature": 0.0}


def test_top_k_or_top_p_samples(translator):
    assert translator.sampling_parameters({**BASE, "top_k": _i(5)}) == {
        "max_tokens": 8, "temperature": 1.0, "top_k": 5}
    values = translator.sampling_parameters({**BASE, "top_p": _f(0.5), "temperature": _f(0.7)})
    assert values["top_p"] == 0.5 and values["temperature"] == pytest.approx(0.7)


def test_fields_map_to_sampling_parameters(translator):
    values = translator.sampling_parameters({
        **BASE,
        "min_length": _i(4),
        "seed": np.array([7], dtype=np.uint64),
        "num_return_sequences": _i(2),
        "stop_words": _s("", "\n\n"),
        "pad_id": _i(0),
        "length_penalty": _f(1.5),
        "beam_width": _i(1),
        "return_log_probs": np.array([True]),
    })
    assert values == {"max_tokens": 8, "min_tokens": 4, "seed": 7, "n": 2, "temperature": 0.0,
                      "stop": ["\n\n"], "logprobs": 0}


def test_end_id_replaces_eos(translator):
    assert translator.sampling_parameters({**BASE, "end_id": _i(2)}) == {
        "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "stop_token_ids": [2]}
    assert translator.sampling_parameters({**BASE, "end_id": _i(-1)}) == {
        "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def test_bad_words_and_embedding_bias(translator):
    """bad_words pass on as SamplingParams.bad_words; each embedding bias weight is added to
    the logit bias of each token of its word (empty words are padding)."""
    tensors = {**BASE, "bad_words": _s("ab", ""), "embedding_bias_words": _s("ab", "b", ""),
               "embedding_bias_weights": np.array([1.5, 2.0, 0.0], dtype=np.float32)}
    assert translator._logit_bias(tensors) == {ord("a"): 1.5, ord("b"): 3.5}
    if HAS_BAD_WORDS:
        values = translator.sampling_parameters(tensors)
        assert values["bad_words"] == ["ab"]
        assert values["logit_bias"] == {ord("a"): 1.5, ord("b"): 3.5}
    else:  # before the engine has them, a clear error naming the field
        with pytest.raises(InvalidRequest, match="'bad_words'"):
            translator.sampling_parameters(tensors)
    with pytest.raises(InvalidRequest, match="same length"):
        translator._logit_bias({"embedding_bias_words": _s("a"),
                                "embedding_bias_weights": np.zeros(2, dtype=np.float32)})


@pytest.mark.parametrize(("change", "named"), [
    ({"beam_width": _i(2)}, "'beam_width' must be 1"),
    ({"top_p": _f(-0.5)}, "'top_p'"),
    ({"top_p": _f(2.0)}, "top_p"),
    ({"top_k": _i(-3)}, "top_k"),
    ({"temperature": _f(float("nan"))}, "'temperature' must be a finite number"),
    ({"temperature": _f(-1.0)}, "temperature"),
    ({"repetition_penalty": _f(float("inf"))}, "'repetition_penalty' must be a finite"),
    ({"end_id": _i(1000)}, "'end_id'"),
    ({"end_id": _i(-2)}, "'end_id'"),
    ({"min_tokens": _i(1), "min_length": _i(2)}, "min_length"),
    ({"max_tokens": _i(0)}, "max_tokens"),
    ({"num_return_sequences": _i(0)}, "SamplingParams.n"),
    ({"return_context_logits": np.array([True])}, "'return_context_logits' = true"),
    ({"max_tokens": np.array([1, 2], dtype=np.int32)}, "exactly one element"),
])
def test_bad_fields_name_the_input(translator, change, named):
    with pytest.raises(InvalidRequest, match=named):
        translator.translate({**BASE, **change})


def test_prompt_is_required_and_not_empty(translator):
    with pytest.raises(InvalidRequest, match="'text_input' is required"):
        translator.translate({"max_tokens": _i(4)})
    with pytest.raises(InvalidRequest, match="'max_tokens' is required"):
        translator.translate({"text_input": _s("hi")})
    with pytest.raises(InvalidRequest, match="'text_input' is empty"):
        translator.translate({**BASE, "text_input": _s("")})
    with pytest.raises(InvalidRequest, match="UTF-8"):
        translator.translate({**BASE, "text_input": np.array([b"\xff"], dtype=np.object_)})


def test_batches_split_per_item():
    tensors = {"text_input": np.array([[b"a"], [b"b"]], dtype=np.object_),
               "max_tokens": np.array([[1], [2]], dtype=np.int32)}
    assert batch_size(tensors) == 2
    items = split_batch(tensors)
    assert [i["max_tokens"].tolist() for i in items] == [[1], [2]]
    with pytest.raises(InvalidRequest, match="batch size"):
        batch_size({"text_input": np.zeros((2, 1)), "max_tokens": np.zeros((1, 1))})


def test_streaming_asks_the_llm_for_deltas_only(translator):
    request = translator.translate({**BASE, "stream": np.array([True]),
                                    "return_log_probs": np.array([True])})
    inputs = llm_inputs(request)
    assert inputs["exclude_input_in_output"].tolist() == [True]
    assert inputs["text_input"].tolist() == [b"hi"]
    assert json.loads(inputs["sampling_parameters"][0]) == {
        "max_tokens": 8, "temperature": 0.0, "logprobs": 0}
    assert inputs["return_logprobs"].tolist() == [True]


def _llm(texts, counts, reasons, logprobs=None):
    out = {
        "text_output": np.array([t.encode() for t in texts], dtype=np.object_),
        "num_output_tokens": np.array(counts, dtype=np.uint32),
        "finish_reason": np.array([str(r).encode() for r in reasons], dtype=np.object_),
        "num_input_tokens": np.array([3], dtype=np.uint32),
    }
    if logprobs is not None:
        out["logprobs"] = np.array([json.dumps(lp).encode() for lp in logprobs], dtype=object)
        out["cumulative_logprob"] = np.array([-1.0] * len(texts), dtype=np.float32)
    return out


def test_responses_one_per_completion_with_trtllm_shapes(translator):
    request = translator.translate({**BASE, "num_return_sequences": _i(2), "top_k": _i(5),
                                    "stream": np.array([True]),
                                    "return_num_output_tokens": np.array([True]),
                                    "return_log_probs": np.array([True])})
    responses = TrtllmResponses(request, batch_index=1)
    step = _llm(["a", ""], [1, 0], [None, None],
                [[{"97": {"logprob": -0.5, "rank": 1, "decoded_token": "a"}}], []])
    (first,) = responses.convert(step)
    assert not is_final(step)
    assert first["text_output"].tolist() == [b"a"] and first["text_output"].shape == (1,)
    assert first["sequence_index"].tolist() == [[0]] and first["batch_index"].tolist() == [[1]]
    assert first["num_output_tokens"].dtype == np.int32
    assert first["output_log_probs"].shape == (1, 1, 1)
    last = _llm(["", "b"], [0, 1], ["length", "length"],
                [[], [{"98": {"logprob": -0.25, "rank": 1, "decoded_token": "b"}}]])
    (second,) = responses.convert(last)
    assert is_final(last) and second["sequence_index"].tolist() == [[1]]


def test_non_streamed_text_has_the_prompt_in_front_unless_excluded(translator):
    request = translator.translate(BASE)
    (out,) = TrtllmResponses(request, None).convert(_llm([" there"], [2], ["stop"]))
    assert out["text_output"].tolist() == [b"hi there"]
    assert "batch_index" not in out and "sequence_index" not in out
    request = translator.translate({**BASE, "exclude_input_in_output": np.array([True])})
    (out,) = TrtllmResponses(request, None).convert(_llm([" there"], [2], ["stop"]))
    assert out["text_output"].tolist() == [b" there"]


def test_a_client_that_does_not_stream_gets_the_gathered_deltas(translator):
    """The llm always streams to tensorrt_llm_bls; without streaming its client gets one
    response per completion at the end, with everything."""
    request = translator.translate({**BASE, "num_return_sequences": _i(2), "top_k": _i(5),
                                    "return_num_output_tokens": np.array([True]),
                                    "return_log_probs": np.array([True])})
    responses = TrtllmResponses(request, batch_index=None)

    def lp(token, value):
        return [{str(token): {"logprob": value, "rank": 1, "decoded_token": "x"}}]

    assert responses.convert(_llm(["a", "b"], [1, 1], [None, None],
                                  [lp(97, -0.5), lp(98, -1.0)])) == []
    first, second = responses.convert(_llm([" c", ""], [1, 0], ["length", "stop"],
                                           [lp(99, -0.25), []]))
    assert first["text_output"].tolist() == [b"hia c"]  # the prompt in front, then both deltas
    assert second["text_output"].tolist() == [b"hib"]
    assert first["num_output_tokens"].tolist() == [[2]]
    assert first["output_log_probs"].tolist() == [[[-0.5, -0.25]]]
    assert [r["sequence_index"].tolist() for r in (first, second)] == [[[0]], [[1]]]


def test_a_final_llm_response_without_news_still_yields_the_final_response(translator):
    request = translator.translate({**BASE, "stream": np.array([True])})
    (out,) = TrtllmResponses(request, None).convert(_llm([""], [0], ["stop"]))
    assert out["text_output"].tolist() == [b""]


def test_abort_channel():
    rid = new_request_id()
    assert abort_target(json.dumps({ABORT_PARAMETER: rid})) == rid
    assert abort_target('{"max_tokens": 4}') is None
    assert abort_target(f'{{"{ABORT_PARAMETER}": 5}}') is None
    registry = AbortRegistry()

    class State:
        pass

    state = State()
    assert registry.register(rid, state)
    assert not registry.register("chosen-by-a-client", State())
    assert len(registry) == 1
    assert registry.pop(rid) is state and registry.pop(rid) is None
    registry.register(rid, state)
    del state  # the request ended: its entry goes with it
    assert len(registry) == 0


def test_tokenizer_dir_follows_a_model_json(tmp_path):
    (tmp_path / "llm" / "1" / "ckpt").mkdir(parents=True)
    (tmp_path / "llm" / "1" / "model.json").write_text('{"model": "ckpt"}')
    (tmp_path / "pre").mkdir()
    expected = (tmp_path / "llm" / "1" / "ckpt").resolve()
    assert resolve_tokenizer_dir("../llm/1", str(tmp_path / "pre")) == expected
    assert resolve_tokenizer_dir("../llm/1/ckpt", str(tmp_path / "pre")) == expected
    (tmp_path / "llm" / "1" / "model.json").write_text('{"model": "org/not-cached"}')
    with pytest.raises(ValueError, match="'org/not-cached'.*local Hugging Face cache"):
        resolve_tokenizer_dir("../llm/1", str(tmp_path / "pre"))


def test_the_bls_tokenizer_agrees_with_hf(serving_checkpoint):
    """tensorrt_llm_bls tokenizes words with the tokenizers library alone; its ids and
    vocabulary are the HF tokenizer's."""
    from pagedserve.serving.trtllm import RustTokenizer
    from pagedserve.tokenizer.tokenizer import load_tokenizer

    hf, rust = load_tokenizer(serving_checkpoint), RustTokenizer(serving_checkpoint)
    assert len(rust) == len(hf)
    for word in ("the", " hello", "Grüße 東京 🚀", "[INST]"):
        for special in (False, True):
            assert (rust(word, add_special_tokens=special).input_ids
                    == hf(word, add_special_tokens=special).input_ids)
