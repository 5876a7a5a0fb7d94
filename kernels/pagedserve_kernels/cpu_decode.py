"""Paged decode attention for the CPU, a small C++ kernel built on first use.

Each decode row reads its context's keys and values once, straight from the cache blocks, for
all the query heads of a KV head; the pure-torch path (gather the blocks, then SDPA) moves the
context three times. The reference is ``pagedserve_kernels.reference.paged_attention``.

Built by ``cpu_build`` on first use; where it cannot be built, ``load()`` returns None and the
caller keeps its pure-torch path.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Optional

import torch

from pagedserve_kernels.cpu_build import build, simd_flags


@functools.cache
def load() -> Optional[ModuleType]:
    """The compiled extension, or None where it cannot be built (or PAGEDSERVE_CPU_KERNEL=0)."""
    # -ffast-math lets exp vectorize (glibc's libmvec, a few ulp); sums are reordered anyway.
    flags = ["-O3", "-ffast-math", "-fopenmp", *simd_flags()]
    return build("pagedserve_cpu_decode", "paged_decode.cpp", flags, "CPU decode kernel")


def main() -> None:
    """``python -m pagedserve_kernels.cpu_decode``: builds the kernel now (setup does this, so
    that no request waits for the compiler)."""
    logging.basicConfig(level=logging.INFO)
    print("CPU decode kernel:", "ready" if load() is not None else "unavailable (see warning)")


def paged_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    out: Optional[torch.Tensor] = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of one query row per request over its cached context (fp32, CPU).

    query [rows, heads, dim]; kv_cache [2, blocks, block_size, kv_heads, dim]; seq_lens [rows]
    int32 (context including the row's own token, already written); block_table [rows, width]
    int32. An fp8 cache (float8_e4m3fn, float8_e5m2) is read as ``x * k_scale`` /
    ``x * v_scale``; the scales are ignored for a float32 cache. Raises RuntimeError when the
    kernel is not available.
    """
    module = load()
    if module is None:
        raise RuntimeError("the CPU decode kernel could not be built")
    if out is None:
        out = torch.empty_like(query)
    module.paged_decode(query.contiguous(), kv_cache, seq_lens, block_table, float(scale), out,
                        float(k_scale), float(v_scale))
    return out


if __name__ == "__main__":
    main()
