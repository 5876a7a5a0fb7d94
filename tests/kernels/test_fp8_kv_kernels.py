"""FP8 KV cache: the quantizing cache write, the dequantizing attention kernels and the torch
backend, against the pure-torch references (in Triton's interpreter on the CPU).

The interpreter handles fp8 tensors (stored as bytes); its own fp32 -> fp8 cast rounds wrongly
(half-up, and a mantissa carry is lost: 124.6 -> 64 in e5m2), which is why the write kernel
rounds on the fp8 grid itself (``pagedserve_kernels.fp8``): the tests below hold it to the
bytes torch's cast produces.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import TOLERANCES, assert_close, device, make_batch
from test_attention_backends import MIXED, _step

from pagedserve.attention.base import AttentionMetadata
from pagedserve.attention.selector import get_attention_backend
from pagedserve.attention.torch_backend import TorchAttentionBackend
from pagedserve_kernels import ops
from pagedserve_kernels import reference as ref
from pagedserve_kernels.attention import AttentionConfig

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
SRC_DTYPES = [torch.float32, torch.float16,
              pytest.param(torch.bfloat16, marks=pytest.mark.cuda_only)]
# The round trip's bound (vLLM's test_reshape_and_cache_flash): atol 1e-3, rtol 0.1. e5m2 has
# 2 mantissa bits, so its rounding error reaches 1/9 of a value (1.125 -> 1.0): rtol 0.125.
ROUND_TRIP_RTOL = {torch.float8_e4m3fn: 0.1, torch.float8_e5m2: 0.125}


def _scales(kind: str, key: torch.Tensor, value: torch.Tensor) -> tuple[float, float]:
    if kind == "unit":
        return 1.0, 1.0
    # vLLM's calibration-style scale: the largest value lands at 64 (well inside e4m3's 448).
    return float(key.float().abs().max()) / 64, float(value.float().abs().max()) / 64


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", SRC_DTYPES)
@pytest.mark.parametrize("scale_kind", ["unit", "amax/64"])
def test_write_then_read_round_trip(fp8, dtype, scale_kind):
    gen = torch.Generator().manual_seed(0)
    dev = device()
    num_blocks, block_size, heads, head_dim, tokens = 5, 16, 2, 64, 29
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=gen)
    qkv[:, 1:] *= 20  # values in [-~90, ~90]: in range at scale 1.0 too
    qkv = qkv.to(dev, dtype)
    key, value = qkv[:, 1], qkv[:, 2]  # strided views, as the model passes them
    k_scale, v_scale = _scales(scale_kind, key, value)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::4] = -1
    slots = slots.to(dev)
    cache = torch.zeros(2, num_blocks, block_size, heads, head_dim, dtype=fp8, device=dev)
    want = cache.clone()
    ops.reshape_and_cache(key, value, cache, slots, k_scale, v_scale)
    ref.reshape_and_cache(key, value, want, slots, k_scale=k_scale, v_scale=v_scale)
    mismatched = (cache.view(torch.uint8) != want.view(torch.uint8)).float().mean().item()
    # Bit for bit in the interpreter; a GPU's fp32 division may round the other way (1 ulp).
    assert mismatched <= (1e-3 if torch.cuda.is_available() else 0.0), mismatched
    valid = slots >= 0
    flat = cache.view(2, -1, heads, head_dim)[:, slots[valid]]
    for stored, original, scale in ((flat[0], key[valid], k_scale),
                                    (flat[1], value[valid], v_scale)):
        torch.testing.assert_close(ref.dequantize_kv(stored, scale, torch.float32),
                                   original.float(), atol=1e-3, rtol=ROUND_TRIP_RTOL[fp8])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=dev)
    untouched[slots[valid]] = False
    assert (cache.view(2, -1, heads, head_dim)[:, untouched].view(torch.uint8) == 0).all()


@pytest.mark.parametrize("fp8", FP8)
def test_write_saturates_out_of_range_values(fp8):
    limit = torch.finfo(fp8).max
    key = torch.tensor([[[1e9, -1e9, limit * 1.02, -limit * 1.5] + [0.0] * 12]],
                       device=device())
    cache = torch.zeros(2, 1, 16, 1, 16, dtype=fp8, device=device())
    ops.reshape_and_cache(key, key, cache, torch.tensor([3], device=device()), 1.0, 1.0)
    got = cache[0, 0, 3, 0, :4].float()
    assert got.tolist() == [limit, -limit, limit, -limit]
    want = torch.zeros_like(cache)
    ref.reshape_and_cache(key, key, want, torch.tensor([3], device=device()))
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))


def _fp8_batch(q_lens, ctx_lens, heads, dtype, fp8, scales, head_dim=64, block_size=16):
    batch = make_batch(q_lens, ctx_lens, *heads, head_dim, block_size, dtype, num_padding=2)
    # NaN poison survives the cast (both formats have NaN), so unmasked reads still show.
    k_scale, v_scale = scales
    batch.kv_cache = torch.stack([ref.quantize_kv(batch.kv_cache[0] * 3, k_scale, fp8),
                                  ref.quantize_kv(batch.kv_cache[1] * 3, v_scale, fp8)])
    return batch


def _attend(batch, scales, config=None):
    args = (batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_table, batch.query.shape[-1] ** -0.5, batch.max_query_len,
            batch.max_seq_len)
    kw = dict(num_actual_tokens=batch.num_actual_tokens, k_scale=scales[0], v_scale=scales[1])
    return ops.unified_attention(*args, config=config, **kw), ref.unified_attention(*args, **kw)


MIXED_Q, MIXED_CTX = [1, 37, 1, 16, 5, 1], [599, 100, 0, 0, 31, 63]
SCALES = [(1.0, 1.0), (0.05, 0.2)]
# The kernels fold the scales into the softmax scale and the output, the reference multiplies
# K and V first: in fp32 that reorders roundings of values up to ~10 (a few 1e-6 relative).
FP8_TOLERANCES = {**TOLERANCES, torch.float32: (1e-4, 1e-4)}


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scales", SCALES)
def test_unified_attention_reads_fp8(fp8, dtype, scales):
    batch = _fp8_batch(MIXED_Q, MIXED_CTX, (8, 2), dtype, fp8, scales)
    got, want = _attend(batch, scales)
    assert_close(got, want, dtype, FP8_TOLERANCES, what=f"{fp8} {scales}")
    assert (got[batch.num_actual_tokens:] == 0).all()


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_paths_read_fp8(fp8, splits):
    ctx = [0, 15, 16, 63, 200, 599]
    batch = _fp8_batch([1] * len(ctx), ctx, (4, 1), torch.float32, fp8, SCALES[1])
    got, want = _attend(batch, SCALES[1], AttentionConfig(num_splits=splits))
    assert_close(got, want, torch.float32, FP8_TOLERANCES, what=f"splits={splits}")


def test_reference_reads_fp8_as_scaled_fp32():
    """What the scales mean: an fp8 cache with scales attends like the fp32 cache holding
    ``stored * scale``, and the scales do nothing to a cache in the query's dtype."""
    k_scale, v_scale = SCALES[1]
    batch = _fp8_batch(MIXED_Q, MIXED_CTX, (8, 2), torch.float32, torch.float8_e4m3fn,
                       SCALES[1])
    args = (batch.query_start_loc, batch.seq_lens, batch.block_table, 0.125)
    fp32_cache = torch.stack([batch.kv_cache[0].float() * k_scale,
                              batch.kv_cache[1].float() * v_scale])
    n = batch.num_actual_tokens
    fp8_out = ref.paged_attention(batch.query, batch.kv_cache, *args, k_scale, v_scale)[:n]
    fp32_out = ref.paged_attention(batch.query, fp32_cache, *args)[:n]
    torch.testing.assert_close(fp8_out, fp32_out, atol=1e-5, rtol=1e-5)
    ignored = ref.paged_attention(batch.query, fp32_cache, *args, k_scale, v_scale)[:n]
    torch.testing.assert_close(ignored, fp32_out, atol=0, rtol=0)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_and_triton_backends_agree_on_fp8(fp8, dtype):
    """Both backends write the same bytes and read them alike: the torch backend (the CPU
    path) attends to what the cache holds even for a prefill without a cached prefix."""
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        dtype = torch.float16  # the interpreter has no bf16 dot
    b, key, value, meta = _step(*MIXED, (8, 2), 64, 16, dtype, num_padding=3)
    key, value = key * 4, value * 4
    scales = (0.5, 0.25)
    start = torch.stack([ref.quantize_kv(b.kv_cache[0], scales[0], fp8),
                         ref.quantize_kv(b.kv_cache[1], scales[1], fp8)])
    args = (8, 2, 64, 0.125, 16)
    caches, outs = [], []
    for backend in (TorchAttentionBackend(*args),
                    get_attention_backend("triton", b.query.device, *args, kv_cache_dtype=fp8)):
        cache = start.clone()
        m = AttentionMetadata(**{**meta.__dict__, "plan": None})
        backend.prepare(m)
        outs.append(backend.forward(b.query, key, value, cache, m, *scales))
        caches.append(cache)
    assert torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8))
    n = b.num_actual_tokens
    assert_close(outs[1][:n], outs[0][:n], torch.bfloat16 if dtype != torch.float32 else dtype,
                 FP8_TOLERANCES, what=str(fp8))


@pytest.mark.parametrize("name", ["flash_attn", "flashinfer"])
def test_selector_refuses_fp8_for_foreign_backends(name):
    with pytest.raises(ValueError, match=rf"kv_cache_dtype 'fp8_e4m3' with attention_backend "
                                         rf"'{name}'.*use attention_backend 'triton'"):
        get_attention_backend(name, device(), 8, 2, 64, 0.125, 16,
                              kv_cache_dtype=torch.float8_e4m3fn)


@pytest.mark.parametrize("fp8", FP8 + [torch.float32])
@pytest.mark.parametrize("scales", SCALES)
def test_cpu_decode_kernel_reads_fp8(fp8, scales):
    """The C++ decode kernel (the CPU's fp32 decode path) on fp8 caches, with their scales;
    a float32 cache ignores them."""
    from pagedserve_kernels import cpu_decode

    if cpu_decode.load() is None:
        pytest.skip("the CPU decode kernel cannot be built here")
    ctx = [0, 15, 16, 63, 200]
    if fp8 == torch.float32:
        batch = make_batch([1] * len(ctx), ctx, 8, 2, 64, 16, torch.float32)
        batch.query, batch.kv_cache = batch.query.cpu(), batch.kv_cache.cpu()
        want_scales = (1.0, 1.0)
    else:
        batch = _fp8_batch([1] * len(ctx), ctx, (8, 2), torch.float32, fp8, scales)
        batch.query, batch.kv_cache = batch.query.cpu(), batch.kv_cache.cpu()
        want_scales = scales
    seq_lens, table = batch.seq_lens.cpu(), batch.block_table.cpu()
    n = batch.num_actual_tokens
    got = cpu_decode.paged_decode(batch.query[:n], batch.kv_cache, seq_lens, table, 0.125,
                                  k_scale=scales[0], v_scale=scales[1])
    want = ref.paged_attention(batch.query[:n], batch.kv_cache, batch.query_start_loc.cpu(),
                               seq_lens, table, 0.125, *want_scales)[:n]
    assert_close(got, want, torch.float32, FP8_TOLERANCES, what=str(fp8))
