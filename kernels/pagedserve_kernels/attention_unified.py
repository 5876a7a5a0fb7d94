"""The unified paged-attention kernel: one launch for a mixed batch of prefill chunks and decodes.

Work split: each program owns ``BLOCK_Q`` consecutive query tokens of one sequence and all the
query heads of one KV head (``BLOCK_M = BLOCK_Q * GROUP_P2`` rows), so the GQA heads that share a
KV head share every K/V load. The grid is static in the batch (``num_tokens // BLOCK_Q +
num_seqs`` x ``num_kv_heads``): sequence ``i``'s query blocks start at program
``query_start_loc[i] // BLOCK_Q + i``, an upper bound on the blocks before it, and a program finds
its sequence by binary search. Programs past a sequence's last block exit at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pagedserve_kernels.attention_common import attend_tile


@triton.jit
def find_seq(query_start_loc_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """Index of the last sequence whose first query block is <= ``pid``."""
    # Annotated so the loop-carried values are int32 tensors from the start, whatever num_seqs.
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= pid:
            lo = mid
        else:
            hi = mid - 1
    return lo


# num_seqs changes every step; specializing on it (e.g. == 1) would only add recompiles.
@triton.jit(do_not_specialize=["num_seqs"])
def unified_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_table_ptr,
    scale, k_scale, v_scale, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = find_seq(query_start_loc_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # cached positions before this chunk

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_tok = q_block * BLOCK_Q + offs_m // GROUP_P2
    head = kv_head * GROUP + offs_m % GROUP_P2
    row_valid = (q_tok < q_len) & (offs_m % GROUP_P2 < GROUP)
    row = (q_start + q_tok).to(tl.int64)
    q = tl.load(q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None], other=0.0)
    # Rows past the chunk are never stored; clamping keeps their mask inside the context.
    q_pos = tl.minimum(ctx_len + q_tok, seq_len - 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = scale * k_scale * 1.4426950408889634  # exp2 instead of exp

    bt_row = block_table_ptr + seq * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    # Tiles wholly at or before the block's first query position need no mask; the rest (the
    # causal diagonal, the context's ragged end) do.
    first_pos = ctx_len + q_block * BLOCK_Q
    last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
    num_full = (first_pos + 1) // TILE_N
    num_tiles = tl.cdiv(last_pos + 1, TILE_N)
    for t in range(0, num_full):
        acc, l_i, m_i = attend_tile(
            acc, l_i, m_i, q, t * TILE_N, q_pos, seq_len, bt_row, k_base, v_base,
            stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
            BLOCK_SIZE, TILE_N, HEAD_DIM, False, DOT_PRECISION,
        )
    for t in range(num_full, num_tiles):
        acc, l_i, m_i = attend_tile(
            acc, l_i, m_i, q, t * TILE_N, q_pos, seq_len, bt_row, k_base, v_base,
            stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
            BLOCK_SIZE, TILE_N, HEAD_DIM, True, DOT_PRECISION,
        )
    out = acc * v_scale / l_i[:, None]
    tl.store(out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
