"""Sampling parameters, with vLLM's names and meanings."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

_GREEDY_EPS = 1e-5


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RequestOutputKind(enum.Enum):
    """What each streamed RequestOutput carries (vLLM's names)."""

    CUMULATIVE = 0  # all text and tokens so far
    DELTA = 1  # only what is new since the previous output
    FINAL_ONLY = 2  # a single output when the request finishes


class UnknownFieldError(ValueError, TypeError):
    """An argument that SamplingParams does not have (a TypeError too, as Python would raise)."""


@dataclass
class _SamplingFields:
    """How to sample one request's completions; validated on construction.

    ``temperature=0`` is greedy. ``top_k`` 0 or -1 disables top-k. ``stop`` strings end the text
    (excluded unless ``include_stop_str_in_output``); ``stop_token_ids`` end it too (the token is
    kept in ``token_ids``, its text is not). ``logprobs=k`` returns the sampled token's logprob
    and the top-k for each generated token.

    ``bad_words``: words never generated (vLLM's rule: each word is tokenized with and without
    a leading space, and a word's last token is banned whenever the tokens generated just
    before it are the word's other tokens). ``logit_bias``: token id -> value added to its
    logit before sampling (clamped to [-100, 100], as OpenAI does; keys may be strings, as in
    JSON). ``allowed_token_ids``: only these tokens may be sampled. Token ids are checked
    against the model's vocabulary when the engine takes the request.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    bad_words: Optional[list[str]] = None
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    # bad_words as token id sequences; set by the engine, which holds the tokenizer.
    bad_words_token_ids: Optional[list[list[int]]] = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop else []
        self.stop_token_ids = [int(t) for t in self.stop_token_ids] if self.stop_token_ids else []
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.bad_words = list(dict.fromkeys(self.bad_words)) if self.bad_words else []
        if self.logit_bias:
            self.logit_bias = _logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        for name in ("n", "top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                raise bad(name, "must be an integer")
        if self.n < 1:
            raise bad("n", "must be at least 1")
        if not self.temperature >= 0.0:
            raise bad("temperature", "must be non-negative")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be -1 (disable), 0 (disable) or positive")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and not _is_int(self.max_tokens):
            raise bad("max_tokens", "must be an integer")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "must be positive")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", "must be a non-negative integer")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must hold non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative token ids")
        if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise bad("bad_words", "must hold non-empty strings")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise bad("allowed_token_ids", "must not be empty (None allows every token)")
            if any(not _is_int(t) or t < 0 for t in self.allowed_token_ids):
                raise bad("allowed_token_ids", "must hold non-negative token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def token_ids_to_check(self) -> dict[str, list[int]]:
        """Every token id the request names, by field, for the engine's vocabulary check."""
        return {
            "stop_token_ids": self.stop_token_ids,
            "logit_bias": list(self.logit_bias or ()),
            "allowed_token_ids": self.allowed_token_ids or [],
        }

    def clone(self, **changes: Any) -> SamplingParams:
        values = {name: getattr(self, name) for name in _FIELD_NAMES}
        values.update(changes)
        return SamplingParams(**values)


class SamplingParams(_SamplingFields):
    __doc__ = _SamplingFields.__doc__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - _FIELD_NAMES)
        if unknown:
            raise UnknownFieldError(
                f"unknown SamplingParams field(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(_FIELD_NAMES))}"
            )
        super().__init__(*args, **kwargs)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, coerce_strings: bool = False) -> SamplingParams:
        """Builds SamplingParams from a mapping; unknown keys are a ValueError naming them.

        With ``coerce_strings`` a string value is converted to the field's type ("0.7" -> 0.7,
        "true" -> True, '["a"]' -> ["a"]), as Triton clients send sampling parameters as strings.
        """
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if coerce_strings and isinstance(value, str):
                value = _coerce(name, value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except UnknownFieldError:
            raise
        except TypeError as e:  # a value of the wrong type, e.g. a list where a number belongs
            raise ValueError(f"invalid sampling parameters: {e}") from None


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(_SamplingFields) if f.init)
_MAX_ABS_LOGIT_BIAS = 100.0


def _logit_bias(values: Any) -> dict[int, float]:
    """Token id -> bias, with ids given as ints or decimal strings (JSON object keys)."""
    if not isinstance(values, dict):
        raise ValueError(
            f"SamplingParams.logit_bias must map token ids to numbers, got {values!r}"
        )
    out: dict[int, float] = {}
    for key, bias in values.items():
        try:
            if isinstance(key, (bool, float)):
                raise ValueError
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(
                f"SamplingParams.logit_bias keys must be token ids, got {key!r}"
            ) from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias):
            raise ValueError(
                f"SamplingParams.logit_bias[{token}] must be a number, got {bias!r}"
            )
        if token < 0:
            raise ValueError(f"SamplingParams.logit_bias keys must be token ids >= 0, got {token}")
        out[token] = min(_MAX_ABS_LOGIT_BIAS, max(-_MAX_ABS_LOGIT_BIAS, float(bias)))
    return out


_INT_FIELDS = {"n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs"}
_FLOAT_FIELDS = {
    "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty",
}
_BOOL_FIELDS = {"ignore_eos", "skip_special_tokens", "include_stop_str_in_output"}


def _coerce(name: str, text: str) -> Any:
    try:
        if name in _INT_FIELDS:
            number = float(text)
            if number != int(number):
                raise ValueError
            return int(number)
        if name in _FLOAT_FIELDS:
            return float(text)
        if name in _BOOL_FIELDS:
            lowered = text.strip().lower()
            if lowered in ("true", "1"):
                return True
            if lowered in ("false", "0"):
                return False
            raise ValueError
        if name in ("stop", "stop_token_ids", "bad_words", "allowed_token_ids", "logit_bias"):
            stripped = text.strip()
            if name in ("stop", "bad_words") and not stripped.startswith("["):
                return text
            return json.loads(stripped)
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"sampling parameter {name!r} has an invalid value {text!r}") from None
    if name == "output_kind":
        raise ValueError("sampling parameter 'output_kind' cannot be set from a string")
    return text


__all__ = ["RequestOutputKind", "SamplingParams", "UnknownFieldError"]
