"""``speculative_config``: vLLM's names, validated in one place (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pagedserve.spec_decode.ngram_proposer import MAX_NUM_SPECULATIVE_TOKENS, NgramConfig

METHODS = ("ngram", "draft_model", "eagle3")
# vLLM's other methods, named so that their error says they are known but not served here.
_OTHER_VLLM_METHODS = ("eagle", "medusa", "mlp_speculator", "mtp", "deepseek_mtp", "suffix")
_KEYS = (
    "method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
    "disable_by_batch_size", "draft_tensor_parallel_size", "adaptive",
)


@dataclass(frozen=True)
class SpeculativeConfig:
    """How requests are speculated: the proposer (``method``), the most tokens it drafts per
    step (``num_speculative_tokens``, k), the n-gram lookup bounds, and the draft model or
    EAGLE-3 head directory (``model``).

    ``adaptive`` (pagedserve's; on by default) lets the scheduler draft fewer tokens, down to
    none, when the measured acceptance and the batch's size say speculation would cost more
    than it gains. ``disable_by_batch_size`` (vLLM's) turns speculation off outright while more
    requests than that are running.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: Optional[int] = None
    prompt_lookup_max: Optional[int] = None
    model: Optional[str] = None
    disable_by_batch_size: Optional[int] = None
    adaptive: bool = True

    @property
    def ngram(self) -> NgramConfig:
        return NgramConfig(self.num_speculative_tokens, self.prompt_lookup_min,
                           self.prompt_lookup_max)

    @property
    def uses_draft_model(self) -> bool:
        return self.method in ("draft_model", "eagle3")

    @classmethod
    def from_dict(cls, values: Any) -> SpeculativeConfig:
        """Validates a ``speculative_config`` mapping; errors name the key."""
        if isinstance(values, SpeculativeConfig):
            return values
        if not isinstance(values, dict):
            raise ValueError(f"engine argument 'speculative_config' must be a mapping, got "
                             f"{values!r}")
        unknown = sorted(set(values) - set(_KEYS))
        if unknown:
            raise ValueError(f"speculative_config has unknown key(s) "
                             f"{', '.join(map(repr, unknown))}; known: {', '.join(_KEYS)}")

        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"speculative_config {key!r} {why}, got {values.get(key)!r}")

        model = values.get("model")
        method = values.get("method")
        if method is None:
            if model is None:
                raise bad("method", f"is required (one of {', '.join(METHODS)})")
            method = "draft_model"  # vLLM's default when only a model is named
        if method in _OTHER_VLLM_METHODS:
            raise bad("method", f"is a vLLM method pagedserve does not serve (use one of "
                                f"{', '.join(METHODS)})")
        if method not in METHODS:
            raise bad("method", f"must be one of {', '.join(METHODS)}")
        k = values.get("num_speculative_tokens")
        if not _is_int(k) or not 1 <= k <= MAX_NUM_SPECULATIVE_TOKENS:
            raise bad("num_speculative_tokens",
                      f"must be an integer in [1, {MAX_NUM_SPECULATIVE_TOKENS}]")
        lookup = {key: values.get(key) for key in ("prompt_lookup_min", "prompt_lookup_max")}
        if method == "ngram":
            NgramConfig(k, **lookup)  # validates the bounds, naming them
            if model is not None:
                raise bad("model", "is not used by method 'ngram'; remove it")
        else:
            for key, value in lookup.items():
                if value is not None:
                    raise bad(key, f"is only used by method 'ngram', not {method!r}")
            if not isinstance(model, (str, Path)) or not str(model).strip():
                raise bad("model", f"must name the {method} checkpoint directory")
            model = str(model)
        limit = values.get("disable_by_batch_size")
        if limit is not None and (not _is_int(limit) or limit < 1):
            raise bad("disable_by_batch_size", "must be an integer >= 1")
        tp = values.get("draft_tensor_parallel_size")
        if tp is not None and tp != 1:
            raise bad("draft_tensor_parallel_size", "must be 1")
        adaptive = values.get("adaptive", True)
        if not isinstance(adaptive, bool):
            raise bad("adaptive", "must be true or false")
        return cls(method, k, lookup["prompt_lookup_min"], lookup["prompt_lookup_max"], model,
                   limit, adaptive)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
