"""TensorRT-LLM clients unchanged, on both ``ensemble`` and ``tensorrt_llm_bls``: the requests
of TensorRT-LLM's end_to_end_grpc_client.py (trtllm_client.py) and genai-perf's tensorrtllm
payload, checked against the in-process engine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from serving_client import GrpcStream, tensor
from trtllm_client import run

from pagedserve import SamplingParams

pytestmark = pytest.mark.triton_server

MODELS = ["ensemble", "tensorrt_llm_bls"]
PROMPTS = ["The quick brown fox", "Grüße aus Köln: 東京 🚀"]
LEN = 12

HAS_BAD_WORDS = "bad_words" in {f.name for f in dataclasses.fields(SamplingParams)}
needs_h1 = pytest.mark.skipif(
    not HAS_BAD_WORDS,
    reason="SamplingParams.bad_words/logit_bias come with the h1-validation branch",
)


@pytest.fixture(scope="module")
def engine(serving_checkpoint):
    from pagedserve.entrypoints.llm import LLM

    return LLM(str(serving_checkpoint))


def _generate(engine, prompts, **params):
    outputs = engine.generate(prompts, SamplingParams(**params), use_tqdm=False)
    return [[c.text for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def greedy(engine):
    """The engine's greedy completion of each prompt, and its token ids."""
    outputs = engine.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=LEN), use_tqdm=False
    )
    return [(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in outputs]


@pytest.mark.parametrize("model", MODELS)
def test_default_request_is_greedy_and_echoes_the_prompt(triton_server, greedy, model):
    """The client's defaults: temperature 1.0 without top_k/top_p (TensorRT-LLM: greedy),
    exclude_input_in_output false (the prompt in front), not streamed."""
    result = run(triton_server.grpc_url, model, PROMPTS, output_len=LEN)
    assert not result.errors, result.errors
    assert result.texts == [[p + text] for p, (text, _) in zip(PROMPTS, greedy)]
    assert all(r["text_output"].shape == (1,) for r in result.responses)


@pytest.mark.parametrize("model", MODELS)
def test_streaming_without_exclude_input_streams_the_new_text(triton_server, greedy, model):
    """-S with exclude_input_in_output false: TensorRT-LLM streams the new tokens only."""
    result = run(triton_server.grpc_url, model, PROMPTS, output_len=LEN, streaming=True)
    assert not result.errors, result.errors
    assert result.texts == [[text] for text, _ in greedy]
    assert len(result.responses) > len(PROMPTS)  # streamed (merged only while a sender lags)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("streaming", [False, True])
def test_batched_inputs(triton_server, greedy, model, streaming):
    """--batch-inputs: one [2, 1] request; responses carry batch_index."""
    result = run(triton_server.grpc_url, model, PROMPTS, output_len=LEN, streaming=streaming,
                 batch_inputs=True, exclude_input_in_output=True)
    assert not result.errors, result.errors
    assert result.texts == [[text] for text, _ in greedy]
    assert {int(r["batch_index"][0][0]) for r in result.responses} == {0, 1}
    assert all(r["batch_index"].shape == (1, 1) for r in result.responses)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("streaming", [False, True])
def test_num_return_sequences(triton_server, engine, model, streaming):
    """-n 3 with sampling: one response per sequence (sequence_index), as the engine's n=3."""
    options = dict(output_len=LEN, num_return_sequences=3, top_k=20, seed=11,
                   exclude_input_in_output=True)
    result = run(triton_server.grpc_url, model, PROMPTS[:1], streaming=streaming, **options)
    assert not result.errors, result.errors
    expected = _generate(engine, PROMPTS[:1], n=3, top_k=20, seed=11, temperature=1.0,
                         max_tokens=LEN)
    assert result.texts == expected
    assert len(set(expected[0])) > 1  # the sequences differ: sampling took place
    assert {int(r["sequence_index"][0][0]) for r in result.responses} == {0, 1, 2}


@pytest.mark.parametrize("model", MODELS)
def test_beam_width_above_one_is_rejected(triton_server, model):
    result = run(triton_server.grpc_url, model, PROMPTS[:1], output_len=LEN, beam_width=2)
    assert len(result.errors) == 1 and not result.responses
    assert "'beam_width' must be 1" in result.errors[0].message()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("streaming", [False, True])
def test_log_probs(triton_server, engine, model, streaming):
    """--return-log-probs: cum_log_probs [1, 1] and output_log_probs [1, 1, tokens], the
    engine's log probabilities of the sampled tokens."""
    (ref,) = engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=LEN,
                                                         logprobs=0), use_tqdm=False)
    expected = [next(iter(lp.values())).logprob for lp in ref.outputs[0].logprobs]
    result = run(triton_server.grpc_url, model, PROMPTS[:1], output_len=LEN, streaming=streaming,
                 return_log_probs=True, outputs=("text_output", "cum_log_probs",
                                                 "output_log_probs"))
    assert not result.errors, result.errors
    got = np.concatenate([r["output_log_probs"].reshape(-1) for r in result.responses])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert all(r["cum_log_probs"].shape == (1, 1) for r in result.responses)
    assert all(r["output_log_probs"].shape[:2] == (1, 1) for r in result.responses)
    assert result.responses[-1]["cum_log_probs"][0][0] == pytest.approx(sum(expected), rel=1e-4)


@pytest.mark.parametrize("model", MODELS)
def test_end_id_ends_the_completion(triton_server, greedy, engine, model):
    """end_id replaces EOS: the completion ends at that token (its text not shown); -1 means
    no end token at all."""
    text, ids = greedy[0]
    end = ids[4]
    first = ids.index(end)  # the first time the greedy completion produces it
    (before,) = _generate(engine, PROMPTS[:1], temperature=0, max_tokens=first or 1)
    result = run(triton_server.grpc_url, model, PROMPTS[:1], output_len=LEN, end_id=end,
                 exclude_input_in_output=True, return_num_output_tokens=True,
                 outputs=("text_output", "num_output_tokens"))
    assert not result.errors, result.errors
    assert result.texts == [[before[0] if first else ""]]
    assert int(result.responses[0]["num_output_tokens"][0][0]) == first + 1
    result = run(triton_server.grpc_url, model, PROMPTS[:1], output_len=LEN, end_id=-1,
                 exclude_input_in_output=True)
    assert result.texts == [[text]]


@pytest.mark.parametrize("model", MODELS)
def test_top_k_samples_as_the_engine_does(triton_server, engine, model):
    """top_k given: sampling at the given temperature, seeded: the engine's exact tokens."""
    result = run(triton_server.grpc_url, model, PROMPTS, output_len=LEN, top_k=40, seed=5,
                 temperature=0.9, exclude_input_in_output=True)
    assert not result.errors, result.errors
    assert result.texts == _generate(engine, PROMPTS, temperature=0.9, top_k=40, seed=5,
                                     max_tokens=LEN)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("streaming", [False, True])
def test_token_counts_are_int32(triton_server, greedy, model, streaming):
    result = run(triton_server.grpc_url, model, PROMPTS[:1], output_len=LEN, streaming=streaming,
                 exclude_input_in_output=True, return_num_input_tokens=True,
                 return_num_output_tokens=True,
                 outputs=("text_output", "num_input_tokens", "num_output_tokens"))
    assert not result.errors, result.errors
    for r in result.responses:
        assert r["num_input_tokens"].dtype == np.int32 and r["num_input_tokens"].shape == (1, 1)
        assert r["num_output_tokens"].dtype == np.int32 and r["num_output_tokens"].shape == (1, 1)
    assert sum(int(r["num_output_tokens"][0][0]) for r in result.responses) == LEN
    assert int(result.responses[0]["num_input_tokens"][0][0]) > 0


@pytest.mark.parametrize("model", MODELS)
def test_stop_words(triton_server, greedy, model):
    text, _ = greedy[0]
    word = text.strip()[2:5]
    result = run(triton_server.grpc_url, model, PROMPTS[:1], output_len=LEN,
                 stop_words=[word], exclude_input_in_output=True)
    assert not result.errors, result.errors
    assert result.texts == [[text[: text.index(word)]]]


@needs_h1
@pytest.mark.parametrize("model", MODELS)
def test_bad_words_are_never_produced(triton_server, greedy, model):
    text, _ = greedy[0]
    word = text.split()[0]
    result = run(triton_server.grpc_url, model, PROMPTS[:1], output_len=LEN,
                 bad_words=[word], exclude_input_in_output=True)
    assert not result.errors, result.errors
    assert word not in result.texts[0][0] and result.texts[0][0] != text


@needs_h1
@pytest.mark.parametrize("model", MODELS)
def test_embedding_bias_is_a_logit_bias_on_the_words_tokens(triton_server, model):
    """A large bias on one word's token makes greedy decoding produce nothing else."""
    result = run(triton_server.grpc_url, model, PROMPTS[:1], output_len=6,
                 embedding_bias_words=["the", ""], embedding_bias_weights=[100.0, 0.0],
                 exclude_input_in_output=True)
    assert not result.errors, result.errors
    assert result.texts[0][0].replace(" ", "") == "the" * 6


@pytest.mark.parametrize("model", MODELS)
def test_genai_perf_tensorrtllm_payload(triton_server, model):
    """genai-perf --backend tensorrtllm: [1, 1] shapes, min_length; counts its tokens from
    the streamed text."""
    stream = GrpcStream(triton_server.grpc_url)
    try:
        rid = stream.send(model, [
            tensor("text_input", PROMPTS[0], batch=True),
            tensor("max_tokens", 16, batch=True),
            tensor("exclude_input_in_output", True, batch=True),
            tensor("stream", True, batch=True),
            tensor("min_length", 16, batch=True),
            tensor("return_num_output_tokens", True, batch=True),
        ])
        result = stream.collect([rid])[rid]
    finally:
        stream.close()
    assert result.error is None, result.error
    assert result.final_seen
    assert sum(int(r["num_output_tokens"].sum()) for r in result.responses) == 16
    assert 1 < len(result.responses) <= 16  # streamed; merged only while the sender lags
    assert result.text()
