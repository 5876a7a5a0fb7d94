"""compressed-tensors (llm-compressor) checkpoints: each config group's scheme becomes a layer
method. ``pack-quantized`` int weights with 16-bit activations (W4A16 / W8A16, symmetric or
not, group or channel strategy) run as IntWeightLinearMethod; ``int-quantized`` W8A8 (int8
weights per channel or tensor, activations static per tensor or dynamic per token) and
``float-quantized`` FP8 (per tensor, per channel with per-token activations, 128x128 blocks with
per-token-group-of-128 activations) as W8A8LinearMethod. ``ignore`` leaves layers unquantized;
anything else fails naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from pagedserve.layers.linear import LinearMethod
from pagedserve.layers.quantization.base import (
    QuantizationConfig,
    check_choice,
    field_error,
    matches_any,
)
from pagedserve.layers.quantization.int_configs import INT_BITS, INT_GROUPS
from pagedserve.layers.quantization.int_linear import IntScheme, IntWeightLinearMethod
from pagedserve.layers.quantization.w8a8_linear import (
    ACTIVATION_GROUP,
    W8A8LinearMethod,
    W8A8Scheme,
)

METHOD = "compressed-tensors"
FORMATS = ("pack-quantized", "int-quantized", "float-quantized")
# The weights' type each format stores.
_FORMAT_TYPE = {"pack-quantized": "int", "int-quantized": "int", "float-quantized": "float"}


def _check(value: Any, name: str, allowed) -> None:
    check_choice(METHOD, name, value, allowed)


def _weight_only_scheme(where: str, group: dict[str, Any]) -> IntScheme:
    weights = group["weights"]
    if group.get("input_activations"):
        raise field_error(METHOD, f"{where}.input_activations", group["input_activations"],
                          "is not supported with pack-quantized weights (only weight-only int "
                          "schemes)")
    _check(weights.get("num_bits"), f"{where}.weights.num_bits", INT_BITS)
    _check(weights.get("strategy"), f"{where}.weights.strategy", ("group", "channel"))
    if weights.get("strategy") == "group":
        _check(weights.get("group_size"), f"{where}.weights.group_size", INT_GROUPS[1:])
    size = weights.get("group_size") if weights.get("strategy") == "group" else -1
    return IntScheme(weights["num_bits"], size, bool(weights.get("symmetric", True)),
                     "pack_quantized")


def _w8a8_scheme(where: str, group: dict[str, Any], is_float: bool) -> W8A8Scheme:
    weights = group["weights"]
    _check(weights.get("num_bits"), f"{where}.weights.num_bits", (8,))
    _check(weights.get("symmetric", True), f"{where}.weights.symmetric", (True,))
    _check(weights.get("dynamic", False), f"{where}.weights.dynamic", (False,))
    strategies = ("tensor", "channel", "block") if is_float else ("tensor", "channel")
    strategy = weights.get("strategy")
    _check(strategy, f"{where}.weights.strategy", strategies)
    block = None
    if strategy == "block":
        structure = weights.get("block_structure")
        if not (isinstance(structure, list) and len(structure) == 2
                and structure[1] == ACTIVATION_GROUP and int(structure[0]) > 0):
            raise field_error(METHOD, f"{where}.weights.block_structure", structure,
                              f"is not supported: must be [rows, {ACTIVATION_GROUP}]")
        block = (int(structure[0]), int(structure[1]))
    acts = group.get("input_activations")
    if not acts:
        raise field_error(METHOD, f"{where}.input_activations", acts,
                          "must be set for int-quantized / float-quantized weights "
                          "(8-bit weight-only schemes are not supported)")
    a = f"{where}.input_activations"
    _check(acts.get("num_bits"), f"{a}.num_bits", (8,))
    _check(acts.get("type"), f"{a}.type", (weights.get("type"),))
    _check(acts.get("symmetric", True), f"{a}.symmetric", (True,))
    if acts.get("dynamic"):
        activations = "group" if strategy == "block" else "token"
        _check(acts.get("strategy"), f"{a}.strategy", (activations,))
        if activations == "group":
            _check(acts.get("group_size"), f"{a}.group_size", (ACTIVATION_GROUP,))
    else:
        activations = "static"
        _check(acts.get("strategy"), f"{a}.strategy", ("tensor",))
        if strategy == "block":
            raise field_error(METHOD, f"{a}.dynamic", False,
                              "must be true with block-quantized weights")
    return W8A8Scheme(torch.float8_e4m3fn if is_float else torch.int8, strategy,
                      activations, block)


@dataclass
class CompressedTensorsConfig(QuantizationConfig):
    """A compressed-tensors checkpoint: its format, config groups and ignored layers."""

    method: ClassVar[str] = METHOD
    format: str = "pack-quantized"
    config_groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    schemes: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _check(self.format, "format", FORMATS + ("mixed-precision",))
        if not self.config_groups:
            raise field_error(METHOD, "config_groups", self.config_groups,
                              "must name at least one group")
        for name, group in self.config_groups.items():
            where = f"config_groups.{name}"
            weights = group.get("weights") or {}
            fmt = group.get("format") or self.format
            _check(fmt, f"{where}.format", FORMATS)
            if weights.get("type") != _FORMAT_TYPE[fmt]:
                raise field_error(METHOD, "format", fmt,
                                  f"does not fit {where}.weights (type "
                                  f"{weights.get('type')!r}, {weights.get('num_bits')} bits)")
            # "weight" (alias "static") only ordered the quantization: groups stay contiguous
            # and no g_idx is stored, so loading is unchanged. "group" ("dynamic") stores one.
            if weights.get("actorder") not in (None, "weight", "static"):
                raise field_error(METHOD, f"{where}.weights.actorder", weights["actorder"],
                                  "is not supported")
            if not group.get("targets"):
                raise field_error(METHOD, f"{where}.targets", group.get("targets"),
                                  "must name the layers")
            if fmt == "pack-quantized":
                self.schemes[name] = _weight_only_scheme(where, group)
            else:
                self.schemes[name] = _w8a8_scheme(where, group, fmt == "float-quantized")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CompressedTensorsConfig:
        return cls(
            format=raw.get("format", "pack-quantized"),
            config_groups=raw.get("config_groups") or {},
            ignore=tuple(raw.get("ignore") or ()),
        )

    def method_for(self, prefix: str) -> Optional[LinearMethod]:
        if matches_any(prefix, self.ignore):
            return None
        for name, group in self.config_groups.items():
            targets = group["targets"]
            if "Linear" in targets or matches_any(prefix, targets):
                scheme = self.schemes[name]
                if isinstance(scheme, IntScheme):
                    return IntWeightLinearMethod(scheme)
                return W8A8LinearMethod(scheme)
        return None
