"""Rotary position embedding, NeoX style (rotate halves), for queries and keys in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve_kernels._utils import check, is_power_of_2, next_power_of_2


@triton.jit
def _rotate_heads(
    src_ptr, dst_ptr, stride_src_t, stride_src_h, stride_dst_t, stride_dst_h,
    tok, num_heads, cos, sin,
    HALF: tl.constexpr, HEADS_P2: tl.constexpr,
):
    offs_h = tl.arange(0, HEADS_P2)
    offs_d = tl.arange(0, HALF)
    mask = (offs_h < num_heads)[:, None]
    src = src_ptr + tok * stride_src_t + offs_h[:, None] * stride_src_h + offs_d[None, :]
    dst = dst_ptr + tok * stride_dst_t + offs_h[:, None] * stride_dst_h + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dt = dst_ptr.dtype.element_ty
    # The reference computes x*cos + rotate(x)*sin in x's dtype, rounding each product; doing
    # the same keeps fp16/bf16 results bit-compatible with the torch path.
    o1 = (x1 * cos).to(dt).to(tl.float32) - (x2 * sin).to(dt).to(tl.float32)
    o2 = (x2 * cos).to(dt).to(tl.float32) + (x1 * sin).to(dt).to(tl.float32)
    tl.store(dst, o1.to(dt), mask=mask)
    tl.store(dst + HALF, o2.to(dt), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, cache_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cache, num_q_heads, num_k_heads,
    HALF: tl.constexpr, QH_P2: tl.constexpr, KH_P2: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, HALF)
    dt = q_out_ptr.dtype.element_ty
    # The reference casts cos/sin to x's dtype before multiplying.
    cos = tl.load(cache_ptr + pos * stride_cache + offs_d).to(dt).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs_d).to(dt).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qot, stride_qoh,
                  tok, num_q_heads, cos, sin, HALF, QH_P2)
    _rotate_heads(k_ptr, k_out_ptr, stride_kt, stride_kh, stride_kot, stride_koh,
                  tok, num_k_heads, cos, sin, HALF, KH_P2)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotary on query [T, Hq, D] and key [T, Hkv, D] at ``positions`` [T].

    ``cos_sin_cache`` is [max_pos, D] fp32: cos of the D/2 frequencies, then their sin (any
    scaling, e.g. Llama-3's, is already in it). Returns new (query, key); inputs are unchanged.
    """
    check(query.dim() == 3 and key.dim() == 3, "query/key must be [tokens, heads, head_dim]")
    num_tokens, num_q_heads, head_dim = query.shape
    check(key.shape[0] == num_tokens and key.shape[2] == head_dim,
          f"key {tuple(key.shape)} does not match query {tuple(query.shape)}")
    check(positions.numel() == num_tokens, "positions must have one entry per token")
    check(cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == head_dim,
          f"cos_sin_cache {tuple(cos_sin_cache.shape)} must be [max_pos, {head_dim}]")
    check(head_dim % 2 == 0 and is_power_of_2(head_dim // 2),
          f"head_dim {head_dim} must be twice a power of two")
    check(query.dtype == key.dtype, "query and key must share a dtype")
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    positions = positions.reshape(-1)
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if num_tokens == 0:
        return q_out, k_out
    _rotary_kernel[(num_tokens,)](
        positions, cache, query, key, q_out, k_out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cache.stride(0), num_q_heads, key.shape[1],
        HALF=head_dim // 2, QH_P2=next_power_of_2(num_q_heads),
        KH_P2=next_power_of_2(key.shape[1]), num_warps=4,
    )
    return q_out, k_out
