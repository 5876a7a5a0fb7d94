"""reshape_and_cache against its torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import device

from pagedserve_kernels import ops
from pagedserve_kernels import reference as ref

DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.cuda_only)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (2, 128), (3, 64), (8, 128)])
@pytest.mark.parametrize("num_tokens", [1, 13])
def test_reshape_and_cache(dtype, block_size, num_kv_heads, head_dim, num_tokens):
    gen = torch.Generator().manual_seed(0)
    dev = device()
    num_blocks = 6
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    cache = torch.randn(*shape, generator=gen).to(dev, dtype)
    want = cache.clone()
    # key/value as views of a fused qkv buffer (token stride larger than heads * dim).
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, generator=gen).to(dev, dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1  # padding rows
    slots = slots.to(dev)
    ops.reshape_and_cache(key, value, cache, slots)
    ref.reshape_and_cache(key, value, want, slots)
    assert torch.equal(cache, want)


def test_all_padding_and_longer_slot_mapping():
    cache = torch.zeros(2, 2, 16, 1, 64, device=device())
    key = torch.ones(3, 1, 64, device=device())
    slots = torch.tensor([-1, -1, -1, 5, 6], device=device())  # longer than key: tail ignored
    ops.reshape_and_cache(key, key, cache, slots)
    assert (cache == 0).all()


def test_rejects_mismatched_shapes():
    cache = torch.zeros(2, 2, 16, 2, 64, device=device())
    key = torch.ones(3, 1, 64, device=device())
    with pytest.raises(ValueError, match="must be"):
        ops.reshape_and_cache(key, key, cache, torch.zeros(3, dtype=torch.long, device=device()))
