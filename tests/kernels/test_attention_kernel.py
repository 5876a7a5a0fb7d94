"""unified_attention (and its split-KV decode path) against reference.paged_attention."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close, device, make_batch

from pagedserve_kernels import ops
from pagedserve_kernels import reference as ref
from pagedserve_kernels.attention import AttentionConfig, _pick_splits

CPU_DTYPES = [torch.float32, torch.float16]
DTYPES = CPU_DTYPES + [pytest.param(torch.bfloat16, marks=pytest.mark.cuda_only)]
# (num_heads, num_kv_heads): heads 1/2/4/8 with GQA ratios 1, 2, 4, 8.
HEADS = [(1, 1), (2, 2), (4, 2), (4, 1), (8, 1), (8, 4)]

# A mixed step: long decode, prefill chunk over a cached prefix, decode of a 1-token context,
# fresh prefill, short chunk over a ragged prefix, decode at a page boundary; 3 padding rows.
MIXED_Q = [1, 37, 1, 16, 5, 1]
MIXED_CTX = [599, 100, 0, 0, 31, 63]


def run_and_compare(batch, dtype, config=None, what=""):
    scale = batch.query.shape[-1] ** -0.5
    args = (batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_table, scale, batch.max_query_len, batch.max_seq_len)
    out = torch.full_like(batch.query, float("nan"))  # proves every row is written (or zeroed)
    got = ops.unified_attention(*args, out=out, num_actual_tokens=batch.num_actual_tokens,
                                config=config)
    assert got is out
    want = ref.unified_attention(*args, num_actual_tokens=batch.num_actual_tokens)
    assert_close(got, want, dtype, what=what)
    assert (got[batch.num_actual_tokens:] == 0).all(), "padding rows must be zeroed"


# The full shape grid runs in the interpreter's exact dtype on the CPU and in the serving dtype
# on CUDA (where every combination is a separate compile; fp32 has its own CUDA test below).
GRID_DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS)
def test_mixed_batch_grid(heads, head_dim, block_size):
    batch = make_batch(MIXED_Q, MIXED_CTX, *heads, head_dim, block_size, GRID_DTYPE,
                       num_padding=3)
    run_and_compare(batch, GRID_DTYPE, what=f"heads={heads}")


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("heads", [(4, 1), (8, 4)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_batch_half(dtype, heads, block_size):
    batch = make_batch(MIXED_Q, MIXED_CTX, *heads, 128, block_size, dtype, num_padding=3)
    run_and_compare(batch, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_decode_context_lengths(dtype, splits):
    """Contexts around page and tile edges, through the unified (1) and split-KV (3) paths."""
    ctx = [0, 1, 15, 16, 17, 63, 64, 65, 200, 599]
    batch = make_batch([1] * len(ctx), ctx, 8, 2, 64, 16, dtype, num_padding=2)
    run_and_compare(batch, dtype, AttentionConfig(num_splits=splits), what=f"splits={splits}")


@pytest.mark.parametrize("splits", [2, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 1)])
def test_split_kv_with_empty_splits(splits, heads):
    """Short contexts leave most splits empty; the merge must ignore them."""
    batch = make_batch([1, 1, 1], [2, 70, 300], *heads, 128, 32, torch.float32)
    run_and_compare(batch, torch.float32, AttentionConfig(num_splits=splits))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_prefill_only_and_long_chunk(dtype):
    """Whole prompts (no cached prefix) and a chunk longer than one query block."""
    batch = make_batch([1, 77, 130], [0, 0, 45], 4, 2, 64, 16, dtype)
    run_and_compare(batch, dtype)


def test_zero_length_requests_and_small_tiles():
    """Requests with no rows (CUDA-graph padding) and an explicit small tile configuration."""
    batch = make_batch([3, 0, 1, 0], [10, 5, 40, 0], 4, 2, 64, 16, torch.float32, num_padding=4)
    run_and_compare(batch, torch.float32, AttentionConfig(tile_n=16, block_m=16))


def test_split_heuristic():
    dev = torch.device("cpu")  # nominal 132 SMs
    cfg = AttentionConfig()
    assert _pick_splits(cfg, 1, 8, 16384, 1, dev) > 1
    assert _pick_splits(cfg, 256, 8, 16384, 1, dev) == 1  # enough programs already
    assert _pick_splits(cfg, 1, 8, 300, 1, dev) == 1  # too short to pay off
    assert _pick_splits(cfg, 1, 8, 16384, 2, dev) == 1  # prefill present: unified kernel


def test_rejects_bad_inputs():
    batch = make_batch([1], [4], 4, 2, 64, 16, torch.float32)
    args = [batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_table, 0.1, 1, 5]
    bad = list(args)
    bad[2] = batch.query_start_loc.long()
    with pytest.raises(ValueError, match="int32"):
        ops.unified_attention(*bad)
    bad = list(args)
    bad[0] = torch.zeros(1, 3, 64, device=device())
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ops.unified_attention(*bad)


# ---- CUDA only: long contexts, big batches, bf16 ----

@pytest.mark.cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ctx", [4096, 16384])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_long_context_decode_cuda(dtype, ctx, batch_size):
    ctxs = [ctx - 7 * i for i in range(batch_size)]
    batch = make_batch([1] * batch_size, ctxs, 32, 8, 128, 16, dtype)
    run_and_compare(batch, dtype, what="auto path")  # auto: split-KV at these sizes
    run_and_compare(batch, dtype, AttentionConfig(num_splits=1), what="unified path")


@pytest.mark.cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_large_mixed_batch_cuda(dtype, head_dim):
    q = [1] * 40 + [512, 1000, 3, 257]
    c = [int(x) for x in torch.randint(1, 3000, (40,))] + [3000, 0, 4000, 1]
    batch = make_batch(q, c, 32, 8, head_dim, 32, dtype, num_padding=13)
    run_and_compare(batch, dtype)


@pytest.mark.cuda_only
def test_fp32_exact_on_cuda():
    """fp32 on CUDA uses IEEE dots (not TF32): stays within 1e-5 of the reference."""
    batch = make_batch(MIXED_Q, MIXED_CTX, 8, 2, 128, 16, torch.float32, num_padding=3)
    run_and_compare(batch, torch.float32)


@pytest.mark.parametrize("q_len,ctx", [(1, 0), (1, 33), (9, 0), (40, 88)])
def test_single_request(q_len, ctx):
    batch = make_batch([q_len], [ctx], 4, 1, 64, 16, torch.float16)
    run_and_compare(batch, torch.float16)
