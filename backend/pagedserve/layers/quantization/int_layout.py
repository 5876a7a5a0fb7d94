"""The one internal layout every integer weight-only format (GPTQ, AWQ, AutoRound,
compressed-tensors pack-quantized) is converted to at load, and the matmuls that run from it.

``IntWeight`` is GPTQ's layout made canonical: unsigned b-bit values packed along K into int32
words ``[K/pf, N]``, one scale and one integer zero point per (group, output channel), groups
contiguous along K. Act-order checkpoints (a non-monotone ``g_idx``) are made contiguous by
permuting K at load; the input is permuted the same way on each call (``perm``). The Triton
dequantize-GEMM reads this layout as is; on the CPU it is repacked once into the layouts of
torch's weight-only kernels (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``), whose
vectorized code paths take bfloat16 activations (float32 runs exact, but slower).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagedserve.layers.quantization.packing import pack_rows, unpack_rows

# Group sizes torch's CPU int4 kernel takes.
_CPU_INT4_GROUPS = (256, 128, 64, 32)


@dataclass
class IntWeight:
    """A quantized weight W[n, k] = scales[g, n] * (q[k, n] - zeros[g, n]), g = k // group_size,
    with k in ``perm`` order (x[:, perm] meets the weight's K order)."""

    qweight: torch.Tensor  # int32 [ceil(K / pf), N], packed along K
    scales: torch.Tensor  # [K / group_size, N], the compute dtype
    zeros: torch.Tensor  # int32 [K / group_size, N]
    perm: Optional[torch.Tensor]  # int64 [K], or None when the checkpoint's K order is kept
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def unpacked(self) -> torch.Tensor:
        """int32 [K, N] of the unsigned values, in the layout's K order."""
        return unpack_rows(self.qweight, self.bits, self.in_features)


def make_int_weight(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    name: str,
) -> IntWeight:
    """Canonicalizes a checkpoint's unpacked values ``q`` [K, N], ``scales``/``zeros``
    [groups, N] and optional ``g_idx`` [K] (``name`` says whose, for errors)."""
    k, n = q.shape
    if k % group_size:
        raise ValueError(
            f"{name}: input size {k} is not a multiple of group_size {group_size}"
        )
    groups = k // group_size
    if tuple(scales.shape) != (groups, n) or tuple(zeros.shape) != (groups, n):
        raise ValueError(
            f"{name}: scales/zeros have shape {tuple(scales.shape)}/{tuple(zeros.shape)}, "
            f"expected {(groups, n)} for group_size {group_size}"
        )
    perm = None
    natural = torch.arange(k, device=q.device) // group_size
    if g_idx is not None and not torch.equal(g_idx.to(natural.dtype), natural):
        perm = torch.argsort(g_idx.to(torch.int64), stable=True)
        if not torch.equal(g_idx.to(torch.int64)[perm], natural):
            raise ValueError(
                f"{name}: g_idx does not assign group_size ({group_size}) inputs to each group"
            )
        q = q[perm]
    return IntWeight(
        qweight=pack_rows(q, bits),
        scales=scales.to(dtype).contiguous(),
        zeros=zeros.to(torch.int32).contiguous(),
        perm=perm,
        bits=bits,
        group_size=group_size,
        in_features=k,
        out_features=n,
    )


def dequantize(weight: IntWeight) -> torch.Tensor:
    """The dense [N, K] weight in the layout's K order (float32); for tests and references."""
    q = weight.unpacked().float()
    scales = weight.scales.float().repeat_interleave(weight.group_size, dim=0)
    zeros = weight.zeros.float().repeat_interleave(weight.group_size, dim=0)
    return ((q - zeros) * scales).t().contiguous()


class CpuIntKernel:
    """``weight`` repacked for torch's CPU weight-only kernels; owns only those tensors (the
    layer keeps no other copy of the weight).

    4 bit: ``_weight_int4pack_mm_for_cpu`` computes (q - 8) * scale + zero per group, so the
    integer zero point z becomes the float zero scale * (8 - z). 8 bit: ``_weight_int8pack_mm``
    takes per-channel scales of signed values q - 128; per-group scales run one call per group,
    and an asymmetric zero adds (sum of the group's inputs) * scale * (128 - z).
    """

    def __init__(self, weight: IntWeight) -> None:
        self.bits = weight.bits
        self.perm = weight.perm
        self.out_features = weight.out_features
        self.in_features = k = weight.in_features
        self.dtype = weight.scales.dtype
        q = weight.unpacked().t().contiguous()  # [N, K]
        if weight.bits == 4:
            group = weight.group_size
            repeat = 1
            if group not in _CPU_INT4_GROUPS:
                # Channel-wise (one group of K): the same scales repeated over smaller groups.
                fit = [g for g in _CPU_INT4_GROUPS if group % g == 0]
                if not fit:
                    raise ValueError(
                        f"group_size {group} (input size {k}) cannot run on the CPU: it must "
                        f"be a multiple of 32"
                    )
                repeat, group = group // fit[0], fit[0]
            scales = weight.scales.repeat_interleave(repeat, dim=0)
            zeros = weight.zeros.to(scales.dtype).repeat_interleave(repeat, dim=0)
            self.group_size = group
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self.scales_and_zeros = torch.stack([scales, scales * (8 - zeros)], dim=-1)
            return
        self.group_size = weight.group_size
        signed = (q - 128).to(torch.int8)
        groups = k // weight.group_size
        self.q_groups = [
            part.contiguous() for part in signed.split(weight.group_size, dim=1)
        ]
        self.scale_groups = [weight.scales[g].contiguous() for g in range(groups)]
        offset = (128 - weight.zeros).to(weight.scales.dtype)
        self.zero_terms: Optional[torch.Tensor] = None
        if bool((offset != 0).any()):
            self.zero_terms = (weight.scales * offset).contiguous()  # [groups, N]

    def dense(self) -> torch.Tensor:
        """The weight [N, K] (float32) in the checkpoint's K order, as the kernel computes it
        (the product with the identity); for tests and tools, not the hot path."""
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return self.matmul(eye).t().float().contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        x = x.contiguous()
        if self.bits == 4:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.packed, self.group_size, self.scales_and_zeros
            )
        if len(self.q_groups) == 1:
            out = torch.ops.aten._weight_int8pack_mm(x, self.q_groups[0], self.scale_groups[0])
        else:
            parts = x.split(self.group_size, dim=-1)
            out = torch.ops.aten._weight_int8pack_mm(
                parts[0].contiguous(), self.q_groups[0], self.scale_groups[0]
            )
            for part, q, s in zip(parts[1:], self.q_groups[1:], self.scale_groups[1:]):
                out += torch.ops.aten._weight_int8pack_mm(part.contiguous(), q, s)
        if self.zero_terms is not None:
            sums = x.view(x.shape[0], -1, self.group_size).sum(-1)
            out += sums @ self.zero_terms
        return out
