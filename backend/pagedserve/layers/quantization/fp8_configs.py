"""FP8 e4m3 without compressed-tensors: native checkpoints (``quant_method: fp8``) and the
online ``quantization: "fp8"`` of a full-precision checkpoint.

Native: ``activation_scheme`` static (a calibrated per-tensor ``input_scale``) or dynamic;
per-tensor ``weight_scale``, or ``weight_block_size`` [bn, bk] blocks whose multipliers are
stored as ``weight_scale_inv`` with per-token-group-of-bk dynamic activations. Dynamic
activations of per-tensor weights are quantized per token, as vLLM does where its CUTLASS
kernels run (elsewhere it quantizes per tensor, over the whole batch, which makes one request's
output depend on the others in its step).

Online: each linear weight is quantized at load, one fp8 scale per output channel (vLLM keeps
one per tensor), and the activations dynamically per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from pagedserve.layers.linear import LinearMethod
from pagedserve.layers.quantization.base import (
    QuantizationConfig,
    check_choice,
    field_error,
    matches_any,
)
from pagedserve.layers.quantization.w8a8_linear import (
    ACTIVATION_GROUP,
    W8A8LinearMethod,
    W8A8Scheme,
)


@dataclass
class Fp8Config(QuantizationConfig):
    """Native FP8 (``online`` False) or FP8 quantized at load (``online`` True)."""

    method: ClassVar[str] = "fp8"
    activation_scheme: str = "dynamic"
    weight_block_size: Optional[list[int]] = None
    fmt: str = "e4m3"
    ignored_layers: tuple[str, ...] = ()
    online: bool = False

    def __post_init__(self) -> None:
        check_choice(self.method, "activation_scheme", self.activation_scheme,
                     ("static", "dynamic"))
        check_choice(self.method, "fmt", self.fmt, ("e4m3",))
        block = self.weight_block_size
        if block is not None:
            if not (isinstance(block, list) and len(block) == 2 and int(block[0]) > 0
                    and block[1] == ACTIVATION_GROUP):
                raise field_error(self.method, "weight_block_size", block,
                                  f"is not supported: must be [rows, {ACTIVATION_GROUP}]")
            if self.activation_scheme != "dynamic":
                raise field_error(self.method, "activation_scheme", self.activation_scheme,
                                  "must be dynamic with weight_block_size")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Fp8Config:
        return cls(
            activation_scheme=raw.get("activation_scheme", "dynamic"),
            weight_block_size=raw.get("weight_block_size"),
            fmt=raw.get("fmt", "e4m3"),
            ignored_layers=tuple(raw.get("ignored_layers") or raw.get("modules_to_not_convert")
                                 or ()),
        )

    @classmethod
    def quantize_at_load(cls) -> Fp8Config:
        """The online method: a full-precision checkpoint's weights become fp8 at load."""
        return cls(online=True)

    def scheme(self) -> W8A8Scheme:
        fp8 = torch.float8_e4m3fn
        if self.online:
            return W8A8Scheme(fp8, "channel", "token", online=True)
        if self.weight_block_size is not None:
            bn, bk = self.weight_block_size
            return W8A8Scheme(fp8, "block", "group", (int(bn), int(bk)), "weight_scale_inv")
        activations = "static" if self.activation_scheme == "static" else "token"
        return W8A8Scheme(fp8, "tensor", activations)

    def method_for(self, prefix: str) -> Optional[LinearMethod]:
        if matches_any(prefix, self.ignored_layers):
            return None
        return W8A8LinearMethod(self.scheme())
