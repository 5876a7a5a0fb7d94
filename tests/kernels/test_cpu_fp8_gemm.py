"""The CPU fp8 GEMM kernel (``pagedserve_kernels.cpu_fp8_gemm``): its e4m3 decoding against
torch's own fp8 cast and the layers' lookup table for all 256 codes, its products against the
pure-torch reference for every scale layout, and the W8A8 CPU path with and without it."""

from __future__ import annotations

import pytest
import torch
from test_scaled_gemm import FP8, operands

from pagedserve.layers.quantization import w8a8_cpu
from pagedserve_kernels import cpu_fp8_gemm
from pagedserve_kernels import reference as ref

pytestmark = pytest.mark.skipif(
    cpu_fp8_gemm.load() is None, reason="the CPU fp8 GEMM kernel cannot be built here")


def test_decodes_all_256_codes_like_torch_and_the_table():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8)
    # K = 19 rows of codes: the vector loop and its scalar tail both decode every code.
    weight = codes.view(256, 1).expand(256, 19).contiguous()
    x = torch.zeros(1, 19)
    for k in range(19):
        x.zero_()
        x[0, k] = 1.0
        got = cpu_fp8_gemm.fp8_scaled_mm(x, torch.ones(1, 1), weight, torch.ones(256, 1))[0]
        torch.testing.assert_close(got, codes.float(), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got, w8a8_cpu.fp8_to_float(codes), rtol=0, atol=0,
                                   equal_nan=True)


CASES = [
    # (M, K, N, activations, weight scale groups): N not a multiple of the kernel's 4-row tile,
    # K not a multiple of its vector width, per-token groups against per-channel weights.
    (1, 128, 64, "token", 1),
    (5, 256, 81, "static", 1),
    (3, 40, 7, "token", 1),
    (1, 256, 160, "group", 2),
    (16, 384, 258, "group", 3),
    (4, 256, 96, "group", 1),
]


@pytest.mark.parametrize("m, k, n, x_mode, w_groups", CASES)
def test_matches_the_reference(m, k, n, x_mode, w_groups):
    xq, x_scale, wq, w_scale, _ = operands(m, k, n, FP8, x_mode, w_groups)
    want = ref.scaled_matmul(xq, x_scale, wq, w_scale, torch.float32)
    got = w8a8_cpu.cpu_scaled_matmul(xq, x_scale, wq, w_scale, torch.float32)
    # Products are exact in fp32; only where the scales apply and the summation order differ.
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("m, k, n, x_mode, w_groups", CASES[:4])
def test_table_path_without_the_kernel_matches_too(m, k, n, x_mode, w_groups, monkeypatch):
    xq, x_scale, wq, w_scale, _ = operands(m, k, n, FP8, x_mode, w_groups)
    with_kernel = w8a8_cpu.cpu_scaled_matmul(xq, x_scale, wq, w_scale, torch.float32)
    monkeypatch.setattr(cpu_fp8_gemm, "load", lambda: None)
    without = w8a8_cpu.cpu_scaled_matmul(xq, x_scale, wq, w_scale, torch.float32)
    rel = ((with_kernel - without).abs().max() / without.abs().max()).item()
    assert rel < 1e-5, rel


def test_threads_split_the_rows_alike():
    xq, x_scale, wq, w_scale, _ = operands(16, 256, 300, FP8, "token", 1)
    x = w8a8_cpu.fp8_to_float(xq)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_fp8_gemm.fp8_scaled_mm(x, x_scale, wq, w_scale)
        torch.set_num_threads(2)
        two = cpu_fp8_gemm.fp8_scaled_mm(x, x_scale, wq, w_scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
