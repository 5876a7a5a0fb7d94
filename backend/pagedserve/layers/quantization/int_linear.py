"""The linear method of every integer weight-only format: the checkpoint's tensors are loaded
as the format writes them (per shard of a fused layer), converted once to ``IntWeight`` and
multiplied by the device's kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from pagedserve.layers.kernel_dispatch import ops_for
from pagedserve.layers.linear import LinearBase, LinearMethod, ShardId
from pagedserve.layers.quantization.int_layout import CpuIntKernel, IntWeight, make_int_weight
from pagedserve.layers.quantization.packing import (
    awq_unpack_cols,
    unpack_cols,
    unpack_rows,
    values_per_word,
)

# How the checkpoint stores the values (see docs/quantization.md and the reference note):
# gptq / gptq_v2: qweight [K/pf, N] along K, qzeros [G, N/pf] along N (v1 stores zero - 1);
# awq: qweight [K, N/8], qzeros [G, N/8], AWQ's interleaved order;
# pack_quantized (compressed-tensors): weight_packed [N, K/pf] along K, offset by 2**(b-1),
#   weight_scale [N, G], weight_zero_point [N/pf, G] along N (asymmetric only).
CHECKPOINT_FORMATS = ("gptq", "gptq_v2", "awq", "pack_quantized")


@dataclass(frozen=True)
class IntScheme:
    """What one layer's weights are: bits, group size (-1: one group over K), symmetric,
    the checkpoint format, and whether a g_idx must be present (act order)."""

    bits: int
    group_size: int
    sym: bool
    checkpoint_format: str
    desc_act: bool = False


class IntWeightLinearMethod(LinearMethod):
    """Loads an integer weight-only checkpoint's tensors and runs them kept quantized."""

    def __init__(self, scheme: IntScheme) -> None:
        self.scheme = scheme

    # ---- the checkpoint's tensors ----------------------------------------------------------

    def create_weights(
        self, layer: LinearBase, input_size: int, output_sizes: list[int], dtype: torch.dtype
    ) -> None:
        s = self.scheme
        pf = values_per_word(s.bits)
        n = sum(output_sizes)
        group = input_size if s.group_size == -1 else s.group_size
        groups = -(-input_size // group)
        for size in output_sizes:
            if size % pf:
                raise ValueError(
                    f"{layer.prefix}: output size {size} is not a multiple of {pf}, which "
                    f"{s.bits}-bit {s.checkpoint_format} checkpoints pack"
                )
        layer.int_dtype = dtype
        layer.int_shapes = (input_size, n, group)
        # A row-parallel rank takes its inputs' rows of the values and its groups of the scales
        # and zeros; one group over all of K (group_size -1) is every rank's whole.
        gdim = None if s.group_size == -1 else 0
        if layer.parallel == "row":
            _check_row_split(layer, s, input_size, pf)

        def add(name: str, shape: tuple[int, ...], kind: torch.dtype, loader) -> None:
            param = nn.Parameter(torch.zeros(shape, dtype=kind), requires_grad=False)
            param.weight_loader = loader
            layer.register_parameter(name, param)

        fmt = s.checkpoint_format
        sl = layer.shard_loader
        if fmt in ("gptq", "gptq_v2"):
            add("qweight", (-(-input_size // pf), n), torch.int32, sl(1, input_dim=0,
                                                                     input_scale=1 / pf))
            add("qzeros", (groups, n // pf), torch.int32, sl(1, 1 / pf, gdim, 1 / group))
            add("scales", (groups, n), torch.float32, sl(1, 1.0, gdim, 1 / group))
            add("g_idx", (input_size,), torch.int32,
                _g_idx_loader(layer, None if gdim is None else group))
            layer.g_idx.optional = True
        elif fmt == "awq":
            add("qweight", (input_size, n // pf), torch.int32, sl(1, 1 / pf, input_dim=0))
            add("qzeros", (groups, n // pf), torch.int32, sl(1, 1 / pf, gdim, 1 / group))
            add("scales", (groups, n), torch.float32, sl(1, 1.0, gdim, 1 / group))
        elif fmt == "pack_quantized":
            gdim = None if gdim is None else 1
            add("weight_packed", (n, -(-input_size // pf)), torch.int32,
                sl(0, input_dim=1, input_scale=1 / pf))
            add("weight_scale", (n, groups), torch.float32, sl(0, 1.0, gdim, 1 / group))
            add("weight_shape", (2,), torch.int64, _shape_loader(layer))
            if not s.sym:
                add("weight_zero_point", (n // pf, groups), torch.int32,
                    sl(0, 1 / pf, gdim, 1 / group))
        else:
            raise ValueError(f"unknown checkpoint format {fmt!r}")

    def checkpoint_values(self, layer: LinearBase) -> tuple[torch.Tensor, ...]:
        """(q [K, N] unsigned, scales [G, N], zeros [G, N], g_idx or None) from the tensors."""
        s = self.scheme
        k, n, _ = layer.int_shapes
        mid = 1 << (s.bits - 1)
        fmt = s.checkpoint_format
        if fmt in ("gptq", "gptq_v2"):
            q = unpack_rows(layer.qweight.data, s.bits, k)
            zeros = unpack_cols(layer.qzeros.data, s.bits, n)
            zeros = _gptq_zeros(zeros, s, layer.prefix)
            g_idx = layer.g_idx.data if getattr(layer, "g_idx_loaded", False) else None
            if s.desc_act and g_idx is None:
                raise ValueError(f"{layer.prefix}: desc_act is set but the checkpoint has no g_idx")
            return q, layer.scales.data, zeros, g_idx
        if fmt == "awq":
            q = awq_unpack_cols(layer.qweight.data, n)
            return q, layer.scales.data, awq_unpack_cols(layer.qzeros.data, n), None
        # Both values and zero points are stored offset by 2**(b-1): their difference is kept.
        q = unpack_cols(layer.weight_packed.data, s.bits, k).t()
        if s.sym:
            zeros = torch.full_like(layer.weight_scale.data, mid, dtype=torch.int32)
        else:
            zeros = unpack_rows(layer.weight_zero_point.data, s.bits, n)
        return q, layer.weight_scale.data.t(), zeros.t(), None

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        s = self.scheme
        q, scales, zeros, g_idx = self.checkpoint_values(layer)
        k, n, group = layer.int_shapes
        weight = make_int_weight(
            q, scales, zeros, g_idx, s.bits, group, layer.int_dtype, layer.prefix
        )
        for name in ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale",
                     "weight_shape", "weight_zero_point"):
            if name in layer._parameters:
                del layer._parameters[name]
        # On the CPU the kernel holds its own repacked copy; the layout's is dropped.
        layer.cpu_kernel = CpuIntKernel(weight) if weight.qweight.device.type == "cpu" else None
        layer.int_weight = weight if layer.cpu_kernel is None else None

    # ---- the matmul --------------------------------------------------------------------------

    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if layer.cpu_kernel is not None:
            out = layer.cpu_kernel.matmul(x2)
        else:
            w: IntWeight = layer.int_weight
            ops = ops_for(x2)
            if ops is None:
                from pagedserve_kernels import reference as ops
            out = ops.int_weight_matmul(
                x2, w.qweight, w.scales, w.zeros, w.perm, w.bits, w.group_size
            )
        if bias is not None:
            out = out + bias
        return out.view(*lead, out.shape[-1])


def _gptq_zeros(stored: torch.Tensor, s: IntScheme, prefix: str) -> torch.Tensor:
    """GPTQ v1 stores zero - 1, v2 the zero itself. A symmetric checkpoint's zeros are all
    2**(b-1); one labelled v1 whose stored zeros already are that was written as v2 (a known
    mislabelling), and is read as v2."""
    mid = 1 << (s.bits - 1)
    v2 = s.checkpoint_format == "gptq_v2"
    if s.sym:
        if not v2 and bool((stored == mid).all()):
            v2 = True
        expected = mid if v2 else mid - 1
        if not bool((stored == expected).all()):
            raise ValueError(
                f"{prefix}: sym is true but qzeros are not all {expected} "
                f"(checkpoint_format {s.checkpoint_format!r})"
            )
    return stored if v2 else stored + 1


def _check_row_split(layer: LinearBase, s: IntScheme, input_size: int, pf: int) -> None:
    """A row-parallel rank's inputs must start on a group (and a packed word): its scales are
    then whole groups. Act order (desc_act) mixes the groups over K, so no rank's rows own
    their groups: refused."""
    world = layer.tp.world_size
    if s.desc_act:
        raise ValueError(
            f"{layer.prefix}: act order (quantization_config.desc_act) across a row-parallel "
            f"split (tensor_parallel_size {world}) is not supported; use a checkpoint without "
            "desc_act or tensor_parallel_size 1"
        )
    if s.group_size != -1 and input_size % s.group_size:
        raise ValueError(
            f"{layer.prefix}: each rank's {input_size} inputs (tensor_parallel_size {world}) "
            f"are not a whole number of quantization groups (group_size {s.group_size})"
        )
    if s.checkpoint_format != "awq" and input_size % pf:  # AWQ packs along N, not K
        raise ValueError(
            f"{layer.prefix}: each rank's {input_size} inputs (tensor_parallel_size {world}) "
            f"are not a whole number of {s.bits}-bit values packed {pf} per int32 word"
        )


def _g_idx_loader(layer: LinearBase, group: Optional[int]):
    """GPTQ's g_idx (each input's group): each shard of a fused layer carries it whole (q, k
    and v see the same inputs, so their act order is the same) and the shards must agree. A
    row-parallel rank takes its inputs' entries, renumbered to its own groups (which must be
    the groups its inputs start at: no act order); ``group`` None: one group over all of K,
    every rank's whole."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if layer.parallel == "row":
            if tuple(loaded.shape) != (layer.full_input_size,):
                raise ValueError(f"has shape {tuple(loaded.shape)}, expected "
                                 f"({layer.full_input_size},)")
            start = layer.tp.rank * layer.input_size
            first, groups = (0, 1) if group is None else (start // group,
                                                          -(-layer.input_size // group))
            loaded = loaded.narrow(0, start, layer.input_size) - first
            if bool((loaded < 0).any()) or bool((loaded >= groups).any()):
                raise ValueError(
                    f"maps rank {layer.tp.rank}'s inputs to groups of other ranks: act order "
                    f"(desc_act) across a row-parallel split (tensor_parallel_size "
                    f"{layer.tp.world_size}) is not supported"
                )
        if tuple(loaded.shape) != tuple(param.shape):
            raise ValueError(f"has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
        if getattr(layer, "g_idx_loaded", False):
            if not torch.equal(param.data, loaded.to(param.dtype)):
                raise ValueError(
                    f"differs between the shards of {layer.prefix} (shard {shard_id!r}); "
                    "fused layers need one act order"
                )
            return
        param.data.copy_(loaded)
        layer.g_idx_loaded = True

    return load


def _shape_loader(layer: LinearBase):
    """compressed-tensors' weight_shape: checked against the shard's logical shape in the
    checkpoint (the whole layer's, before any rank takes its part)."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        size, input_size = layer.checkpoint_shape(shard_id)
        if [int(v) for v in loaded.reshape(-1)] != [size, input_size]:
            raise ValueError(
                f"is {loaded.tolist()}, but the layer's shard is [{size}, {input_size}]"
            )

    return load
