"""Reshape-and-cache: store this step's keys/values into their paged-KV-cache slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve_kernels._utils import check, next_power_of_2
from pagedserve_kernels.fp8 import fp8_format, round_to_fp8


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    num_heads, k_scale, v_scale,
    BLOCK_SIZE: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
    IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding row: nothing to store
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, HEADS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < num_heads)[:, None]
    dst = blk * stride_cb + off * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(key_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :],
                mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :],
                mask=mask)
    if IS_FP8:
        k = round_to_fp8(k.to(tl.float32) / k_scale, FP8_MAX, MANT_BITS, MIN_EXP)
        v = round_to_fp8(v.to(tl.float32) / v_scale, FP8_MAX, MANT_BITS, MIN_EXP)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Writes key/value [T, Hkv, D] into ``kv_cache`` [2, num_blocks, block_size, Hkv, D] at
    ``slot_mapping[:T]`` (slot = block * block_size + offset); rows with slot -1 are skipped.
    An fp8 cache stores ``x / scale`` saturated and rounded to nearest even (the reference's
    ``quantize_kv``); the scales are ignored otherwise."""
    check(kv_cache.dim() == 5 and kv_cache.shape[0] == 2,
          f"kv_cache {tuple(kv_cache.shape)} must be [2, blocks, block_size, kv_heads, head_dim]")
    _, _, block_size, num_heads, head_dim = kv_cache.shape
    num_tokens = key.shape[0]
    check(key.shape == (num_tokens, num_heads, head_dim) and value.shape == key.shape,
          f"key {tuple(key.shape)} / value {tuple(value.shape)} must be "
          f"[tokens, {num_heads}, {head_dim}]")
    check(slot_mapping.numel() >= num_tokens, "slot_mapping shorter than key")
    check(kv_cache.stride(-1) == 1, "kv_cache must be contiguous in head_dim")
    check(head_dim == next_power_of_2(head_dim), f"head_dim {head_dim} must be a power of two")
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    check(k_cache.stride() == v_cache.stride(), "K and V caches must share strides")
    fmt = fp8_format(kv_cache.dtype)
    check(fmt is None or (k_scale > 0 and v_scale > 0),
          f"fp8 KV-cache scales must be positive, got k_scale={k_scale}, v_scale={v_scale}")
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_heads, float(k_scale), float(v_scale),
        BLOCK_SIZE=block_size, HEADS_P2=next_power_of_2(num_heads), HEAD_DIM=head_dim,
        IS_FP8=fmt is not None, FP8_MAX=fmt.max_finite if fmt else 0.0,
        MANT_BITS=fmt.mantissa_bits if fmt else 0, MIN_EXP=fmt.min_normal_exp if fmt else 0,
        num_warps=4,
    )
