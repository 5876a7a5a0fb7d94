"""The llm model's request and responses for one TensorRT-LLM request (plain numpy).

The llm model speaks vllm_backend's contract: one response holds every completion (``n``
entries), counts are UINT32, log probabilities are JSON. TensorRT-LLM's clients expect one
response per completion (``sequence_index``), per batch item (``batch_index``), INT32 counts and
FP32 log probabilities, with the shapes of a model whose max_batch_size is above 0:
``text_output`` [1], the others [1, 1] (``output_log_probs`` [1, 1, tokens]).
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np

from pagedserve.serving.trtllm import TrtllmRequest

Tensors = dict[str, np.ndarray]
_RUNNING = b"None"  # the llm's finish_reason of a completion still running


def _one(value: object, dtype: type) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def llm_inputs(request: TrtllmRequest) -> Tensors:
    """The llm model's inputs. The prompt is never echoed by the llm (the text in front of a
    non-streamed answer is added here, from the exact prompt), and finish reasons and token
    counts always come back: they tell where a completion ends and what is new."""
    inputs: Tensors = {
        "input_ids": request.input_ids,
        "sampling_parameters": np.array([request.sampling_json()], dtype=np.object_),
        "stream": np.array([request.stream]),
        "exclude_input_in_output": np.array([True]),
        "return_finish_reason": np.array([True]),
        "return_num_output_tokens": np.array([True]),
    }
    if request.return_num_input_tokens:
        inputs["return_num_input_tokens"] = np.array([True])
    if request.return_log_probs:
        inputs["return_cumulative_logprob"] = np.array([True])
        inputs["return_logprobs"] = np.array([True])
    return inputs


def llm_outputs(request: TrtllmRequest) -> list[str]:
    """The llm outputs to ask for."""
    names = ["text_output", "finish_reason", "num_output_tokens"]
    if request.return_num_input_tokens:
        names.append("num_input_tokens")
    if request.return_log_probs:
        names += ["cumulative_logprob", "logprobs"]
    return names


def is_final(llm: Tensors) -> bool:
    """Whether this llm response is the request's last: every completion has finished."""
    reasons = llm.get("finish_reason")
    return reasons is not None and all(r != _RUNNING for r in reasons.reshape(-1).tolist())


class TrtllmResponses:
    """Owns one batch item's translation of llm responses into TensorRT-LLM responses."""

    def __init__(self, request: TrtllmRequest, batch_index: Optional[int]) -> None:
        self.request = request
        self.batch_index = batch_index  # None for a batch of one (TensorRT-LLM sends none)
        self.num_output_tokens = 0  # over all completions, for the caller's accounting

    def convert(self, llm: Tensors) -> list[Tensors]:
        """The TensorRT-LLM responses for one llm response: one per completion that has
        something new (streaming) or one per completion (the single non-streamed response).
        The last llm response always yields at least one, to carry the final flag."""
        req = self.request
        texts = llm["text_output"].reshape(-1).tolist()
        counts = llm["num_output_tokens"].reshape(-1).tolist()
        self.num_output_tokens += int(sum(counts))
        logprobs = llm["logprobs"].reshape(-1).tolist() if "logprobs" in llm else None
        responses = []
        for i, (text, count) in enumerate(zip(texts, counts)):
            if req.stream and not text and not count:
                continue
            responses.append(self._response(llm, i, text, int(count), logprobs))
        if not responses and is_final(llm):
            responses.append(self._response(llm, 0, b"", 0, None))
        return responses

    def _response(
        self, llm: Tensors, index: int, text: bytes, count: int, logprobs: Optional[list]
    ) -> Tensors:
        req = self.request
        if not req.stream and not req.exclude_input:
            text = req.prompt.encode("utf-8") + text
        out: Tensors = {"text_output": np.array([text], dtype=np.object_)}
        if req.return_log_probs:
            out["cum_log_probs"] = _one(llm["cumulative_logprob"].reshape(-1)[index], np.float32)
            entries = json.loads(logprobs[index]) if logprobs is not None else None
            values = [next(iter(entry.values()))["logprob"] for entry in entries or []]
            out["output_log_probs"] = np.array(values, dtype=np.float32).reshape(1, 1, -1)
        if req.return_num_input_tokens:
            out["num_input_tokens"] = _one(llm["num_input_tokens"].reshape(-1)[0], np.int32)
        if req.return_num_output_tokens:
            out["num_output_tokens"] = _one(count, np.int32)
        if self.batch_index is not None:
            out["batch_index"] = _one(self.batch_index, np.int32)
        if req.n > 1:
            out["sequence_index"] = _one(index, np.int32)
        return out
