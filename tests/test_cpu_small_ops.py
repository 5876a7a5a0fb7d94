"""The C++ small ops of the CPU path (``pagedserve_kernels.cpu_ops``) against their pure-torch
references over a grid of row counts, widths and dtypes; their per-call fallbacks to the
reference; the layers' dispatch to them; and that they are built wherever a compiler is.

Tolerances: fp32 to 1e-5 (only the order of the norm's sum and the SiLU's exp differ). The C++
rounds fp16/bf16 at the reference's rounding points, so at most one ulp of the dtype apart
(rtol 1e-3 fp16, 8e-3 bf16) and no more than 1% of the elements differ at all: computing in
fp32 and rounding once at the end would move far more than 1%.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from pagedserve.layers import kernel_dispatch
from pagedserve.layers.activation import SiluAndMul
from pagedserve.layers.norm import RMSNorm
from pagedserve.layers.rotary import RotaryEmbedding
from pagedserve_kernels import cpu_ops
from pagedserve_kernels import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=8e-3),
}
ROWS = [1, 3, 64, 257]
HIDDEN = [8, 13, 1000, 2048]  # 13 and 1000: not multiples of the vector widths

built = pytest.mark.skipif(cpu_ops.load() is None, reason="the CPU small ops cannot be built")


def _assert_matches(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    torch.testing.assert_close(got, want, **TOLERANCES[want.dtype], msg=lambda m: f"{what}: {m}")
    if want.dtype != torch.float32 and want.numel():
        differ = (got != want).float().mean().item()
        assert differ <= 0.01, f"{what}: {differ:.2%} of elements differ from the reference"


def test_built_where_a_compiler_is():
    """The test environment has a compiler and ninja: the ops must build there, or every CPU
    run would silently take the slow reference path."""
    from torch.utils import cpp_extension

    if shutil.which("c++") is None or not cpp_extension.is_ninja_available():
        pytest.skip("no C++ compiler or ninja here")
    assert cpu_ops.load() is not None


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm(rows, hidden, dtype):
    torch.manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, dtype=dtype) * 3
    w = torch.randn(hidden, dtype=dtype)
    _assert_matches(cpu_ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), "rms_norm")


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_fused_add_rms_norm(rows, hidden, dtype):
    torch.manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, dtype=dtype)
    residual = torch.randn(rows, hidden, dtype=dtype) * 4
    w = torch.randn(hidden, dtype=dtype)
    got_out, got_sum = cpu_ops.fused_add_rms_norm(x, residual, w, 1e-5)
    want_out, want_sum = ref.fused_add_rms_norm(x, residual, w, 1e-5)
    # The sum is one rounded add, as in the reference: bit for bit.
    assert torch.equal(got_sum, want_sum)
    _assert_matches(got_out, want_out, "fused_add_rms_norm")


@built
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_leaves_its_inputs_alone(dtype):
    """Same semantics as the reference (and the Triton kernel): new tensors out, x and
    residual unchanged, so that a caller still holding either (a captured hidden state) keeps
    its values."""
    x = torch.randn(3, 40, dtype=dtype)
    residual = torch.randn(3, 40, dtype=dtype)
    w = torch.randn(40, dtype=dtype)
    x0, r0 = x.clone(), residual.clone()
    out, summed = cpu_ops.fused_add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(x, x0) and torch.equal(residual, r0)
    for t in (out, summed):
        assert t.data_ptr() not in (x.data_ptr(), residual.data_ptr())
    assert torch.equal(summed, x0 + r0)


@built
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_take_strided_and_3d_inputs(dtype):
    """Rows with a stride (a slice of a wider tensor), and [tokens, heads, head_dim] (a
    per-head q/k norm over a view of the fused QKV output)."""
    wide = torch.randn(5, 3 * 64, dtype=dtype)
    x = wide[:, 64:128]
    w = torch.randn(64, dtype=dtype)
    _assert_matches(cpu_ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), "strided")
    heads = wide.view(5, 3, 64)
    _assert_matches(cpu_ops.rms_norm(heads, w, 1e-6), ref.rms_norm(heads, w, 1e-6), "3d")
    res = torch.randn(5, 3, 64, dtype=dtype)
    for got, want in zip(cpu_ops.fused_add_rms_norm(heads, res, w, 1e-6),
                         ref.fused_add_rms_norm(heads, res, w, 1e-6)):
        _assert_matches(got, want, "3d fused")


def _qkv(tokens: int, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """query, key, value as the attention layer gets them: views of one fused projection."""
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype) * 2
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (q.view(tokens, q_heads, head_dim), k.view(tokens, kv_heads, head_dim),
            v.view(tokens, kv_heads, head_dim))


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", ROWS)
@pytest.mark.parametrize("head_dim, heads", [(64, (8, 2)), (128, (4, 4)), (80, (6, 3))])
def test_rotary_embedding(tokens, head_dim, heads, dtype):
    """NeoX rotary (the reference has no GPT-J style and no partial rotary: the cache's width is
    the head dim); 80 is not twice a power of two."""
    torch.manual_seed(tokens * head_dim)
    rotary = RotaryEmbedding(head_dim, 4096, 10000.0)
    q, k, _ = _qkv(tokens, *heads, head_dim, dtype)
    positions = torch.randint(0, 4096, (tokens,))
    got = cpu_ops.rotary_embedding(positions, q, k, rotary.cos_sin_cache)
    want = ref.rotary_embedding(positions, q, k, rotary.cos_sin_cache)
    _assert_matches(got[0], want[0], "query")
    _assert_matches(got[1], want[1], "key")


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_with_int32_positions_and_a_cache_cast_to_the_model_dtype(dtype):
    q, k, _ = _qkv(7, 4, 2, 64, dtype)
    cache = RotaryEmbedding(64, 512, 10000.0).cos_sin_cache
    positions = torch.tensor([0, 1, 511, 3, 300, 2, 9], dtype=torch.int32)
    want = ref.rotary_embedding(positions.long(), q, k, cache)
    for table in (cache, cache.to(dtype)):
        got = cpu_ops.rotary_embedding(positions, q, k, table)
        _assert_matches(got[0], want[0], f"query, {table.dtype} table")
        _assert_matches(got[1], want[1], f"key, {table.dtype} table")


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("d", [8, 13, 1000, 2816])
def test_silu_and_mul(rows, d, dtype):
    torch.manual_seed(rows * d)
    x = torch.randn(rows, 2 * d, dtype=dtype) * 4
    _assert_matches(cpu_ops.silu_and_mul(x), ref.silu_and_mul(x), "silu_and_mul")


@built
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_far_ends(dtype):
    """Large gates: silu(x) -> x above, -> 0 below (where torch's exp overflows to inf and it
    returns -0, the C++ returns the tiny true value: equal within atol)."""
    gate = torch.tensor([-1e4, -100.0, -88.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 88.0, 100.0, 1e4])
    x = torch.cat([gate, torch.full_like(gate, 1.5)]).to(dtype)[None]
    torch.testing.assert_close(cpu_ops.silu_and_mul(x), ref.silu_and_mul(x),
                               **TOLERANCES[dtype])
    nan = torch.tensor([[float("nan"), 1.0]], dtype=dtype)
    assert cpu_ops.silu_and_mul(nan).isnan().all()


@built
def test_silu_and_mul_takes_strided_and_3d_inputs():
    wide = torch.randn(6, 3 * 40)
    x = wide[:, 20:100]
    _assert_matches(cpu_ops.silu_and_mul(x), ref.silu_and_mul(x), "strided")
    x3 = torch.randn(2, 3, 2 * 24, dtype=torch.bfloat16)
    _assert_matches(cpu_ops.silu_and_mul(x3), ref.silu_and_mul(x3), "3d")


def _empty_cache(dtype: torch.dtype, kv_heads: int, head_dim: int) -> torch.Tensor:
    return torch.zeros(2, 40, 16, kv_heads, head_dim, dtype=dtype)


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", ROWS)
@pytest.mark.parametrize("kv_heads, head_dim", [(2, 64), (4, 128), (3, 80)])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_reshape_and_cache(tokens, kv_heads, head_dim, dtype, slot_dtype):
    torch.manual_seed(tokens + head_dim)
    _, k, v = _qkv(tokens, 2, kv_heads, head_dim, dtype)  # strided views, as the layer's
    slots = torch.randperm(40 * 16)[:tokens]
    slots[::5] = -1  # padding rows are skipped
    # slot_mapping may run past the tokens (CUDA-graph padding): only the first T are read.
    mapping = torch.cat([slots, torch.full((3,), 7)]).to(slot_dtype)
    got, want = _empty_cache(dtype, kv_heads, head_dim), _empty_cache(dtype, kv_heads, head_dim)
    cpu_ops.reshape_and_cache(k, v, got, mapping)
    ref.reshape_and_cache(k, v, want, mapping.long())
    assert torch.equal(got, want)


@built
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_reshape_and_cache_leaves_an_fp8_cache_to_the_reference(fp8):
    _, k, v = _qkv(5, 2, 2, 64, torch.float32)
    slots = torch.tensor([3, -1, 100, 17, 40])
    got = _empty_cache(torch.float32, 2, 64).to(fp8)
    want = got.clone()
    cpu_ops.reshape_and_cache(k, v, got, slots, k_scale=0.5, v_scale=2.0)
    ref.reshape_and_cache(k, v, want, slots, k_scale=0.5, v_scale=2.0)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@built
def test_bad_input_fails_naming_it():
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="weight shape"):
        cpu_ops.rms_norm(x, torch.ones(15), 1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        cpu_ops.fused_add_rms_norm(x, torch.randn(2, 15), torch.ones(16), 1e-6)
    with pytest.raises(ValueError, match="must be even"):
        cpu_ops.silu_and_mul(torch.randn(2, 15))
    q, k, _ = _qkv(2, 2, 1, 64, torch.float32)
    cache = RotaryEmbedding(64, 8, 10000.0).cos_sin_cache
    with pytest.raises(IndexError, match="position 8"):
        cpu_ops.rotary_embedding(torch.tensor([0, 8]), q, k, cache)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        cpu_ops.rotary_embedding(torch.tensor([0, 1]), q, k, cache[:, :32])
    kv = _empty_cache(torch.float32, 1, 64)
    with pytest.raises(IndexError, match="slot 640"):
        cpu_ops.reshape_and_cache(k, k, kv, torch.tensor([0, 640]))
    assert not kv.any()  # checked before anything is written
    with pytest.raises(ValueError, match="key"):
        cpu_ops.reshape_and_cache(q, q, kv, torch.tensor([0, 1]))


@built
def test_falls_back_to_the_reference_for_what_it_does_not_cover():
    # A weight of another dtype: the reference's promotion (a float32 result).
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    w = torch.randn(32)
    assert cpu_ops.rms_norm(x, w, 1e-6).dtype == torch.float32
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    # float64, which the C++ does not take.
    x64 = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(cpu_ops.silu_and_mul(x64), ref.silu_and_mul(x64))
    # Autograd: the reference runs, so gradients flow.
    xg = torch.randn(3, 32, requires_grad=True)
    cpu_ops.rms_norm(xg, torch.ones(32), 1e-6).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


@built
def test_the_layers_dispatch_to_the_cpu_ops(monkeypatch):
    x = torch.randn(2, 48)
    assert kernel_dispatch.small_ops_for(x) is cpu_ops
    assert kernel_dispatch.ops_for(x) is None  # the matmul kernels stay CUDA-only
    calls = []
    for name in ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul"):
        real = getattr(cpu_ops, name)
        monkeypatch.setattr(cpu_ops, name,
                            lambda *a, _real=real, _name=name, **kw: (calls.append(_name),
                                                                      _real(*a, **kw))[1])
    norm = RMSNorm(48)
    norm(x)
    norm(x, torch.randn(2, 48))
    SiluAndMul()(x)
    q, k, _ = _qkv(2, 2, 1, 64, torch.float32)
    RotaryEmbedding(64, 16, 10000.0)(torch.tensor([1, 2]), q, k)
    assert calls == ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding"]


def test_pagedserve_cpu_kernel_0_turns_them_off(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CPU_KERNEL", "0")
    cpu_ops.load.cache_clear()
    kernel_dispatch._load_cpu_ops.cache_clear()
    try:
        assert cpu_ops.load() is None
        x = torch.randn(2, 16)
        assert kernel_dispatch.small_ops_for(x) is None
        # The functions still answer, through the reference.
        torch.testing.assert_close(cpu_ops.silu_and_mul(x), ref.silu_and_mul(x))
    finally:
        monkeypatch.delenv("PAGEDSERVE_CPU_KERNEL")
        cpu_ops.load.cache_clear()
        kernel_dispatch._load_cpu_ops.cache_clear()
