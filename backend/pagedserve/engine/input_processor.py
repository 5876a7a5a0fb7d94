"""Checks a request against what this engine can hold, before anything is queued."""

from __future__ import annotations

from typing import Any, Optional, Union

from pagedserve.sampling_params import SamplingParams
from pagedserve.tokenizer.tokenizer import bad_words_token_ids

PromptType = Union[str, dict[str, Any]]


class InputProcessor:
    """Owns the engine-dependent request checks (vocabulary, prompt length), and what needs the
    tokenizer: encoding the prompt and the bad words. SamplingParams checks its own ranges;
    everything that needs the engine's configuration is here, so bad input is a ValueError
    naming the field before a request reaches the scheduler."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def process_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        """Validates a prompt and returns (text or None, token ids)."""
        if isinstance(prompt, str):
            text, token_ids = prompt, None
        elif isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise ValueError(f"unknown prompt field(s): {', '.join(sorted(unknown))}")
            if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
                raise ValueError("a prompt needs exactly one of 'prompt' and 'prompt_token_ids'")
            text, token_ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        else:
            raise ValueError(
                f"prompt must be a str or a dict with 'prompt_token_ids', got {type(prompt)}"
            )
        if token_ids is None:
            if not isinstance(text, str) or not text:
                raise ValueError("prompt must not be empty")
            token_ids = self.tokenizer(text).input_ids
        else:
            token_ids = self._check_prompt_token_ids(token_ids)
        if not token_ids:
            raise ValueError("prompt must not be empty (it encodes to no tokens)")
        max_len = self.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(
                f"prompt is too long: {len(token_ids)} tokens, and max_model_len={max_len} "
                "must hold the prompt plus at least one generated token"
            )
        return text, token_ids

    def _check_prompt_token_ids(self, token_ids: Any) -> list[int]:
        try:
            ids = [int(t) for t in token_ids]
        except (TypeError, ValueError, OverflowError):
            raise ValueError("prompt_token_ids must be a list of integers") from None
        if any(isinstance(t, (bool, float)) for t in token_ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        self._check_in_vocab("prompt_token_ids", ids)
        return ids

    def _check_in_vocab(self, name: str, ids: list[int]) -> None:
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{name} hold ids outside the vocabulary [0, {vocab}): {bad[:5]}")

    def process_params(self, params: SamplingParams) -> SamplingParams:
        """Checks ``params`` against the engine; returns them ready for the scheduler (a copy
        with the bad words as token ids, when there are bad words)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params)}")
        if params.logprobs is not None and params.logprobs > self.vocab_size:
            raise ValueError(
                f"SamplingParams.logprobs must not exceed the vocabulary size "
                f"({self.vocab_size}), got {params.logprobs}"
            )
        for name, ids in params.token_ids_to_check.items():
            self._check_in_vocab(f"SamplingParams.{name}", ids)
        if params.bad_words:
            sequences = bad_words_token_ids(params.bad_words, self.tokenizer)
            self._check_in_vocab("SamplingParams.bad_words", [t for s in sequences for t in s])
            params = params.clone()
            params.bad_words_token_ids = sequences
        return params
