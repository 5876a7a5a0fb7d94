"""W8A8 scaled GEMM: ``(xq * x_scale) @ (wq * w_scale).T`` for 8-bit activations and weights,
int8 (int32 accumulation) or fp8 e4m3 (fp32 accumulation).

Scales come per K group: x_scale [M, G] (or [1, 1] for a static per-tensor scale, read with
stride 0), w_scale [N, G] (per output channel: G = 1; 128x128 weight blocks expanded per row:
G = K / 128, with per-token-group activations). Each program computes a [BLOCK_M, BLOCK_N] tile;
the dot products of one K group are summed exactly and then scaled into the fp32 accumulator,
which is what the dequantized product computes up to summation order.

This is the fallback where ``torch._scaled_mm`` does not apply (int8, block scales, GPUs
before SM89 where fp8 tiles are widened to fp16, exactly). The launch depends only on shapes:
capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve_kernels._utils import check


@triton.jit
def _scaled_gemm_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_xsm, stride_xsg, stride_wsn, stride_wsg, stride_om,
    groups, tiles_per_group,
    IS_INT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Rows past M (columns past N) read the last one instead of a masked load: there is no
    # fp8 fill value to give, and their results are never stored.
    x_rows = x_ptr + tl.minimum(offs_m, M - 1)[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + tl.minimum(offs_n, N - 1)[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(groups):
        if IS_INT:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(tiles_per_group):
            k0 = (g * tiles_per_group + t) * BLOCK_K
            x = tl.load(x_rows + (k0 + offs_k)[None, :])
            w = tl.load(w_rows + (k0 + offs_k)[:, None])
            if UPCAST:
                x = x.to(tl.float16)
                w = w.to(tl.float16)
            if IS_INT:
                part += tl.dot(x, w, out_dtype=tl.int32)
            else:
                part += tl.dot(x, w, out_dtype=tl.float32)
        sx = tl.load(xs_ptr + offs_m * stride_xsm + g * stride_xsg, mask=m_mask, other=0.0)
        sw = tl.load(ws_ptr + offs_n * stride_wsn + g * stride_wsg, mask=n_mask, other=0.0)
        acc += part.to(tl.float32) * sx[:, None] * sw[None, :]
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _block_k(group_k: int) -> int:
    for block in (128, 64, 32):
        if group_k % block == 0:
            return block
    return 0


def scaled_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """See the module docstring; the signature of ``reference.scaled_matmul``."""
    check(xq.dim() == 2 and wq.dim() == 2, "xq and wq must be 2-D")
    check(xq.dtype == wq.dtype and xq.dtype in (torch.int8, torch.float8_e4m3fn),
          f"xq and wq must both be int8 or float8_e4m3fn, got {xq.dtype} and {wq.dtype}")
    m, k = xq.shape
    n = wq.shape[0]
    check(wq.shape[1] == k, f"wq {tuple(wq.shape)} does not match K={k}")
    groups = max(x_scale.shape[1], w_scale.shape[1])
    for name, scale, rows in (("x_scale", x_scale, (1, m)), ("w_scale", w_scale, (n,))):
        check(scale.dim() == 2 and scale.shape[0] in rows and scale.shape[1] in (1, groups),
              f"{name} has shape {tuple(scale.shape)}; expected [{'/'.join(map(str, rows))}, "
              f"1 or {groups}]")
    check(k % groups == 0, f"K={k} is not a multiple of the {groups} scale groups")
    block_k = _block_k(k // groups)
    check(block_k > 0, f"the K group {k // groups} must be a multiple of 32")
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    xq, wq = xq.contiguous(), wq.contiguous()
    x_scale, w_scale = x_scale.float().contiguous(), w_scale.float().contiguous()
    upcast = (
        xq.dtype == torch.float8_e4m3fn and xq.is_cuda
        and torch.cuda.get_device_capability(xq.device) < (8, 9)
    )
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64 if m <= 32 else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _scaled_gemm_kernel[grid](
        xq, wq, x_scale, w_scale, out,
        m, n, k,
        xq.stride(0), wq.stride(0),
        x_scale.stride(0) if x_scale.shape[0] > 1 else 0,
        x_scale.stride(1) if x_scale.shape[1] > 1 else 0,
        w_scale.stride(0), w_scale.stride(1) if w_scale.shape[1] > 1 else 0,
        out.stride(0),
        groups, (k // groups) // block_k,
        IS_INT=xq.dtype == torch.int8, UPCAST=upcast,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out
