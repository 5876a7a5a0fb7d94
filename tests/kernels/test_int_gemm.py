"""The W4A16/W8A16 dequantize-GEMM against its pure-torch reference, on the internal layout."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import device

from pagedserve.layers.quantization.packing import pack_rows
from pagedserve_kernels import int_gemm, ops
from pagedserve_kernels import reference as ref


def int_weight(k, n, bits, group, asym, act_order, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (k, n), generator=gen)
    groups = k // group
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.005).to(dtype)
    mid = 1 << (bits - 1)
    zeros = (torch.randint(0, 1 << bits, (groups, n), generator=gen) if asym
             else torch.full((groups, n), mid)).to(torch.int32)
    perm = torch.randperm(k, generator=gen) if act_order else None
    dev = device()
    return (pack_rows(q, bits).to(dev), scales.to(dev), zeros.to(dev),
            None if perm is None else perm.to(dev))


# (M, K, N, bits, group, asym, act_order): decode (split-K) and prefill-sized M, both bit widths,
# grouped and channel-wise (group = K), with and without zeros and act order.
CASES = [
    (1, 256, 96, 4, 32, False, False),
    (1, 256, 64, 8, 64, True, True),
    (5, 128, 64, 4, 128, True, False),
    (3, 64, 32, 8, 64, False, False),  # K too short to split
    (33, 256, 80, 4, 64, True, True),
    (20, 128, 48, 8, 32, True, False),
]
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.cuda_only)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n, bits, group, asym, act_order", CASES)
def test_int_gemm_matches_reference(m, k, n, bits, group, asym, act_order, dtype):
    qweight, scales, zeros, perm = int_weight(k, n, bits, group, asym, act_order, dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(device(), dtype)
    got = ops.int_weight_matmul(x, qweight, scales, zeros, perm, bits, group)
    want = ref.int_weight_matmul(x, qweight, scales, zeros, perm, bits, group)
    assert got.dtype == dtype and got.shape == (m, n)
    rel = ((got.float() - want.float()).abs().mean() / want.float().abs().mean()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 0.04), rel


def test_split_k_is_taken_for_decode_and_not_for_large_m():
    sms = 132
    assert int_gemm.choose_split_k(1, 4096, 4096 // 128, 16, 64, sms) > 1
    assert int_gemm.choose_split_k(2048, 4096, 4096 // 128, 64, 128, sms) == 1


def test_bad_shapes_are_named():
    qweight, scales, zeros, _ = int_weight(64, 32, 4, 32, False, False, torch.float32)
    x = torch.randn(2, 64, device=device())
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ops.int_weight_matmul(x, qweight, scales, zeros, None, 3, 32)
    with pytest.raises(ValueError, match="scales/zeros must be"):
        ops.int_weight_matmul(x, qweight, scales, zeros, None, 4, 64)


@pytest.mark.cuda_only
@pytest.mark.parametrize("m", [1, 16, 64, 256])
def test_int_gemm_large_shapes_bf16(m):
    qweight, scales, zeros, perm = int_weight(4096, 4096, 4, 128, True, True, torch.bfloat16)
    x = torch.randn(m, 4096, device=device(), dtype=torch.bfloat16)
    got = ops.int_weight_matmul(x, qweight, scales, zeros, perm, 4, 128)
    want = ref.int_weight_matmul(x, qweight, scales, zeros, perm, 4, 128)
    rel = ((got.float() - want.float()).abs().mean() / want.float().abs().mean()).item()
    assert rel < 0.04, rel
