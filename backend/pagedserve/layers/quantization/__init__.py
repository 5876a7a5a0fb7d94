"""Quantized checkpoints: the registry of QuantizationConfigs, keyed by vLLM's method names,
and how a checkpoint's quantization is found (config.json's ``quantization_config``, else the
legacy ``quantize_config.json`` of GPTQ or ``quant_config.json`` of AWQ) and checked against the
``quantization`` engine argument."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pagedserve.layers.quantization.base import QuantizationConfig
from pagedserve.layers.quantization.compressed_tensors import CompressedTensorsConfig
from pagedserve.layers.quantization.fp8_configs import Fp8Config
from pagedserve.layers.quantization.int_configs import AutoRoundConfig, AWQConfig, GPTQConfig

QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {
    cls.method: cls
    for cls in (GPTQConfig, AWQConfig, AutoRoundConfig, CompressedTensorsConfig, Fp8Config)
}
# Other names users give the same methods (vLLM's kernel-specific variants, legacy names).
_ALIASES = {
    "gptq_marlin": "gptq", "gptq_bitblas": "gptq", "awq_marlin": "awq", "inc": "auto-round",
    "auto_round": "auto-round", "intel/auto-round": "auto-round",
}


def canonical_method(name: str) -> str:
    """A method name as the registry knows it; ValueError naming the engine argument else."""
    name = _ALIASES.get(name.lower(), name.lower())
    if name not in QUANTIZATION_METHODS:
        raise ValueError(
            f"engine argument 'quantization' {name!r} is not supported; supported: "
            f"{', '.join(sorted(QUANTIZATION_METHODS))}"
        )
    return name


def checkpoint_quantization(path: Path, raw: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The checkpoint's quantization_config (with a quant_method), or None if unquantized."""
    config = raw.get("quantization_config")
    if config is None:
        for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
            legacy = path / name
            if legacy.is_file():
                config = {"quant_method": method, **json.loads(legacy.read_text())}
                break
    if config is None:
        return None
    if not isinstance(config, dict) or not config.get("quant_method"):
        raise ValueError(f"{path}: quantization_config has no quant_method")
    return config


def parse_quantization(
    path: Path, raw: dict[str, Any], requested: Optional[str] = None
) -> Optional[QuantizationConfig]:
    """The checkpoint's QuantizationConfig; ``requested`` (the engine argument) must agree, or
    be ``fp8`` for a full-precision checkpoint (quantized at load)."""
    config = checkpoint_quantization(path, raw)
    if config is None:
        if requested is None:
            return None
        if canonical_method(requested) == Fp8Config.method:
            return Fp8Config.quantize_at_load()
        raise ValueError(
            f"engine argument 'quantization' is {requested!r} but {path} is not quantized "
            "(no quantization_config); only 'fp8' quantizes at load"
        )
    quant_method = str(config["quant_method"])
    try:
        method = canonical_method(quant_method)
    except ValueError:
        raise ValueError(
            f"{path}: quantization_config.quant_method {quant_method!r} is not supported; "
            f"supported: {', '.join(sorted(QUANTIZATION_METHODS))}"
        ) from None
    if requested is not None and canonical_method(requested) != method:
        raise ValueError(
            f"engine argument 'quantization' is {requested!r} but the checkpoint {path} is "
            f"quantized with {quant_method!r}"
        )
    return QUANTIZATION_METHODS[method].from_dict(config)


__all__ = ["QUANTIZATION_METHODS", "QuantizationConfig", "canonical_method",
           "parse_quantization"]
