"""Linear layers and the linear-method plug-in point that quantization schemes implement.

A ``LinearMethod`` owns how a layer's weights are created, loaded and applied; the layer only
knows its logical shape (input size, output sizes of its merged shards). Checkpoint tensors
arrive through each parameter's ``weight_loader(param, tensor, shard_id)``.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.distributed import SINGLE_RANK, TensorParallelGroup, rank_slice

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
        weight.weight_loader = layer.shard_loader(dim=0, input_dim=1)
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

    Under tensor parallelism (``tp`` of more than one rank) a ``parallel="column"`` layer holds
    its rank's share of each shard's outputs (``shard_replicas[i]`` ranks hold the same slice of
    shard i: KV heads fewer than ranks) and a ``parallel="row"`` layer its share of the inputs,
    summing the ranks' partial outputs (bias added once, after the sum). ``input_size`` and
    ``output_sizes`` are then the rank's; ``full_input_size`` and ``full_output_sizes`` the
    checkpoint's. Each parameter's loader narrows the checkpoint tensor to the rank's part.
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
        tp: TensorParallelGroup = SINGLE_RANK,
        parallel: Optional[str] = None,
        shard_replicas: Optional[list[int]] = None,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.shard_names = list(shard_names) if shard_names is not None else [None]
        if len(self.shard_names) != len(output_sizes):
            raise ValueError("one shard name per output size is required")
        if parallel not in (None, "column", "row"):
            raise ValueError(f"{prefix}: parallel must be 'column', 'row' or None, "
                             f"got {parallel!r}")
        self.tp = tp
        self.parallel = parallel if tp.world_size > 1 else None
        self.full_input_size = input_size
        self.full_output_sizes = list(output_sizes)
        self.shard_replicas = list(shard_replicas or [1] * len(output_sizes))
        self.input_size, self.output_sizes = self._rank_sizes()
        dtype = dtype or torch.get_default_dtype()
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, self.input_size, self.output_sizes, dtype)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(sum(self.output_sizes), dtype=dtype), requires_grad=False
            )
            self.bias.weight_loader = self.shard_loader(dim=0)
        else:
            self.register_parameter("bias", None)

    def _rank_sizes(self) -> tuple[int, list[int]]:
        world = self.tp.world_size
        if self.parallel == "row":
            _, size = rank_slice(self.full_input_size, 0, world, f"{self.prefix}'s input size")
            return size, list(self.full_output_sizes)
        if self.parallel == "column":
            sizes = []
            for name, full, replicas in zip(self.shard_names, self.full_output_sizes,
                                            self.shard_replicas):
                what = f"{self.prefix}'s shard {name!r} ({full} outputs, {replicas} rank(s) each)"
                sizes.append(rank_slice(full * replicas, 0, world, what)[1])
            return self.full_input_size, sizes
        return self.full_input_size, list(self.full_output_sizes)

    def shard_offset(self, shard_id: ShardId, scale: float = 1.0) -> tuple[int, int]:
        """(start, size) of a shard along the output dimension, scaled for packed layouts."""
        index = self._shard_index(shard_id)
        start = sum(self.output_sizes[:index])
        return int(start * scale), int(self.output_sizes[index] * scale)

    def _shard_index(self, shard_id: ShardId) -> int:
        try:
            return self.shard_names.index(shard_id)
        except ValueError:
            raise ValueError(
                f"unknown shard {shard_id!r} for a layer with shards {self.shard_names}"
            ) from None

    def checkpoint_shape(self, shard_id: ShardId) -> tuple[int, int]:
        """The checkpoint's logical [out, in] of a shard (the whole, not the rank's part)."""
        return self.full_output_sizes[self._shard_index(shard_id)], self.full_input_size

    def rank_part(self, loaded: torch.Tensor, shard_id: ShardId, dim: int, scale: float,
                  input_dim: Optional[int], input_scale: float) -> torch.Tensor:
        """This rank's part of checkpoint tensor ``loaded`` (a shard): its outputs along ``dim``
        (column-parallel) or its inputs along ``input_dim`` (row-parallel), each dimension
        counted in logical elements times its scale (packed words, groups)."""
        if self.parallel == "column":
            index = self._shard_index(shard_id)
            size = self.output_sizes[index]
            start = (self.tp.rank // self.shard_replicas[index]) * size
            return _narrow(loaded, dim, start, size, scale, self.full_output_sizes[index])
        if self.parallel == "row" and input_dim is not None:
            size = self.input_size
            return _narrow(loaded, input_dim, self.tp.rank * size, size, input_scale,
                           self.full_input_size)
        return loaded

    def shard_loader(
        self, dim: int, scale: float = 1.0, input_dim: Optional[int] = None,
        input_scale: float = 1.0,
    ) -> Callable[[nn.Parameter, torch.Tensor, ShardId], None]:
        """A loader copying a checkpoint shard into its slice of ``dim`` of the parameter.
        ``input_dim`` (None: the tensor has none, e.g. a bias) is where a row-parallel layer
        takes its rank's inputs; ``scale`` and ``input_scale`` convert logical sizes to the
        tensor's (1/8 for 4-bit values packed in int32 words, 1/group for group scales)."""

        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
            loaded = self.rank_part(loaded, shard_id, dim, scale, input_dim, input_scale)
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
        if self.parallel != "row" or self.tp.world_size == 1:  # one rank: the fused bias
            return self.linear_method.apply(self, x, self.bias)
        # Each rank's product is a partial sum over its inputs: the bias belongs to the total.
        out = self.tp.all_reduce(self.linear_method.apply(self, x, None))
        return out if self.bias is None else out + self.bias


def _narrow(loaded: torch.Tensor, dim: int, start: int, size: int, scale: float,
            full: int) -> torch.Tensor:
    """``loaded``'s elements [start, start + size) of ``full`` logical ones along ``dim``,
    where the tensor stores ``scale`` entries per logical element."""
    expected = full * scale
    if loaded.shape[dim] != math.ceil(expected):
        raise ValueError(
            f"has {loaded.shape[dim]} entries along dim {dim}, expected {math.ceil(expected)} "
            "(the whole checkpoint tensor, before the rank's part is taken)"
        )
    first, length = start * scale, size * scale
    if not (float(first).is_integer() and float(length).is_integer()):
        raise ValueError(
            f"the rank's part [{start}, {start + size}) does not fall on whole entries of a "
            f"tensor holding {scale:g} per element along dim {dim} (packed values or groups "
            "split across ranks); this tensor_parallel_size does not fit the layer"
        )
    return loaded.narrow(dim, int(first), int(length))
