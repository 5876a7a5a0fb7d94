"""The integer weight-only formats' configs: GPTQ, AWQ and AutoRound (compressed-tensors'
pack-quantized W4A16/W8A16 is read in ``compressed_tensors.py``). Each reads its checkpoint's
quantization_config, validates it in ``__post_init__`` and gives each layer an
IntWeightLinearMethod (or none)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from pagedserve.layers.linear import LinearMethod
from pagedserve.layers.quantization.base import (
    QuantizationConfig,
    check_choice,
    field_error,
    matches_any,
)
from pagedserve.layers.quantization.int_linear import IntScheme, IntWeightLinearMethod

INT_BITS = (4, 8)
INT_GROUPS = (-1, 32, 64, 128, 256)


# What a GPTQModel ``dynamic`` rule may override (the fields vLLM reads; IntScheme's names).
DYNAMIC_OVERRIDES = ("bits", "group_size", "sym", "desc_act")


def _check_scheme(method: str, bits: Any, group_size: Any, where: str = "") -> None:
    check_choice(method, f"{where}bits", bits, INT_BITS)
    check_choice(method, f"{where}group_size", group_size, INT_GROUPS)


@dataclass(frozen=True)
class DynamicRule:
    """One GPTQModel ``dynamic`` entry: modules whose name the regex matches (from the start)
    are left unquantized (``-:``) or quantized with the overrides (``+:`` or no prefix)."""

    pattern: re.Pattern[str]
    excluded: bool
    overrides: dict[str, Any]


def _dynamic_rules(method: str, dynamic: Any, base: IntScheme) -> list[DynamicRule]:
    if not isinstance(dynamic, dict):
        raise field_error(method, "dynamic", dynamic, "must be an object of regex -> overrides")
    rules = []
    for key, overrides in dynamic.items():
        where = f"dynamic[{key!r}]"
        if not isinstance(overrides, dict):
            raise field_error(method, where, overrides, "must be an object")
        excluded = key.startswith("-:")
        regex = key[2:] if key.startswith(("-:", "+:")) else key
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise field_error(method, where, key, f"is not a valid regex ({e})") from None
        if not excluded:
            unknown = sorted(set(overrides) - set(DYNAMIC_OVERRIDES))
            if unknown:
                raise field_error(method, where, overrides, f"overrides {', '.join(unknown)}: "
                                  f"not supported, only {', '.join(DYNAMIC_OVERRIDES)}")
            scheme = dataclasses.replace(base, **overrides)
            _check_scheme(method, scheme.bits, scheme.group_size, f"{where}.")
            check_choice(method, f"{where}.sym", scheme.sym, (True, False))
            check_choice(method, f"{where}.desc_act", scheme.desc_act, (True, False))
        rules.append(DynamicRule(pattern, excluded, {} if excluded else dict(overrides)))
    return rules


@dataclass
class GPTQConfig(QuantizationConfig):
    """GPTQ (AutoGPTQ, GPTQModel, AutoRound's auto_gptq export)."""

    method: ClassVar[str] = "gptq"
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    lm_head: bool = False
    checkpoint_format: str = "gptq"
    dynamic: dict[str, Any] = field(default_factory=dict)
    _rules: list[DynamicRule] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_scheme(self.method, self.bits, self.group_size)
        check_choice(self.method, "checkpoint_format", self.checkpoint_format, ("gptq", "gptq_v2"))
        check_choice(self.method, "desc_act", self.desc_act, (True, False))
        check_choice(self.method, "sym", self.sym, (True, False))
        check_choice(self.method, "lm_head", self.lm_head, (True, False))
        self._rules = _dynamic_rules(self.method, self.dynamic, self.scheme())

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GPTQConfig:
        return cls(
            bits=raw.get("bits", 4),
            group_size=raw.get("group_size", 128),
            desc_act=raw.get("desc_act", False),
            sym=raw.get("sym", True),
            lm_head=raw.get("lm_head", False),
            checkpoint_format=raw.get("checkpoint_format") or "gptq",
            dynamic=raw.get("dynamic") or {},
        )

    def scheme(self) -> IntScheme:
        return IntScheme(self.bits, self.group_size, self.sym, self.checkpoint_format,
                         self.desc_act)

    def method_for(self, prefix: str) -> Optional[LinearMethod]:
        # GPTQModel's rule: the first ``dynamic`` entry whose regex matches decides.
        for rule in self._rules:
            if rule.pattern.match(prefix):
                if rule.excluded:
                    return None
                return IntWeightLinearMethod(dataclasses.replace(self.scheme(), **rule.overrides))
        return IntWeightLinearMethod(self.scheme())

    def lm_head_method(self) -> Optional[LinearMethod]:
        return self.method_for("lm_head") if self.lm_head else None


@dataclass
class AWQConfig(QuantizationConfig):
    """AWQ, GEMM version (AutoAWQ, AutoRound's auto_awq export)."""

    method: ClassVar[str] = "awq"
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"
    modules_to_not_convert: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice(self.method, "bits", self.bits, (4,))
        check_choice(self.method, "group_size", self.group_size, INT_GROUPS)
        check_choice(self.method, "zero_point", self.zero_point, (True,))
        check_choice(self.method, "version", self.version, ("gemm",))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AWQConfig:
        return cls(
            bits=raw.get("bits", raw.get("w_bit", 4)),
            group_size=raw.get("group_size", raw.get("q_group_size", 128)),
            zero_point=raw.get("zero_point", True),
            version=str(raw.get("version", "gemm")).lower(),
            modules_to_not_convert=tuple(raw.get("modules_to_not_convert") or ()),
        )

    def method_for(self, prefix: str) -> Optional[LinearMethod]:
        # AutoAWQ skips a module when any entry is a substring of its name.
        if any(name in prefix for name in self.modules_to_not_convert):
            return None
        return IntWeightLinearMethod(IntScheme(4, self.group_size, False, "awq"))


@dataclass
class AutoRoundConfig(QuantizationConfig):
    """AutoRound's own format: GPTQ v1 tensors without g_idx (auto_round:auto_gptq, symmetric)
    or AWQ tensors (auto_round:auto_awq); ``extra_config`` overrides bits / group_size / sym per
    layer, bits >= 16 meaning unquantized. ``intel/auto-round`` is its legacy name."""

    method: ClassVar[str] = "auto-round"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    packing_format: str = "auto_round:auto_gptq"
    data_type: str = "int"
    extra_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    block_name_to_quantize: Optional[Any] = None

    _PACKINGS: ClassVar[dict[str, str]] = {
        "auto_round:auto_gptq": "gptq", "auto_round:gptq": "gptq", "auto_gptq": "gptq",
        "auto_round:auto_awq": "awq", "auto_round:awq": "awq", "auto_awq": "awq",
    }

    def __post_init__(self) -> None:
        _check_scheme(self.method, self.bits, self.group_size)
        check_choice(self.method, "packing_format", self.packing_format, self._PACKINGS)
        check_choice(self.method, "data_type", self.data_type, ("int",))
        if not isinstance(self.extra_config, dict):
            raise field_error(self.method, "extra_config", self.extra_config, "must be an object")
        for name, override in self.extra_config.items():
            if not isinstance(override, dict):
                raise field_error(self.method, f"extra_config.{name}", override,
                                  "must be an object")
            bits = override.get("bits", self.bits)
            if bits < 16:
                _check_scheme(self.method, bits, override.get("group_size", self.group_size))
        if self._PACKINGS[self.packing_format] == "awq" and self.sym:
            raise field_error(self.method, "sym", True, "must be false with auto_awq packing")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AutoRoundConfig:
        return cls(
            bits=raw.get("bits", 4),
            group_size=raw.get("group_size", 128),
            sym=raw.get("sym", True),
            packing_format=raw.get("packing_format") or "auto_round:auto_gptq",
            data_type=raw.get("data_type", "int"),
            extra_config=raw.get("extra_config") or {},
            block_name_to_quantize=raw.get("block_name_to_quantize"),
        )

    def _override(self, prefix: str) -> Optional[dict[str, Any]]:
        return next((v for k, v in self.extra_config.items() if matches_any(prefix, [k])), None)

    def lm_head_method(self) -> Optional[LinearMethod]:
        # AutoRound quantizes the head only when extra_config names it (quant_lm_head).
        override = self._override("lm_head")
        if override is None or override.get("bits", self.bits) >= 16:
            return None
        return self._method(override)

    def method_for(self, prefix: str) -> Optional[LinearMethod]:
        override = self._override(prefix) or {}
        if override.get("bits", self.bits) >= 16 or prefix.endswith("lm_head"):
            return None
        blocks = self.block_name_to_quantize
        if blocks:
            names = blocks.split(",") if isinstance(blocks, str) else list(blocks)
            if not any(prefix.startswith(name + ".") for name in names):
                return None
        return self._method(override)

    def _method(self, override: dict[str, Any]) -> LinearMethod:
        bits = override.get("bits", self.bits)
        packing = self._PACKINGS[self.packing_format]
        group = override.get("group_size", self.group_size)
        sym = override.get("sym", self.sym)
        return IntWeightLinearMethod(IntScheme(bits, group, sym, packing))
