"""Builders shared by the kernel tests: random paged batches and per-dtype tolerances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# (atol, rtol) per dtype: fp32 runs exactly in the interpreter (and IEEE dots on CUDA); fp16/bf16
# differ from the references by the rounding of P to 16 bits before the PV product.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.5e-2, 1.5e-2),
}
ELEMENTWISE_TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    # 2 ulps: a last-bit difference in the fp32 math (reduction order, approximate rsqrt/exp on
    # CUDA) can flip a rounding of the intermediate that the reference also rounds.
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 table: Optional[dict] = None, what: str = "") -> None:
    atol, rtol = (table or TOLERANCES)[dtype]
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (an element was not written?)"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


@dataclass
class PagedBatch:
    """A batch whose context is already in the cache (attention's view after the write)."""

    query: torch.Tensor  # [T, Hq, D], T may exceed the real rows (padding)
    kv_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor  # slots of this step's tokens, -1 for padding rows
    max_query_len: int
    max_seq_len: int
    num_actual_tokens: int


def make_batch(
    q_lens: Sequence[int],
    ctx_lens: Sequence[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    num_padding: int = 0,
    extra_blocks: int = 7,
    seed: int = 0,
    poison_unused: bool = True,
) -> PagedBatch:
    """Request i has ``ctx_lens[i]`` cached positions and ``q_lens[i]`` new ones (seq_len is the
    sum). Blocks are a random permutation of the pool, so tables are non-contiguous; table rows
    are padded with garbage block ids past each request's length. With ``poison_unused`` every
cache slot outside every context holds NaN, so a kernel that reads past a context (and does not
mask the value it read) produces NaN."""
    gen = torch.Generator().manual_seed(seed)
    dev = device()
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    blocks_per = [max(1, -(-s // block_size)) for s in seq_lens]
    max_blocks = max(blocks_per) + 2
    num_blocks = sum(blocks_per) + extra_blocks + 1
    # Block 0 is never part of a context: masked-off block-table reads land there (other=0), so
    # with poison_unused an unmasked K/V read of a masked position shows up as NaN.
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1
    table = torch.randint(0, num_blocks, (len(q_lens), max_blocks), generator=gen)
    used = 0
    for i, n in enumerate(blocks_per):
        table[i, :n] = perm[used:used + n]
        used += n
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    if poison_unused:
        live = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        for i, s in enumerate(seq_lens):
            pos = torch.arange(s)
            live[table[i, pos // block_size] * block_size + pos % block_size] = True
        kv.view(2, -1, num_kv_heads, head_dim)[:, ~live] = float("nan")
    num_tokens = sum(q_lens) + num_padding
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    slots = []
    for i, (q, c) in enumerate(zip(q_lens, ctx_lens)):
        pos = torch.arange(c, c + q)
        slots.append(table[i, pos // block_size] * block_size + pos % block_size)
    slots.append(torch.full((num_padding,), -1, dtype=torch.long))
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    return PagedBatch(
        query=query.to(dev, dtype),
        kv_cache=kv.to(dev, dtype),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_table=table.to(dev, torch.int32),
        slot_mapping=torch.cat(slots).long().to(dev),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        num_actual_tokens=sum(q_lens),
    )
