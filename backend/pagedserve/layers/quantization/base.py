"""The QuantizationConfig interface: a checkpoint's quantization, parsed and validated, that
chooses each linear layer's LinearMethod from the layer's checkpoint name (its prefix)."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from pagedserve.layers.linear import LinearMethod, UnquantizedLinearMethod


def field_error(method: str, name: str, value: Any, why: str) -> ValueError:
    """The error of a bad quantization_config field, naming it."""
    return ValueError(f"quantization_config.{name} {why} ({method}), got {value!r}")


def check_choice(method: str, name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise field_error(
            method, name, value, f"is not supported: must be one of {', '.join(map(str, allowed))}"
        )


def matches_any(prefix: str, patterns: Iterable[str]) -> bool:
    """compressed-tensors' rule: ``re:PATTERN`` matches the name by regex, any other entry
    by name or as a suffix of whole components (``lm_head``, ``model.layers.0.mlp.down_proj``)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], prefix):
                return True
        elif prefix == pattern or prefix.endswith("." + pattern):
            return True
    return False


@dataclass
class QuantizationConfig(ABC):
    """One checkpoint's quantization: validated fields, and a LinearMethod per layer."""

    method: ClassVar[str]  # vLLM's name for the method (the engine argument's value)

    @abstractmethod
    def method_for(self, prefix: str) -> Optional[LinearMethod]:
        """The linear method of the checkpoint module ``prefix``; None: not quantized."""

    def lm_head_method(self) -> Optional[LinearMethod]:
        """The LM head's method where the checkpoint quantized the head; None (the default for
        every format but GPTQ's ``lm_head`` and AutoRound's ``extra_config``): full precision."""
        return None

    def linear_method(self, layer_prefix: str, shard_prefixes: list[str]) -> LinearMethod:
        """The method of a (possibly fused) layer, whose shards must all agree."""
        methods = [self.method_for(p) for p in shard_prefixes]
        kinds = {repr(getattr(m, "scheme", None)) for m in methods}
        if len(kinds) > 1:
            raise ValueError(
                f"{layer_prefix}: its shards ({', '.join(shard_prefixes)}) are quantized "
                "differently, and pagedserve runs them as one fused layer"
            )
        return methods[0] or UnquantizedLinearMethod()
