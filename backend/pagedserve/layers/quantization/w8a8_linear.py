"""The linear method of every W8A8 format (compressed-tensors int-quantized and float-quantized,
native FP8, online FP8): 8-bit weights (int8 or fp8 e4m3) and activations quantized on each
call as the producer meant (static per tensor, dynamic per token, or per token and group of
128). The checkpoint's tensors are loaded per shard of a fused layer and turned once into a
``W8A8Weight``, which stays 8-bit in memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from pagedserve.layers.kernel_dispatch import ops_for
from pagedserve.layers.linear import LinearBase, LinearMethod, ShardId, UnquantizedLinearMethod
from pagedserve.layers.quantization.w8a8_cpu import cpu_scaled_matmul, dense_weight
from pagedserve_kernels import reference

WEIGHT_STRATEGIES = ("tensor", "channel", "block")
ACTIVATION_SCHEMES = ("static", "token", "group")
ACTIVATION_GROUP = 128  # the per-token-group size of block-quantized FP8


@dataclass(frozen=True)
class W8A8Scheme:
    """One layer's W8A8 format: the weights' dtype and scale strategy (``block`` = [bn, bk]
    blocks), how activations are quantized, the scale tensor's checkpoint name (native FP8's
    block scales are ``weight_scale_inv``), and whether the weights are quantized at load from
    a full-precision checkpoint (online FP8)."""

    weight_dtype: torch.dtype
    weight_strategy: str
    activations: str
    block: Optional[tuple[int, int]] = None
    scale_name: str = "weight_scale"
    online: bool = False


@dataclass
class W8A8Weight:
    """A layer's quantized weight, as every matmul path reads it: ``qweight`` [N, K] (int8 or
    fp8), ``scale`` fp32 [N, G] (G = 1 per channel; G = K / bk for blocks, expanded per row) and
    the static input scales: (first row, rows, scale [1]) per run of output rows that share
    one; a single run of all N rows unless a fused layer's shards were calibrated apart."""

    qweight: torch.Tensor
    scale: torch.Tensor
    input_scales: list[tuple[int, int, Optional[torch.Tensor]]]
    activation_group: int  # K for per-token (or static) activations, 128 for per-token-group

    def dense(self) -> torch.Tensor:
        """The dequantized weight [N, K] (fp32), for tests and tools; not the hot path."""
        return dense_weight(self.qweight, self.scale)


class W8A8LinearMethod(LinearMethod):
    """Loads and runs one W8A8 scheme.

    Under tensor parallelism each rank loads its part: the weight's rows (column-parallel) or
    columns (row-parallel), per-channel scales with the rows, block scales with the blocks
    (a rank's part must be whole blocks), per-tensor and static input scales whole. Static,
    per-tensor and per-token-group activations are then quantized exactly as on one rank; a
    row-parallel layer quantizing per token takes each token's scale over the rank's inputs
    only, as vLLM does: a finer quantization than one rank's, so the logits differ at
    quantization level, not just in summation order. Online FP8 likewise scales a
    row-parallel weight per row of the rank's columns."""

    def __init__(self, scheme: W8A8Scheme) -> None:
        self.scheme = scheme

    # ---- the checkpoint's tensors ----------------------------------------------------------

    def create_weights(
        self, layer: LinearBase, input_size: int, output_sizes: list[int], dtype: torch.dtype
    ) -> None:
        s = self.scheme
        if s.online:
            UnquantizedLinearMethod().create_weights(layer, input_size, output_sizes, dtype)
            return
        n, shards = sum(output_sizes), len(output_sizes)

        def add(name: str, shape: tuple[int, ...], kind: torch.dtype, loader) -> None:
            param = nn.Parameter(torch.zeros(shape, dtype=kind), requires_grad=False)
            param.weight_loader = loader
            layer.register_parameter(name, param)

        add("weight", (n, input_size), s.weight_dtype,
            _dtype_checked(layer.shard_loader(dim=0, input_dim=1), s.weight_dtype))
        if s.weight_strategy == "tensor":
            add(s.scale_name, (shards,), torch.float32, _scalar_loader(layer))
        elif s.weight_strategy == "channel":
            add(s.scale_name, (n, 1), torch.float32, layer.shard_loader(dim=0))
        else:
            bn, bk = s.block
            if input_size % bk:
                raise ValueError(
                    f"{layer.prefix}: input size {input_size}{_per_rank(layer)} is not a "
                    f"multiple of the weight block's {bk} columns (quantization_config "
                    "weight_block_size / block_structure)"
                )
            rows = sum(-(-size // bn) for size in output_sizes)
            add(s.scale_name, (rows, input_size // bk), torch.float32,
                _block_loader(layer, bn, bk))
        if s.activations == "static":
            add("input_scale", (shards,), torch.float32, _scalar_loader(layer))
        if s.activations == "group" and input_size % ACTIVATION_GROUP:
            raise ValueError(
                f"{layer.prefix}: input size {input_size}{_per_rank(layer)} is not a multiple "
                f"of the activations' quantization group of {ACTIVATION_GROUP}"
            )

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        s = self.scheme
        n, k = sum(layer.output_sizes), layer.input_size
        if s.online:
            dense = layer.weight.data.float()
            scale = dense.abs().amax(-1, keepdim=True).clamp(min=1e-12) / reference.FP8_MAX
            qweight = (dense / scale).clamp(-reference.FP8_MAX, reference.FP8_MAX).to(
                torch.float8_e4m3fn)
        else:
            qweight, scale = layer.weight.data, self._row_scales(layer)
        input_scales: list[tuple[int, int, Optional[torch.Tensor]]] = [(0, n, None)]
        if s.activations == "static":
            values = layer.input_scale.data
            if bool((values == values[0]).all()):
                input_scales = [(0, n, values[:1].clone())]
            else:  # q/k/v calibrated apart: each shard quantizes x with its own scale (exact)
                input_scales = [(*layer.shard_offset(shard), values[i:i + 1].clone())
                                for i, shard in enumerate(layer.shard_names)]
        for name in ("weight", s.scale_name, "input_scale"):
            if name in layer._parameters:
                del layer._parameters[name]
        layer.w8a8 = W8A8Weight(
            qweight=qweight.contiguous(),
            scale=scale.float().contiguous(),
            input_scales=input_scales,
            activation_group=ACTIVATION_GROUP if s.activations == "group" else k,
        )

    def _row_scales(self, layer: LinearBase) -> torch.Tensor:
        """The checkpoint's weight scales as [N, G]: per-shard scalars and block rows repeated
        over the output rows they cover."""
        s = self.scheme
        stored = getattr(layer, s.scale_name).data
        if s.weight_strategy == "channel":
            return stored
        if s.weight_strategy == "tensor":
            sizes = torch.tensor(layer.output_sizes, device=stored.device)
            return stored.repeat_interleave(sizes).unsqueeze(-1)
        bn = s.block[0]
        index, first_block = [], 0
        for size in layer.output_sizes:
            index.append(first_block + torch.arange(size, device=stored.device) // bn)
            first_block += -(-size // bn)
        return stored.index_select(0, torch.cat(index))

    # ---- the matmul --------------------------------------------------------------------------

    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        w: W8A8Weight = layer.w8a8
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        parts = []
        for first, rows, static in w.input_scales:
            qweight, scale = w.qweight, w.scale
            if rows != qweight.shape[0]:
                qweight, scale = qweight[first:first + rows], scale[first:first + rows]
            xq, x_scale = reference.quantize_activation(
                x2, qweight.dtype, static, w.activation_group)
            parts.append(_scaled_matmul(xq, x_scale, qweight, scale, x.dtype))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if bias is not None:
            out = out + bias
        return out.view(*lead, out.shape[-1])


def _scaled_matmul(
    xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if not xq.is_cuda:
        return cpu_scaled_matmul(xq, x_scale, qweight, scale, out_dtype)
    if _scaled_mm_applies(xq, x_scale, qweight, scale, out_dtype):
        # cuBLASLt's fp8 GEMM with row-wise scales (SM90+, bf16 out): per-token x per-channel.
        return torch._scaled_mm(
            xq, qweight.t(), scale_a=x_scale.expand(xq.shape[0], 1).contiguous(),
            scale_b=scale.t().contiguous(), out_dtype=out_dtype,
        )
    ops = ops_for(xq) or reference
    return ops.scaled_matmul(xq, x_scale, qweight, scale, out_dtype)


def _scaled_mm_applies(
    xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> bool:
    return (
        xq.dtype == torch.float8_e4m3fn
        and x_scale.shape[1] == 1 and scale.shape[1] == 1
        and out_dtype == torch.bfloat16
        and xq.shape[1] % 16 == 0 and qweight.shape[0] % 16 == 0
        and _capability(xq.device.index if xq.device.index is not None
                        else torch.cuda.current_device()) >= (9, 0)
    )


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _per_rank(layer: LinearBase) -> str:
    """Says that a size is a rank's share, where it is."""
    if layer.parallel != "row":
        return ""
    return f" (each rank's share, tensor_parallel_size {layer.tp.world_size})"


def _dtype_checked(loader, dtype: torch.dtype):
    """A loader that refuses a tensor of another dtype (a silent cast would change values)."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if loaded.dtype != dtype:
            raise ValueError(f"has dtype {loaded.dtype}, expected {dtype}")
        loader(param, loaded, shard_id)

    return load


def _scalar_loader(layer: LinearBase):
    """A per-tensor scale ([] or [1]) of one shard, kept per shard: a fused layer's shards
    were quantized with scales of their own, and keeping each is exact."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if loaded.numel() != 1:
            raise ValueError(f"has shape {tuple(loaded.shape)}, expected one value per tensor")
        param.data[layer.shard_names.index(shard_id)] = loaded.reshape(()).float()

    return load


def _block_loader(layer: LinearBase, block_rows: int, block_cols: int):
    """Block scales [ceil(n / bn), K / bk] of one shard (the rank's blocks of it), stacked
    shard after shard."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        loaded = layer.rank_part(loaded, shard_id, 0, 1 / block_rows, 1, 1 / block_cols)
        index = layer.shard_names.index(shard_id)
        start = sum(-(-size // block_rows) for size in layer.output_sizes[:index])
        rows = -(-layer.output_sizes[index] // block_rows)
        target = param.data.narrow(0, start, rows)
        if tuple(loaded.shape) != tuple(target.shape):
            raise ValueError(
                f"has shape {tuple(loaded.shape)}, expected {tuple(target.shape)} (one scale "
                f"per block of {block_rows} rows)"
            )
        target.copy_(loaded)

    return load
