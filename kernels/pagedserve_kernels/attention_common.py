"""Device helpers shared by the paged-attention kernels: one online-softmax step over a KV tile.

A tile is ``TILE_N`` consecutive context positions of one sequence. Positions map to cache slots
through the block table one page at a time, so a tile may span several (non-contiguous) pages;
each position's ``head_dim`` elements are contiguous, which keeps the loads vectorized.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_tile(
    acc, l_i, m_i, q,
    tile_start, q_pos, seq_len,
    bt_row_ptr, k_base, v_base,
    stride_kb, stride_ks, stride_vb, stride_vs,
    qk_scale,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One flash-attention step: scores of ``q`` [M, D] against positions
    ``tile_start + [0, TILE_N)``, folded into the running (acc, l_i, m_i).

    ``m_i`` is kept in the log2 domain (``qk_scale`` includes log2(e)). With ``MASKED`` the
    tile may reach past ``seq_len`` or past a row's own position ``q_pos`` [M] (causal); without
    it every position is visible to every row and inside the block table.

    K and V are converted to ``q``'s dtype as loaded: an fp8 cache's values are exact in
    fp16/bf16/fp32, and its scales are applied outside, k's in ``qk_scale`` and v's to the
    final accumulator (both dot products accumulate in fp32).
    """
    offs_n = tile_start + tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        n_valid = offs_n < seq_len
        blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=n_valid, other=0)
    else:
        blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE)
    # int64: block * stride overflows int32 for caches above 2^31 elements.
    blk = blk.to(tl.int64)
    in_page = offs_n % BLOCK_SIZE
    k_off = blk * stride_kb + in_page * stride_ks
    v_off = blk * stride_vb + in_page * stride_vs
    if MASKED:
        k = tl.load(k_base + k_off[None, :] + offs_d[:, None], mask=n_valid[None, :], other=0.0)
    else:
        k = tl.load(k_base + k_off[None, :] + offs_d[:, None])
    k = k.to(q.dtype)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [M, TILE_N]
    if MASKED:
        s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
    # Every row sees at least one position of the first tile its program visits (position 0 in
    # the unified kernel; a split's first position, inside the context, in split-KV), so m_new
    # is finite from then on and a row fully masked in a later tile just gets p = 0.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    else:
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :])
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new
