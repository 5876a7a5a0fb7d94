"""Checks a request against what this engine can hold, before anything is queued."""

from __future__ import annotations

from typing import Any, Optional, Union

from pagedserve.sampling_params import SamplingParams
from pagedserve.tokenizer.tokenizer import bad_words_token_ids

PromptType = Union[str, dict[str, Any]]
# Each step checks every bad word of the rows that have them (vLLM's limit).
MAX_BAD_WORD_SEQUENCES = 128


class InputProcessor:
    """Owns the engine-dependent request checks (vocabulary, prompt length), and what needs the
    tokenizer: encoding the prompt and the bad words. SamplingParams checks its own ranges;
    everything that needs the engine's configuration is here, so bad input is a ValueError
    naming the field before a request reaches the scheduler."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        max_model_len: int,
        max_num_seqs: int,
        max_logprobs: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_logprobs = max_logprobs  # -1: up to the vocabulary

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

    def _check_num_logprobs(self, name: str, value: Optional[int]) -> Optional[int]:
        """``logprobs`` or ``prompt_logprobs`` against ``max_logprobs`` (vLLM's rule: -1, the
        whole vocabulary, needs ``max_logprobs=-1``); returns it with -1 resolved."""
        if value is None:
            return None
        cap = self.vocab_size if self.max_logprobs == -1 else self.max_logprobs
        if value == -1 and self.max_logprobs != -1:
            raise ValueError(
                f"SamplingParams.{name}=-1 (the whole vocabulary) needs the engine "
                f"argument max_logprobs=-1; it is {self.max_logprobs}"
            )
        if value > min(cap, self.vocab_size):
            raise ValueError(
                f"SamplingParams.{name} must be at most {min(cap, self.vocab_size)} (the "
                f"engine's max_logprobs={self.max_logprobs}, vocabulary "
                f"{self.vocab_size}), got {value}"
            )
        return self.vocab_size if value == -1 else value

    def process_params(self, params: SamplingParams) -> SamplingParams:
        """Checks ``params`` against the engine; returns them ready for the scheduler (a copy
        when something had to be resolved: ``logprobs=-1`` or ``prompt_logprobs=-1``, the
        bad words' token ids)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params)}")
        if params.n > self.max_num_seqs:
            # Its completions run side by side: more would wait for each other forever.
            raise ValueError(
                f"SamplingParams.n must be at most the engine's max_num_seqs "
                f"({self.max_num_seqs}), got {params.n}"
            )
        changes: dict[str, Any] = {}
        for name in ("logprobs", "prompt_logprobs"):
            wanted = self._check_num_logprobs(name, getattr(params, name))
            if wanted != getattr(params, name):
                changes[name] = wanted
        for name, ids in params.token_ids_to_check.items():
            self._check_in_vocab(f"SamplingParams.{name}", ids)
        sequences = None
        if params.bad_words:
            sequences = bad_words_token_ids(params.bad_words, self.tokenizer)
            if len(sequences) > MAX_BAD_WORD_SEQUENCES:
                raise ValueError(
                    f"SamplingParams.bad_words must come to at most {MAX_BAD_WORD_SEQUENCES} "
                    f"token sequences (each word counts once or twice), got {len(sequences)}"
                )
            self._check_in_vocab("SamplingParams.bad_words", [t for s in sequences for t in s])
        if changes or sequences:
            params = params.clone(**changes)
            params.bad_words_token_ids = sequences
        return params
