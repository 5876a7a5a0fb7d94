"""The pure-torch reference of every kernel in ``pagedserve_kernels.ops``, with the same
signatures. They are the oracle the kernel tests compare against and the code the engine runs
where a kernel does not (the CPU). Importing this module imports only torch, never Triton.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in fp32 like HF, rounded to ``x``'s dtype before the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def apply_rotary(
    positions: torch.Tensor, x: torch.Tensor, cos_sin_cache: torch.Tensor
) -> torch.Tensor:
    """NeoX rotary on ``x`` [tokens, heads, head_dim]; returns a new tensor.

    Each half is rotated against the other: (x1 cos - x2 sin, x2 cos + x1 sin), the same
    products HF's ``x * cos + rotate_half(x) * sin`` forms, without building rotate_half.
    ``cos_sin_cache`` is [max_positions, head_dim]: the cosines, then the sines.
    """
    half = cos_sin_cache.shape[-1] // 2
    cos_sin = cos_sin_cache[positions].to(x.dtype)
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [T, Hq, D], key [T, Hkv, D] -> rotated (query, key)."""
    return (apply_rotary(positions, query, cos_sin_cache),
            apply_rotary(positions, key, cos_sin_cache))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for a merged [gate; up] projection."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` in fp32, saturated to ``dtype``'s finite range, rounded to nearest even in
    ``dtype`` (an fp8 cache format); out of range values become the largest finite one."""
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp_(-limit, limit).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``x * scale`` (x from an fp8 cache) in fp32, returned in ``dtype``."""
    return (x.float() * scale).to(dtype)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    all_valid: bool = False,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Stores key/value [T, Hkv, D] into ``kv_cache`` [2, num_blocks, block_size, Hkv, D] at
    ``slot_mapping[:T]``; rows whose slot is -1 are skipped (``all_valid`` says there are none,
    sparing the check). An fp8 cache stores ``quantize_kv(key, k_scale)`` (and v likewise);
    the scales are ignored otherwise."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    slot_mapping = slot_mapping[: key.shape[0]]
    keep = None if all_valid else slot_mapping >= 0
    if keep is not None and not bool(keep.all()):
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    if is_fp8(kv_cache.dtype):
        # index_copy_ has no fp8 kernels: copy the bytes.
        key = quantize_kv(key, k_scale, kv_cache.dtype).view(torch.uint8)
        value = quantize_kv(value, v_scale, kv_cache.dtype).view(torch.uint8)
        flat = flat.view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, key)
    flat[1].index_copy_(0, slot_mapping, value)


def context_slots(block_table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """The cache slots holding positions 0..seq_len-1 of one request."""
    positions = torch.arange(seq_len, device=block_table.device)
    return block_table[positions // block_size].long() * block_size + positions % block_size


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of every query row over its request's cached context, one request at a time.

    The simplest correct statement of what every attention kernel and backend computes once the
    cache is written: request ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``;
    row ``j`` of it sits at position ``seq_lens[i] - q_len + j`` and sees positions ``<=`` it.
    Rows past the last request are left unset. An fp8 cache is read as ``x * k_scale`` /
    ``x * v_scale`` (the scales are ignored otherwise); everything is computed in fp32.
    """
    block_size = kv_cache.shape[2]
    num_kv_heads = kv_cache.shape[3]
    flat = kv_cache.flatten(1, 2)  # [2, slots, kv_heads, dim]
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    out = torch.empty_like(query)
    if not is_fp8(kv_cache.dtype):
        k_scale = v_scale = 1.0
    for i in range(len(qsl) - 1):
        start, end, seq_len = qsl[i], qsl[i + 1], lens[i]
        if end == start:
            continue
        slots = context_slots(block_table[i], seq_len, block_size)
        k, v = flat[0, slots], flat[1, slots]  # [seq, kv_heads, dim]
        q = query[start:end]
        group = q.shape[1] // num_kv_heads
        k = k.repeat_interleave(group, dim=1).float() * k_scale
        v = v.repeat_interleave(group, dim=1).float() * v_scale
        scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(out.dtype)
    return out


def unified_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: Optional[torch.Tensor] = None,
    num_actual_tokens: Optional[int] = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The Triton kernel's contract (padding rows past ``query_start_loc[-1]`` zeroed),
    computed by ``paged_attention``; ``max_query_len``/``max_seq_len``/``num_actual_tokens``
    only size the kernel's launch."""
    del max_query_len, max_seq_len, num_actual_tokens
    num_seqs = query_start_loc.numel() - 1
    res = paged_attention(query, kv_cache, query_start_loc, seq_lens[:num_seqs],
                          block_table[:num_seqs], scale, k_scale, v_scale)
    res[int(query_start_loc[-1]):] = 0
    if out is None:
        return res
    out.copy_(res)
    return out


def dequantize_int_weight(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """The dense [K, N] weight (scales' dtype) of the internal int layout: ``qweight`` int32
    [K*bits/32, N] packed along K (value k at word k // (32/bits), shift bits * (k % (32/bits))),
    ``scales`` and int ``zeros`` [K/group_size, N]; W = scale * (q - zero)."""
    pf = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device).view(1, pf, 1)
    q = ((qweight.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1, qweight.shape[1])
    k = scales.shape[0] * group_size
    s = scales.float().repeat_interleave(group_size, dim=0)
    z = zeros.float().repeat_interleave(group_size, dim=0)
    return ((q[:k].float() - z) * s).to(scales.dtype)


def int_weight_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: Optional[torch.Tensor],
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x[:, perm] @ W`` for x [M, K] and the internal int layout (see
    ``dequantize_int_weight``); fp32 accumulation, output in x's dtype."""
    if perm is not None:
        x = x.index_select(-1, perm)
    w = dequantize_int_weight(qweight, scales, zeros, bits, group_size)
    return (x.float() @ w.float()).to(x.dtype)


# ---- W8A8: 8-bit weights and activations (int8, fp8 e4m3) ---------------------------------

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
# compressed-tensors' symmetric int8 scale is absmax / (half the range 255): the producer's own
# forward quantizes dynamic activations so, and we follow the producer.
INT8_HALF_RANGE = 127.5


def quantize_activation(
    x: torch.Tensor,
    qdtype: torch.dtype,
    static_scale: Optional[torch.Tensor],
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] -> (q [M, K] in ``qdtype`` (int8 or float8_e4m3fn), scale [M, K/group] or
    [1, 1] fp32) with x ~ q * scale. ``static_scale``: one calibrated scale for the tensor;
    otherwise dynamic, one scale per token (``group_size`` = K) or per token and group of K.
    fp8 saturates to +-448 before its round-to-nearest cast; int8 rounds half to even and
    clamps to [-128, 127]. Pure tensor ops: no host sync, capturable in a CUDA graph."""
    is_int = qdtype == torch.int8
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1)
        grouped = x.float().unsqueeze(1)
    else:
        grouped = x.float().view(x.shape[0], x.shape[1] // group_size, group_size)
        top = INT8_HALF_RANGE if is_int else FP8_MAX
        scale = grouped.abs().amax(-1).clamp(min=1e-12) / top
    scaled = grouped / scale.unsqueeze(-1)
    if is_int:
        q = scaled.round().clamp(-128, 127).to(torch.int8)
    else:
        q = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(x.shape), scale


def dequantize_grouped(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [R, K] (int8 / fp8) times scale [R or 1, G] over G contiguous groups of K (fp32)."""
    rows, k = q.shape
    groups = scale.shape[1]
    return (q.float().view(rows, groups, k // groups) * scale.float().unsqueeze(-1)).view(rows, k)


def scaled_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(xq * x_scale) @ (wq * w_scale).T`` for 8-bit xq [M, K] and wq [N, K] (int8 or fp8 e4m3
    alike), x_scale [M or 1, G] (per tensor, per token, or per token and K group) and w_scale
    [N, G] (per channel; G = K/128 for 128x128 blocks expanded per row); fp32 accumulation."""
    x = dequantize_grouped(xq, x_scale)
    w = dequantize_grouped(wq, w_scale)
    return (x @ w.t()).to(out_dtype)
