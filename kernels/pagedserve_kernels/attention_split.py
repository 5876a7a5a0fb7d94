"""Split-KV ("flash-decoding") attention for pure-decode batches with long contexts.

A decode batch has one query token per sequence, so the unified kernel would run only
``num_seqs * num_kv_heads`` programs, too few to fill the GPU when the batch is small. Here each
(sequence, KV head) is split into ``num_splits`` contiguous ranges of the context; every program
writes an unnormalized partial (acc, running max, sum) and a second kernel merges them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pagedserve_kernels.attention_common import attend_tile


@triton.jit(do_not_specialize=["num_splits"])
def split_kv_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_table_ptr,
    scale, k_scale, v_scale, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ps, stride_ph, stride_pp,  # partials: [seq, q_head, split(, d)]; acc's d stride is 1
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:  # padded sequence without a token
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    # Balance per sequence: each split gets the same number of whole tiles of *this* context.
    num_tiles = tl.cdiv(seq_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
    t_full_end = tl.maximum(tl.minimum(t_end, seq_len // TILE_N), t_begin)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + offs_m
    row_valid = offs_m < GROUP
    q = tl.load(q_ptr + q_start.to(tl.int64) * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (seq_len - 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = scale * k_scale * 1.4426950408889634
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    # A non-empty split starts inside the context, so its first tile makes m_i finite.
    for t in range(t_begin, t_full_end):
        acc, l_i, m_i = attend_tile(
            acc, l_i, m_i, q, t * TILE_N, q_pos, seq_len, bt_row, k_base, v_base,
            stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
            BLOCK_SIZE, TILE_N, HEAD_DIM, False, DOT_PRECISION,
        )
    for t in range(t_full_end, t_end):
        acc, l_i, m_i = attend_tile(
            acc, l_i, m_i, q, t * TILE_N, q_pos, seq_len, bt_row, k_base, v_base,
            stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
            BLOCK_SIZE, TILE_N, HEAD_DIM, True, DOT_PRECISION,
        )
    # An empty split stores (acc=0, m=-inf, l=0), which the merge weighs by exp2(-inf) = 0.
    base = seq.to(tl.int64) * stride_ps + head * stride_ph + split * stride_pp
    tl.store(part_acc_ptr + base[:, None] + offs_d[None, :], acc * v_scale,
             mask=row_valid[:, None])
    tl.store(part_m_ptr + base // HEAD_DIM, m_i, mask=row_valid)
    tl.store(part_l_ptr + base // HEAD_DIM, l_i, mask=row_valid)


@triton.jit(do_not_specialize=["num_splits"])
def merge_splits_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, query_start_loc_ptr,
    num_splits,
    stride_ps, stride_ph, stride_pp, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    s_valid = offs_s < num_splits
    base = seq.to(tl.int64) * stride_ps + head * stride_ph + offs_s * stride_pp
    m = tl.load(part_m_ptr + base // HEAD_DIM, mask=s_valid, other=float("-inf"))
    l_s = tl.load(part_l_ptr + base // HEAD_DIM, mask=s_valid, other=0.0)
    m_max = tl.max(m, axis=0)  # finite: split 0 always holds position 0
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * l_s, axis=0)
    acc = tl.load(part_acc_ptr + base[:, None] + offs_d[None, :], mask=s_valid[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty))
