"""Sampling parameters, with vLLM's names and meanings."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Union

_GREEDY_EPS = 1e-5
_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1
# The engine holds sampling parameters as float32: a larger value would become inf there.
_FLOAT32_MAX = 3.4028234663852886e38
_MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's range; larger biases are clamped (vLLM)


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
    and the top-k for each generated token; ``prompt_logprobs=k`` the same for each prompt
    token (its own logprob and rank, and the top-k before it; ``None`` for the first token).
    -1 means the whole vocabulary, which the engine allows with ``max_logprobs=-1`` only.

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
    prompt_logprobs: Optional[int] = None
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
        self._validate()

    def _validate(self) -> None:
        """Every field's type and range, checked in one place; normalizes what vLLM accepts
        in several forms (``stop="x"``, ``top_k=-1``, ``seed=-1``, string logit_bias keys).
        A bad value is a ValueError naming the field and the bound."""
        self.n = _int("n", self.n, 1, _INT64_MAX)
        self.temperature = _real("temperature", self.temperature, 0.0, _FLOAT32_MAX)
        self.top_p = _real("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.top_k = _int("top_k", self.top_k, -1, _INT64_MAX, "-1 or 0 (off), or positive")
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _real("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            # Completion i draws from seed + i, and torch's generators take 64-bit seeds.
            top = _UINT64_MAX - (self.n - 1)
            self.seed = _int("seed", self.seed, -1, top,
                             f"in [0, 2**64 - n] = [0, {top}] (completion i uses seed + i), "
                             "or -1 (none)")
            if self.seed == -1:
                self.seed = None
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens, 1, _INT64_MAX)
        self.min_tokens = _int("min_tokens", self.min_tokens, 0,
                               _INT64_MAX if self.max_tokens is None else self.max_tokens,
                               None if self.max_tokens is None
                               else f"in [0, max_tokens] = [0, {self.max_tokens}]")
        self.stop = _strings("stop", self.stop)
        self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            setattr(self, name, _bool(name, getattr(self, name)))
        self.repetition_penalty = _real(
            "repetition_penalty", self.repetition_penalty, 0.0, _FLOAT32_MAX, low_open=True
        )
        self.presence_penalty = _real("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _real("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, _int(name, getattr(self, name), -1, _INT64_MAX,
                                         "non-negative, or -1 (the whole vocabulary)"))
        if not isinstance(self.output_kind, RequestOutputKind):
            raise _invalid("output_kind", "a RequestOutputKind", self.output_kind)
        self.bad_words = list(dict.fromkeys(_strings("bad_words", self.bad_words)))
        if any(not w.strip() for w in self.bad_words):
            raise _invalid("bad_words", "a list of words that are not blank", self.bad_words)
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _token_ids("allowed_token_ids", self.allowed_token_ids)
            if not self.allowed_token_ids:
                raise _invalid("allowed_token_ids", "a non-empty list (None allows every token)",
                               self.allowed_token_ids)

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
        if not isinstance(values, dict):
            raise ValueError(f"sampling parameters must be an object, got {type(values).__name__}")
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if value is None and _DEFAULTS.get(name) is not None:
                continue  # null means the default, as vLLM's from_optional and vllm_backend
            if coerce_strings and isinstance(value, str):
                value = _coerce(name, value)
            kwargs[name] = value
        return cls(**kwargs)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(_SamplingFields) if f.init)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(_SamplingFields) if f.init}


def _invalid(name: str, rule: str, value: Any) -> ValueError:
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python will print
        text = "an integer too large to print"
    if len(text) > 80:
        text = text[:77] + "..."
    return ValueError(f"SamplingParams.{name} must be {rule}, got {text}")


def _int(name: str, value: Any, low: int, high: int, rule: Optional[str] = None) -> int:
    """An integer (bool is not one) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _invalid(name, f"an integer, {rule or f'in [{low}, {high}]'}", value)
    value = int(value)
    if not low <= value <= high:
        raise _invalid(name, rule or f"in [{low}, {high}]", value)
    return value


def _real(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite number in [low, high] (or (low, high])."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _invalid(name, f"a number in {interval}", value)
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        raise _invalid(name, f"a finite number in {interval}", value) from None
    if not math.isfinite(number) or not (low < number if low_open else low <= number) or (
        number > high
    ):
        raise _invalid(name, f"a finite number in {interval}", value)
    return number


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(name, "true or false", value)
    return value


def _strings(name: str, value: Any) -> list[str]:
    """None, one string, or a list of non-empty strings, as a list."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or any(not isinstance(s, str) or not s
                                                   for s in value):
        raise _invalid(name, "a string or a list of non-empty strings", value)
    return list(value)


def _token_ids(name: str, value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise _invalid(name, "a list of token ids", value)
    return [_int(name, t, 0, _INT64_MAX, "a list of token ids (integers >= 0)") for t in value]


def _logit_bias(values: Any) -> dict[int, float]:
    """Token id -> bias, with ids given as ints or decimal strings (JSON object keys); biases
    are clamped to [-100, 100]."""
    if not isinstance(values, dict):
        raise _invalid("logit_bias", "an object mapping token ids to numbers", values)
    out: dict[int, float] = {}
    for key, bias in values.items():
        token = key
        if isinstance(key, str):
            with contextlib.suppress(ValueError):  # not a number: reported just below
                token = int(key)
        token = _int("logit_bias", token, 0, _INT64_MAX, "keyed by token ids (integers >= 0)")
        if isinstance(bias, bool) or not isinstance(bias, numbers.Real) or math.isnan(bias):
            raise _invalid(f"logit_bias[{token}]", "a number", bias)
        out[token] = min(_MAX_ABS_LOGIT_BIAS, max(-_MAX_ABS_LOGIT_BIAS, float(bias)))
    return out


_INT_FIELDS = {"n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"}
_FLOAT_FIELDS = {
    "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty",
}
_BOOL_FIELDS = {"ignore_eos", "skip_special_tokens", "include_stop_str_in_output"}


def _int_text(text: str) -> int:
    try:
        return int(text)  # exact at any size, unlike a trip through float
    except ValueError:
        number = float(text)  # "64.0", "1e3"
        if not number.is_integer():  # also inf and nan
            raise ValueError(text) from None
        return int(number)


_WORD_LIST_FIELDS = {"stop", "bad_words"}
_ID_LIST_FIELDS = {"stop_token_ids", "allowed_token_ids"}


_NOT_JSON = object()


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:  # JSONDecodeError is one
        return _NOT_JSON


def _coerce(name: str, text: str) -> Any:
    """A string value as the field's type, for clients that send every parameter as a string.

    A word list (``stop``, ``bad_words``) is read as JSON only when the text is a JSON list of
    strings, so that ``"[INST]"`` stays one stop string; a token id list is a JSON list or one
    integer; ``logit_bias`` is a JSON object."""
    try:
        if name in _INT_FIELDS:
            return _int_text(text)
        if name in _FLOAT_FIELDS:
            return float(text)
        if name in _BOOL_FIELDS:
            lowered = text.strip().lower()
            if lowered in ("true", "1"):
                return True
            if lowered in ("false", "0"):
                return False
            raise ValueError(text)
    except ValueError:
        kind = ("an integer" if name in _INT_FIELDS else "a number" if name in _FLOAT_FIELDS
                else "true or false")
        raise _invalid(name, kind, text) from None
    if name in _WORD_LIST_FIELDS:
        value = _json(text)
        is_words = isinstance(value, list) and all(isinstance(w, str) for w in value)
        return value if is_words else text
    if name in _ID_LIST_FIELDS:
        value = _json(text)
        if isinstance(value, list):
            return value
        try:
            return [_int_text(text)]
        except ValueError:
            raise _invalid(name, "a list of token ids (a JSON list, or one integer)",
                           text) from None
    if name == "logit_bias":
        value = _json(text)
        if not isinstance(value, dict):
            raise _invalid(name, "a JSON object mapping token ids to numbers", text)
        return value
    if name == "output_kind":
        raise ValueError("sampling parameter 'output_kind' cannot be set from a string")
    return text


__all__ = ["RequestOutputKind", "SamplingParams", "UnknownFieldError"]
