"""W4A16 / W8A16 dequantize-GEMM: ``x @ W`` for the internal int layout that every integer
weight-only checkpoint format is converted to at load.

Layout: ``qweight`` int32 [K*bits/32, N], b-bit unsigned values packed along K (value k in word
k // (32/bits) at shift bits * (k % (32/bits))); ``scales`` [K/G, N] in the activations' dtype;
``zeros`` int32 [K/G, N]; W[k, n] = scales[k // G, n] * (q[k, n] - zeros[k // G, n]).
Act order is handled by the caller (the input's K is permuted at load time's order).

Each program computes a [BLOCK_M, BLOCK_N] tile over a range of K tiles. Small M (decode) has
too few output tiles to fill the GPU, so K is split over ``split_k`` programs that write fp32
partial sums into a workspace, summed afterwards. The launch depends only on shapes, so it is
capturable in a CUDA graph (no host syncs, no data-dependent branches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve_kernels._utils import check, device_sms


@triton.jit
def _int_gemm_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_os, stride_om,
    group_size, tiles_per_split,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    PF: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    shifts = ((offs_k % PF) * BITS).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = K // BLOCK_K
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    for tile in range(first, last):
        k0 = tile * BLOCK_K
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :],
            mask=m_mask[:, None], other=0.0,
        )
        words = tl.load(
            qw_ptr + ((k0 + offs_k) // PF)[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
            mask=n_mask[None, :], other=0,
        )
        q = (words >> shifts[:, None]) & MASK
        # BLOCK_K divides the group size, so the tile lies in one group.
        group = k0 // group_size
        s = tl.load(scales_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0)
        z = tl.load(zeros_ptr + group * stride_zg + offs_n, mask=n_mask, other=0)
        w = ((q - z[None, :]).to(tl.float32) * s.to(tl.float32)[None, :]).to(x.dtype)
        acc += tl.dot(x, w, out_dtype=tl.float32)
    out = out_ptr + split * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _block_k(k: int, group_size: int) -> int:
    for block in (128, 64, 32):
        if group_size % block == 0 and k % block == 0:
            return block
    return 0


def choose_split_k(m: int, n: int, k_tiles: int, block_m: int, block_n: int, sms: int) -> int:
    """K splits for a launch: enough programs to cover the SMs about twice when the output
    tiles alone do not, each split keeping at least 4 K tiles."""
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if tiles >= sms:
        return 1
    return max(1, min(2 * sms // tiles, k_tiles // 4, 16))


def int_weight_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x[:, perm] @ W`` for x [M, K]; output [M, N] in x's dtype (fp32 accumulation)."""
    check(x.dim() == 2, f"x must be [M, K], got {tuple(x.shape)}")
    check(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    m, k = x.shape
    n = qweight.shape[1]
    check(qweight.shape[0] * (32 // bits) >= k, f"qweight {tuple(qweight.shape)} is short of K={k}")
    check(scales.shape == zeros.shape == (k // group_size, n),
          f"scales/zeros must be [{k // group_size}, {n}], got {tuple(scales.shape)}")
    block_k = _block_k(k, group_size)
    check(block_k > 0, f"K={k} and group_size={group_size} must be multiples of 32")
    if perm is not None:
        x = x.index_select(1, perm)
    x = x.contiguous()
    scales = scales.to(x.dtype)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64 if m <= 32 else 128
    k_tiles = k // block_k
    split_k = choose_split_k(m, n, k_tiles, block_m, block_n, device_sms(x.device))
    tiles_per_split = triton.cdiv(k_tiles, split_k)
    if split_k == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        stride_os = 0
    else:
        out = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        stride_os = out.stride(0)
    if m == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _int_gemm_kernel[grid](
        x, qweight, scales, zeros, out,
        m, n, k,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), stride_os,
        out.stride(-2),
        group_size, tiles_per_split,
        BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out if split_k == 1 else out.sum(0).to(x.dtype)
