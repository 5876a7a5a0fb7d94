"""rms_norm, fused_add_rms_norm, rotary_embedding and silu_and_mul against their references."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import ELEMENTWISE_TOLERANCES, assert_close, device

from pagedserve.layers.rotary import build_cos_sin_cache, rope_inv_freq
from pagedserve_kernels import ops
from pagedserve_kernels import reference as ref

DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.cuda_only)]
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device(), dtype)


def check(got, want, dtype, what):
    assert_close(got, want, dtype, ELEMENTWISE_TOLERANCES, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (3, 5, 128), (13, 1000)])
def test_rms_norm(dtype, shape):
    x = randn(*shape, dtype=dtype)
    w = randn(shape[-1], dtype=dtype, seed=1)
    check(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), dtype, "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (9, 200), (2, 3, 256)])
def test_fused_add_rms_norm(dtype, shape):
    x = randn(*shape, dtype=dtype)
    res = randn(*shape, dtype=dtype, seed=2)
    w = randn(shape[-1], dtype=dtype, seed=1)
    x0, res0 = x.clone(), res.clone()
    out, new_res = ops.fused_add_rms_norm(x, res, w, 1e-5)
    want_out, want_res = ref.fused_add_rms_norm(x0, res0, w, 1e-5)
    check(out, want_out, dtype, "normed")
    # The residual is a plain add in x's dtype: bit-exact.
    assert torch.equal(new_res, want_res)
    assert torch.equal(x, x0) and torch.equal(res, res0), "inputs must not be modified"


def test_rms_norm_strided_rows_and_fp32_weight():
    # A row-strided view (e.g. a slice of a wider buffer) and an fp32 weight with fp16 x:
    # the reference promotes the output to fp32.
    buf = randn(6, 160, dtype=torch.float16)
    x = buf[:, :128]
    w = randn(128, seed=3)
    got = ops.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.float32
    check(got, ref.rms_norm(x, w, 1e-6), torch.float16, "strided")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(1, 1), (4, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_rotary(dtype, head_dim, heads, scaling):
    num_tokens, max_pos = 11, 300
    cache = build_cos_sin_cache(rope_inv_freq(head_dim, 500000.0, scaling), max_pos).to(device())
    gen = torch.Generator().manual_seed(5)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen).to(device())
    # q and k as views of one fused qkv projection output, like the attention layer makes them.
    hq, hk = heads
    qkv = randn(num_tokens, (hq + 2 * hk) * head_dim, dtype=dtype)
    q = qkv[:, : hq * head_dim].view(num_tokens, hq, head_dim)
    k = qkv[:, hq * head_dim: (hq + hk) * head_dim].view(num_tokens, hk, head_dim)
    qkv0 = qkv.clone()
    got_q, got_k = ops.rotary_embedding(positions, q, k, cache)
    want_q, want_k = ref.rotary_embedding(positions, q, k, cache)
    check(got_q, want_q, dtype, "query")
    check(got_k, want_k, dtype, "key")
    assert torch.equal(qkv, qkv0), "inputs must not be modified"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 128), (7, 2 * 96), (2, 3, 2 * 1500)])
def test_silu_and_mul(dtype, shape):
    x = randn(*shape, dtype=dtype)
    got = ops.silu_and_mul(x)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    check(got, ref.silu_and_mul(x), dtype, "silu_and_mul")


@pytest.mark.cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_shapes_cuda(dtype):
    x = randn(4099, 8192, dtype=dtype)
    w = randn(8192, dtype=dtype, seed=1)
    res = randn(4099, 8192, dtype=dtype, seed=2)
    check(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), dtype, "rms_norm")
    out, new_res = ops.fused_add_rms_norm(x, res, w, 1e-6)
    want_out, want_res = ref.fused_add_rms_norm(x, res, w, 1e-6)
    check(out, want_out, dtype, "fused normed")
    assert torch.equal(new_res, want_res)
    g = randn(4099, 2 * 14336, dtype=dtype, seed=4)
    check(ops.silu_and_mul(g), ref.silu_and_mul(g), dtype, "silu_and_mul")
    cache = build_cos_sin_cache(rope_inv_freq(128, 500000.0, LLAMA3_SCALING), 131072).to(device())
    positions = torch.randint(0, 131072, (4099,), device=device())
    q, k = randn(4099, 32, 128, dtype=dtype), randn(4099, 8, 128, dtype=dtype, seed=6)
    got_q, got_k = ops.rotary_embedding(positions, q, k, cache)
    want_q, want_k = ref.rotary_embedding(positions, q, k, cache)
    check(got_q, want_q, dtype, "rope q")
    check(got_k, want_k, dtype, "rope k")
