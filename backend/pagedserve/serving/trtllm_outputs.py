"""The llm model's request and responses for one TensorRT-LLM request (plain numpy).

The llm model speaks vllm_backend's contract: one response holds every completion (``n``
entries), counts are UINT32, log probabilities are JSON. TensorRT-LLM's clients expect one
response per completion (``sequence_index``), per batch item (``batch_index``), INT32 counts and
FP32 log probabilities, with the shapes of a model whose max_batch_size is above 0:
``text_output`` [1], the others [1, 1] (``output_log_probs`` [1, 1, tokens]).

The llm request always streams (tensorrt_llm_bls sees every engine step, which its
cancellation needs); for a client that does not stream, the deltas are gathered here, and
since the engine's streamed deltas concatenate to exactly its full text, so do these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pagedserve.serving.trtllm import TrtllmRequest

Tensors = dict[str, np.ndarray]
_RUNNING = b"None"  # the llm's finish_reason of a completion still running


def _one(value: object, dtype: type) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def llm_inputs(request: TrtllmRequest) -> Tensors:
    """The llm model's inputs: the prompt as text (the engine tokenizes it), streamed, without
    the prompt echoed (added here, exactly as given), with the finish reasons and token counts
    that tell what is new and what ended."""
    inputs: Tensors = {
        "text_input": np.array([request.prompt.encode("utf-8")], dtype=np.object_),
        "sampling_parameters": np.array([request.sampling_json()], dtype=np.object_),
        "stream": np.array([True]),
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


@dataclass
class _Completion:
    """What one completion has produced and not yet sent."""

    text: bytes = b""
    tokens: int = 0
    log_probs: list[float] = field(default_factory=list)
    cum_log_prob: float = 0.0


class TrtllmResponses:
    """Owns one batch item's translation of llm responses into TensorRT-LLM responses."""

    def __init__(self, request: TrtllmRequest, batch_index: Optional[int]) -> None:
        self.request = request
        self.batch_index = batch_index  # None for a batch of one (TensorRT-LLM sends none)
        self.num_input_tokens = 0
        self._pending = [_Completion() for _ in range(request.n)]

    def convert(self, llm: Tensors) -> list[Tensors]:
        """The TensorRT-LLM responses for one llm response. Streaming: one per completion with
        something new. Otherwise nothing until the last llm response, then one per completion.
        The last llm response always yields at least one, to carry the final flag."""
        self._gather(llm)
        final = is_final(llm)
        if not self.request.stream and not final:
            return []
        indices = [i for i, c in enumerate(self._pending)
                   if c.text or c.tokens or not self.request.stream]
        if not indices and final:
            indices = [0]
        return [self._response(i) for i in indices]

    def _gather(self, llm: Tensors) -> None:
        texts = llm["text_output"].reshape(-1).tolist()
        counts = llm["num_output_tokens"].reshape(-1).tolist()
        logprobs = llm["logprobs"].reshape(-1).tolist() if "logprobs" in llm else None
        if "num_input_tokens" in llm:
            self.num_input_tokens = int(llm["num_input_tokens"].reshape(-1)[0])
        for i, completion in enumerate(self._pending):
            completion.text += texts[i]
            completion.tokens += int(counts[i])
            if logprobs is not None:
                entries = json.loads(logprobs[i]) or []
                # logprobs=0: each entry holds the sampled token only
                completion.log_probs += [next(iter(e.values()))["logprob"] for e in entries]
                completion.cum_log_prob = float(llm["cumulative_logprob"].reshape(-1)[i])

    def _response(self, index: int) -> Tensors:
        req = self.request
        completion = self._pending[index]
        self._pending[index] = _Completion(cum_log_prob=completion.cum_log_prob)
        text = completion.text
        if not req.stream and not req.exclude_input:
            text = req.prompt.encode("utf-8") + text
        out: Tensors = {"text_output": np.array([text], dtype=np.object_)}
        if req.return_log_probs:
            out["cum_log_probs"] = _one(completion.cum_log_prob, np.float32)
            out["output_log_probs"] = np.array(completion.log_probs,
                                               dtype=np.float32).reshape(1, 1, -1)
        if req.return_num_input_tokens:
            out["num_input_tokens"] = _one(self.num_input_tokens, np.int32)
        if req.return_num_output_tokens:
            out["num_output_tokens"] = _one(completion.tokens, np.int32)
        if self.batch_index is not None:
            out["batch_index"] = _one(self.batch_index, np.int32)
        if req.n > 1:
            out["sequence_index"] = _one(index, np.int32)
        return out
