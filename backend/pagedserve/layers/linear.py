"""Linear layers and the linear-method plug-in point that quantization schemes implement.

A ``LinearMethod`` owns how a layer's weights are created, loaded and applied; the layer only
knows its logical shape (input size, output sizes of its merged shards). Checkpoint tensors
arrive through each parameter's ``weight_loader(param, tensor, shard_id)``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

ShardId = Union[int, str, None]


class LinearMethod(ABC):
    """How one kind of weights (unquantized, GPTQ, AWQ, FP8...) is stored and multiplied."""

    @abstractmethod
    def create_weights(
        self, layer: LinearBase, input_size: int, output_sizes: list[int], dtype: torch.dtype
    ) -> None:
        """Registers the layer's parameters, each with a ``weight_loader`` attribute."""

    @abstractmethod
    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``x @ W.T + bias`` for whatever W is."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Repacks loaded weights into the layout ``apply`` wants (no-op by default)."""


class UnquantizedLinearMethod(LinearMethod):
    """Plain dense weights [out, in] in the model dtype.

    On the CPU the loaded weight is handed to oneDNN once, in its blocked layout, and every
    call goes through oneDNN's matmul: 1.5-2x MKL's sgemm on this project's CPUs at both
    decode (M=64) and prefill (M=2048) sizes. The dense copy is dropped to save the memory.
    """

    def create_weights(
        self, layer: LinearBase, input_size: int, output_sizes: list[int], dtype: torch.dtype
    ) -> None:
        weight = nn.Parameter(
            torch.empty(sum(output_sizes), input_size, dtype=dtype), requires_grad=False
        )
        weight.weight_loader = layer.shard_loader(dim=0)
        layer.register_parameter("weight", weight)

    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        packed = getattr(layer, "onednn_weight", None)
        if packed is not None:
            return onednn_linear(x, packed, bias)
        return F.linear(x, layer.weight, bias)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        packed = onednn_pack(layer.weight)
        if packed is not None:
            layer.onednn_weight = packed
            del layer.weight
            layer.weight = None


def onednn_pack(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """``weight`` [out, in] in oneDNN's blocked layout, or None where oneDNN does not apply
    (not the CPU, not fp32/bf16, bf16 on a CPU without oneDNN's bf16 instructions, or a torch
    without the op; PAGEDSERVE_ONEDNN=0 turns it off)."""
    if (
        weight.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.bfloat16)
        or os.environ.get("PAGEDSERVE_ONEDNN", "1") == "0"
        or not torch.backends.mkldnn.is_available()
        or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        or (weight.dtype == torch.bfloat16 and not onednn_bf16_supported())
    ):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def onednn_bf16_supported() -> bool:
    """Whether oneDNN runs bf16 on this CPU: it needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, and
    refuses to pack bf16 weights elsewhere (an AVX2-only CPU); there bf16 takes torch's own path."""
    return bool(torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_unpack(packed: torch.Tensor, input_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense [out, in] weight that ``packed`` (from ``onednn_pack``) holds: oneDNN's product
    with the identity, exact (each output is one weight times 1.0 plus zeros)."""
    eye = torch.eye(input_size, dtype=dtype, device=packed.device)
    return torch.ops.mkldnn._linear_pointwise(eye, packed, None, "none", [], "").t().contiguous()


def onednn_rows(rows: int) -> int:
    """The row count a oneDNN matmul of ``rows`` rows is run with: a power of two up to 8, a
    multiple of 8 up to 64, then 8 sizes per octave (at most 12.5% padding there).

    oneDNN builds and caches one primitive (JIT code, ~0.5 MiB resident) per input shape, in
    two caches of 1024 entries each; a serving engine's steps have every row count from 1 to
    max_num_batched_tokens, so with exact shapes the process grew by hundreds of MiB over
    thousands of requests. These sizes keep the primitives few (51 up to 2048 rows), all
    built early, and the allocations they make repeat.
    """
    if rows <= 8:
        return 1 << (rows - 1).bit_length()
    if rows <= 64:
        return -(-rows // 8) * 8
    step = 1 << (rows - 1).bit_length() - 4
    return -(-rows // step) * step


def onednn_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``x @ W.T + bias`` through oneDNN with ``packed`` from ``onednn_pack``; the rows are
    padded to ``onednn_rows`` (zeros) and the result is its first ``len(x)`` rows."""
    rows = x.shape[0]
    padded = onednn_rows(rows)
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out if padded == rows else out[:rows]


class LinearBase(nn.Module):
    """A linear layer whose output is the concatenation of named shards (e.g. q, k, v).

    ``shard_names`` map checkpoint shard ids to positions; a single-shard layer uses None.
    ``prefix`` is the layer's module name in the model (for errors and per-layer choices).
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        *,
        bias: bool = False,
        shard_names: Optional[list[ShardId]] = None,
        linear_method: Optional[LinearMethod] = None,
        dtype: Optional[torch.dtype] = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.shard_names = list(shard_names) if shard_names is not None else [None]
        if len(self.shard_names) != len(self.output_sizes):
            raise ValueError("one shard name per output size is required")
        dtype = dtype or torch.get_default_dtype()
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, input_size, self.output_sizes, dtype)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(sum(output_sizes), dtype=dtype), requires_grad=False
            )
            self.bias.weight_loader = self.shard_loader(dim=0)
        else:
            self.register_parameter("bias", None)

    def shard_offset(self, shard_id: ShardId, scale: float = 1.0) -> tuple[int, int]:
        """(start, size) of a shard along the output dimension, scaled for packed layouts."""
        try:
            index = self.shard_names.index(shard_id)
        except ValueError:
            raise ValueError(
                f"unknown shard {shard_id!r} for a layer with shards {self.shard_names}"
            ) from None
        start = sum(self.output_sizes[:index])
        return int(start * scale), int(self.output_sizes[index] * scale)

    def shard_loader(
        self, dim: int, scale: float = 1.0
    ) -> Callable[[nn.Parameter, torch.Tensor, ShardId], None]:
        """A loader copying a checkpoint shard into its slice of ``dim`` of the parameter."""

        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
            start, size = self.shard_offset(shard_id, scale)
            target = param.data.narrow(dim, start, size)
            if tuple(target.shape) != tuple(loaded.shape):
                raise ValueError(
                    f"checkpoint shard {shard_id!r} has shape {tuple(loaded.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            target.copy_(loaded)

        return load

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)
