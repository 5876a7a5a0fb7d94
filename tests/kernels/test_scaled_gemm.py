"""The W8A8 scaled GEMM (int8 and fp8 e4m3, per-tensor / per-token / per-channel scales and the
128x128 block variant) against its pure-torch reference, and the activation quantizer against
the formats' rules. The interpreter runs int8 and fp8 tiles on the CPU (triton 3.9)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import device

from pagedserve_kernels import ops
from pagedserve_kernels import reference as ref

FP8 = torch.float8_e4m3fn


def operands(m, k, n, qdtype, x_mode, w_groups, seed=0):
    """Quantized x and w as the layers make them: x by ``quantize_activation`` (static per
    tensor, per token, or per token and group of 128), w per channel or per 128x128 block
    (scales expanded per row)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 3
    w = torch.randn(n, k, generator=gen) * 0.05
    top = 127.0 if qdtype == torch.int8 else ref.FP8_MAX
    blocks = w.view(n, w_groups, k // w_groups).abs().amax(-1)  # [N, G]
    if w_groups > 1:  # one scale per 128 rows and 128 columns, repeated over the block's rows
        rows = -(-n // 128)
        block_max = torch.stack([blocks[r * 128:(r + 1) * 128].amax(0) for r in range(rows)])
        blocks = block_max.repeat_interleave(128, 0)[:n]
    w_scale = blocks / top
    scaled = w.view(n, w_groups, -1) / w_scale.unsqueeze(-1)
    wq = (scaled.round().clamp(-128, 127) if qdtype == torch.int8
          else scaled.clamp(-448, 448)).to(qdtype).view(n, k)
    static = x.abs().amax() / top if x_mode == "static" else None
    group = 128 if x_mode == "group" else k
    xq, x_scale = ref.quantize_activation(x, qdtype, static, group)
    dev = device()
    return xq.to(dev), x_scale.to(dev), wq.to(dev), w_scale.to(dev), x @ w.t()


CASES = [
    # (M, K, N, dtype, activations, weight scale groups)
    (1, 128, 64, torch.int8, "token", 1),
    (7, 256, 96, torch.int8, "static", 1),
    (33, 384, 128, torch.int8, "token", 1),
    (1, 128, 64, FP8, "token", 1),
    (5, 256, 80, FP8, "static", 1),
    (1, 256, 160, FP8, "group", 2),  # 128x128 blocks, N not a multiple of 128
    (20, 384, 256, FP8, "group", 3),
    pytest.param(300, 1024, 512, FP8, "group", 8, marks=pytest.mark.cuda_only),
    pytest.param(300, 1024, 512, torch.int8, "token", 1, marks=pytest.mark.cuda_only),
]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, k, n, qdtype, x_mode, w_groups", CASES)
def test_scaled_gemm_matches_reference(m, k, n, qdtype, x_mode, w_groups, out_dtype):
    xq, x_scale, wq, w_scale, exact = operands(m, k, n, qdtype, x_mode, w_groups)
    got = ops.scaled_matmul(xq, x_scale, wq, w_scale, out_dtype)
    want = ref.scaled_matmul(xq, x_scale, wq, w_scale, torch.float32)
    assert got.dtype == out_dtype and got.shape == (m, n)
    rel = ((got.float() - want).abs().max() / want.abs().max()).item()
    # int8 dots are exact; fp8 products are exact in fp32, only the summation order differs.
    assert rel < (1e-5 if out_dtype == torch.float32 else 1e-3), rel
    # And the quantized product is what the format means: close to the full-precision one.
    error = ((want.cpu() - exact).norm() / exact.norm()).item()
    assert error < (0.02 if qdtype == torch.int8 else 0.06), error


def test_fp8_block_gemm_relative_error_below_1e3():
    xq, x_scale, wq, w_scale, _ = operands(16, 512, 256, FP8, "group", 4, seed=3)
    got = ops.scaled_matmul(xq, x_scale, wq, w_scale, torch.float32)
    want = ref.scaled_matmul(xq, x_scale, wq, w_scale, torch.float32)
    assert ((got - want).norm() / want.norm()).item() < 1e-3


def test_activation_quantizer_follows_the_formats():
    x = torch.tensor([[1.0, -2.0, 0.5, 254.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = ref.quantize_activation(x, torch.int8, None, 4)
    # Per token: absmax / 127.5 (compressed-tensors), rounded half to even, clamped at 127.
    assert torch.allclose(scale[:, 0], torch.tensor([254.0 / 127.5, 1e-12 / 127.5]))
    assert q[0].tolist() == [1, -1, 0, 127] and q[1].tolist() == [0, 0, 0, 0]
    q, scale = ref.quantize_activation(x * 1000, FP8, torch.tensor(1.0), 4)
    assert scale.shape == (1, 1)
    assert q.float()[0].tolist() == [448.0, -448.0, 448.0, 448.0]  # saturating, not inf/nan
    q, scale = ref.quantize_activation(torch.arange(8.0).view(1, 8), FP8, None, 4)
    assert torch.allclose(scale, torch.tensor([[3.0 / 448, 7.0 / 448]]))


def test_bad_operands_are_named():
    xq, x_scale, wq, w_scale, _ = operands(4, 128, 64, torch.int8, "token", 1)
    with pytest.raises(ValueError, match="both be int8 or float8"):
        ops.scaled_matmul(xq, x_scale, wq.to(FP8), w_scale, torch.float32)
    with pytest.raises(ValueError, match="w_scale has shape"):
        ops.scaled_matmul(xq, x_scale, wq, w_scale[:10], torch.float32)


@pytest.mark.parametrize("fixture", ["ct-w8a8-int-static", "ct-w8a8-int-dynamic", "ct-fp8-block",
                                     "fp8-native-tensor-static"])
def test_fixture_layers_run_the_same_on_the_kernel_and_the_cpu_path(fixture):
    """A fused layer of each producer fixture, loaded by its linear method (scales turned into
    [N, G] rows): the Triton kernel, the CPU path (torch._int_mm / table-dequantized fp8) and the
    reference agree on the quantized activations."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from pagedserve.layers.linear import LinearBase
    from pagedserve.layers.quantization import parse_quantization
    from pagedserve.layers.quantization.w8a8_cpu import cpu_scaled_matmul

    path = Path(__file__).parents[1] / "fixtures" / "quant" / fixture
    raw = json.loads((path / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    prefix = "model.layers.1.mlp"
    method = parse_quantization(path, raw).linear_method(
        f"{prefix}.gate_up_proj", [f"{prefix}.gate_proj", f"{prefix}.up_proj"])
    size = raw["intermediate_size"]
    layer = LinearBase(raw["hidden_size"], [size, size], shard_names=[0, 1],
                       linear_method=method, prefix=f"{prefix}.gate_up_proj")
    for shard, name in enumerate(("gate_proj", "up_proj")):
        for param_name, param in layer.named_parameters():
            param.weight_loader(param, tensors[f"{prefix}.{name}.{param_name}"], shard)
    method.process_weights_after_loading(layer)
    w = layer.w8a8
    x = torch.randn(9, raw["hidden_size"], generator=torch.Generator().manual_seed(0))
    static = w.input_scales[0][2]
    xq, x_scale = ref.quantize_activation(x, w.qweight.dtype, static, w.activation_group)
    want = ref.scaled_matmul(xq, x_scale, w.qweight, w.scale, torch.float32)
    cpu = cpu_scaled_matmul(xq, x_scale, w.qweight, w.scale, torch.float32)
    dev = device()
    kernel = ops.scaled_matmul(xq.to(dev), x_scale.to(dev), w.qweight.to(dev), w.scale.to(dev),
                               torch.float32).cpu()
    for got in (cpu, kernel):
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    torch.testing.assert_close(layer(x), cpu)
