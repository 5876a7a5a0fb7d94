"""Turns the engine's RequestOutputs into the llm model's output tensors (plain numpy).

Streamed requests run with ``RequestOutputKind.DELTA``, so every output already carries only
what is new (text, token ids, logprobs) and the tensors are built from it directly; the engine's
incremental detokenizer makes the text deltas exact (a multi-byte character split across tokens
is held back until complete), which is what lets the concatenated deltas equal the full text.
Non-streamed requests run with ``FINAL_ONLY`` and get one output holding everything.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from pagedserve.outputs import RequestOutput
from pagedserve.serving.contract import GenerateRequest


def _logprobs_json(entries: Optional[list[Optional[dict[int, Any]]]]) -> bytes:
    """vllm_backend's format: one ``{token_id: {logprob, rank, decoded_token}}`` per token
    (``null`` for a position without logprobs: the prompt's first token)."""
    if entries is None:
        return b"null"
    return json.dumps(
        [
            None if entry is None else {
                str(token_id): {
                    "logprob": lp.logprob,
                    "rank": lp.rank,
                    "decoded_token": lp.decoded_token,
                }
                for token_id, lp in entry.items()
            }
            for entry in entries
        ]
    ).encode("utf-8")


class ResponseBuilder:
    """Owns one request's response-side state: completions seen so far and token counts.

    With ``n`` > 1, a streamed output may only carry the completions that changed; tensors
    always have ``n`` entries, in completion order, empty for those that did not change.
    """

    def __init__(self, request: GenerateRequest, tokenizer: Any, requested: frozenset[str]):
        self.request = request
        self.tokenizer = tokenizer
        self.requested = requested
        self.n = request.params.n
        self.finish_reasons: list[Optional[str]] = [None] * self.n
        self.cumulative = [0.0] * self.n
        self.num_prompt_tokens = 0

    def _prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=True)

    def build(self, output: RequestOutput) -> dict[str, np.ndarray]:
        """The output tensors (name -> array) for one engine output."""
        req = self.request
        self.num_prompt_tokens = len(output.prompt_token_ids)
        texts = [""] * self.n
        new_tokens = [0] * self.n
        logprobs: list[bytes] = [b"[]"] * self.n
        ids: list[int] = []
        prefix = self._prompt_text(output) if req.prepend_input and not req.stream else ""
        for c in output.outputs:
            i = c.index
            texts[i] = prefix + c.text
            new_tokens[i] = len(c.token_ids)
            if c.finish_reason is not None:
                self.finish_reasons[i] = c.finish_reason
            if c.cumulative_logprob is not None:
                self.cumulative[i] = c.cumulative_logprob
            logprobs[i] = _logprobs_json(c.logprobs if req.client_logprobs else None)
            if i == 0:
                ids = list(c.token_ids)
        tensors: dict[str, np.ndarray] = {
            "text_output": np.array([t.encode("utf-8") for t in texts], dtype=np.object_)
        }
        if req.wants("return_finish_reason"):
            tensors["finish_reason"] = np.array(
                [str(r).encode() for r in self.finish_reasons], dtype=np.object_
            )
        if req.wants("return_cumulative_logprob"):
            tensors["cumulative_logprob"] = np.array(self.cumulative, dtype=np.float32)
        if req.wants("return_logprobs"):
            tensors["logprobs"] = np.array(logprobs, dtype=np.object_)
        if req.wants("return_num_input_tokens"):
            tensors["num_input_tokens"] = np.array([self.num_prompt_tokens], dtype=np.uint32)
        if req.wants("return_num_output_tokens"):
            tensors["num_output_tokens"] = np.array(new_tokens, dtype=np.uint32)
        if "output_ids" in self.requested:
            tensors["output_ids"] = np.array(ids, dtype=np.int32)
        if req.wants("return_prompt_logprobs"):
            # The whole list in the first response, [] after it (vLLM's DELTA outputs), null
            # when sampling_parameters did not ask for prompt_logprobs.
            tensors["prompt_logprobs"] = np.array(
                [_logprobs_json(output.prompt_logprobs)], dtype=np.object_
            )
        return tensors
