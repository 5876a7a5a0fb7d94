"""The CPU matmuls of W8A8 layers, from weights kept 8-bit in memory.

int8: ``torch._int_mm`` (int8 x int8 -> int32, exact; oneDNN's int8 GEMM on x86) then the
per-token and per-channel scales, in fp32.

fp8 e4m3: torch 2.13 has no fast CPU fp8 GEMM (``torch._scaled_mm``, ``Tensor.to`` from fp8
and oneDNN's fp8 qlinear all convert elementwise, 5-60x slower than the fp32 matmul), so
``pagedserve_kernels.cpu_fp8_gemm`` reads the weight's bytes and widens them in L1 (exact),
with the scales applied per K group to the fp32 partial sums. Where that kernel cannot be
built, the weight is dequantized on each call through a 256-entry table indexed by its bytes
(never at load) and multiplied in fp32.
"""

from __future__ import annotations

import functools

import torch

from pagedserve_kernels import cpu_fp8_gemm, reference


@functools.cache
def _fp8_values(device: torch.device) -> torch.Tensor:
    """float32 [256]: the value of each float8_e4m3fn bit pattern."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    return codes.float().to(device)


def fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """An fp8 e4m3 tensor's values in fp32, by table (exact: every e4m3 value is an fp32)."""
    codes = q.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return _fp8_values(q.device).index_select(0, codes).view(q.shape)


def dense_weight(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """qweight [N, K] (int8 or fp8) times scale [N, G] over G groups of K, in fp32."""
    n, k = qweight.shape
    values = fp8_to_float(qweight) if qweight.dtype == torch.float8_e4m3fn else qweight.float()
    groups = scale.shape[1]
    return (values.view(n, groups, k // groups) * scale.float().unsqueeze(-1)).view(n, k)


def cpu_scaled_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``reference.scaled_matmul`` on the CPU, fast where torch allows (see the module)."""
    if qweight.dtype == torch.int8 and x_scale.shape[1] == 1 and scale.shape[1] == 1:
        acc = torch._int_mm(xq, qweight.t())
        return (acc.float() * x_scale.float() * scale.float().t()).to(out_dtype)
    if qweight.dtype == torch.float8_e4m3fn and cpu_fp8_gemm.load() is not None:
        groups = max(x_scale.shape[1], scale.shape[1])
        if groups % x_scale.shape[1] == 0 and groups % scale.shape[1] == 0:
            x = fp8_to_float(xq) if xq.dtype == torch.float8_e4m3fn else xq.float()
            out = cpu_fp8_gemm.fp8_scaled_mm(
                x, _per_group(x_scale, groups), qweight, _per_group(scale, groups))
            return out.to(out_dtype)
    if xq.dtype == torch.float8_e4m3fn and x_scale.shape[1] == 1 and scale.shape[1] == 1:
        x = fp8_to_float(xq) * x_scale.float()
        return ((x @ fp8_to_float(qweight).t()) * scale.float().t()).to(out_dtype)
    x = fp8_to_float(xq) if xq.dtype == torch.float8_e4m3fn else xq.float()
    x = reference.dequantize_grouped(x, x_scale)
    return (x @ dense_weight(qweight, scale).t()).to(out_dtype)


def _per_group(scale: torch.Tensor, groups: int) -> torch.Tensor:
    """scale [R, G] as [R, groups], each of its G groups repeated over the groups it covers."""
    if scale.shape[1] == groups:
        return scale
    return scale.float().repeat_interleave(groups // scale.shape[1], dim=1)
