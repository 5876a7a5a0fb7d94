"""Host side of paged attention: validation, launch configuration, and the choice between the
unified kernel and the split-KV decode path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from pagedserve_kernels._utils import check, device_sms, is_power_of_2, next_power_of_2
from pagedserve_kernels.attention_split import merge_splits_kernel, split_kv_decode_kernel
from pagedserve_kernels.attention_unified import unified_attention_kernel
from pagedserve_kernels.fp8 import fp8_format


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters; ``None`` fields are chosen from the problem shape (see ``_config``).

    Exposed so the benchmark can sweep them; the engine always uses the defaults.
    """

    block_m: Optional[int] = None  # query rows per program (tokens x heads of a KV group)
    tile_n: Optional[int] = None  # KV positions per inner-loop step
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    num_splits: Optional[int] = None  # split-KV: 1 forces the unified kernel
    # Split-KV pays off once programs x splits fill the GPU; below this many positions per split
    # the merge costs more than the parallelism gains.
    min_split_len: int = 512
    programs_per_sm: int = 4


def _pick_splits(cfg: AttentionConfig, num_seqs: int, num_kv_heads: int, max_seq_len: int,
                 max_query_len: int, device: torch.device) -> int:
    if cfg.num_splits is not None:
        return max(1, cfg.num_splits) if max_query_len == 1 else 1
    if max_query_len != 1:
        return 1
    target = cfg.programs_per_sm * device_sms(device)
    programs = max(num_seqs * num_kv_heads, 1)
    if programs >= target:
        return 1
    by_length = max_seq_len // cfg.min_split_len
    # 64 keeps the merge tile (splits x head_dim fp32) in registers.
    return max(1, min(triton.cdiv(target, programs), by_length, 64))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 tl.dot defaults to TF32 on CUDA (~1e-3 error); fp32 is the testing dtype, keep it exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def unified_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: Optional[torch.Tensor] = None,
    num_actual_tokens: Optional[int] = None,
    config: Optional[AttentionConfig] = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Paged attention of a mixed batch of prefill chunks and decodes, after the cache is written.

    query [T, Hq, D]; kv_cache [2, num_blocks, block_size, Hkv, D]; query_start_loc [B + 1] and
    seq_lens [B] int32; block_table [B, max_blocks] int32. Request ``i`` owns rows
    ``query_start_loc[i]:query_start_loc[i+1]`` at positions ``seq_lens[i] - q_len_i ...
    seq_lens[i] - 1`` and attends causally to its cached context. ``max_query_len`` and
    ``max_seq_len`` are host-side upper bounds used only to pick the launch. Rows from
    ``num_actual_tokens`` on are padding and are zeroed. An fp8 ``kv_cache`` (e4m3fn, e5m2)
    holds ``x / scale``: it is read as ``x * k_scale`` / ``x * v_scale``, with fp32
    accumulation; the scales are ignored for a cache in ``query``'s dtype. Returns ``out``
    [T, Hq, D].
    """
    cfg = config or AttentionConfig()
    check(query.dim() == 3, f"query {tuple(query.shape)} must be [tokens, heads, head_dim]")
    check(kv_cache.dim() == 5 and kv_cache.shape[0] == 2,
          f"kv_cache {tuple(kv_cache.shape)} must be [2, blocks, block_size, kv_heads, head_dim]")
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, cache_dim = kv_cache.shape
    check(cache_dim == head_dim, f"kv_cache head_dim {cache_dim} != query head_dim {head_dim}")
    check(num_heads % num_kv_heads == 0,
          f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    check(is_power_of_2(head_dim) and head_dim >= 16,
          f"head_dim {head_dim} must be a power of two >= 16")
    check(is_power_of_2(block_size), f"block_size {block_size} must be a power of two")
    is_fp8 = fp8_format(kv_cache.dtype) is not None
    check(query.dtype == kv_cache.dtype or is_fp8,
          f"query {query.dtype} != kv_cache {kv_cache.dtype} (which is not an fp8 format)")
    if not is_fp8:
        k_scale = v_scale = 1.0
    check(k_scale > 0 and v_scale > 0,
          f"fp8 KV-cache scales must be positive, got k_scale={k_scale}, v_scale={v_scale}")
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens),
                    ("block_table", block_table)):
        check(t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}")
        check(t.device == query.device, f"{name} is on {t.device}, query on {query.device}")
    num_seqs = query_start_loc.numel() - 1
    check(seq_lens.numel() >= num_seqs and block_table.shape[0] >= num_seqs,
          "seq_lens/block_table have fewer rows than query_start_loc describes")
    check(block_table.stride(-1) == 1, "block_table must be contiguous in its last dim")
    check(kv_cache.stride(-1) == 1, "kv_cache must be contiguous in head_dim")
    if query.stride(-1) != 1:
        query = query.contiguous()
    if out is None:
        out = torch.empty_like(query)
    check(out.shape == query.shape and out.dtype == query.dtype,
          f"out {tuple(out.shape)}/{out.dtype} must match query")
    check(out.stride(-1) == 1, "out must be contiguous in head_dim")
    if num_actual_tokens is not None and num_actual_tokens < num_tokens:
        out[num_actual_tokens:].zero_()
    if num_seqs <= 0 or num_tokens == 0:
        return out

    group = num_heads // num_kv_heads
    group_p2 = next_power_of_2(group)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    precision = _dot_precision(query.dtype)
    # 64 positions x 256-byte rows per K/V tile keeps 3 pipeline stages well inside shared memory;
    # wider rows (fp32, head_dim 256) halve the tile. Tiles need not align with pages: each
    # position finds its own page, so any power of two works (multiples of the page size gather
    # whole pages).
    row_bytes = head_dim * query.element_size()
    tile_n = cfg.tile_n or (64 if row_bytes <= 256 else 32)
    num_stages = cfg.num_stages or (3 if row_bytes <= 256 else 2)
    check(is_power_of_2(tile_n) and tile_n >= 16, f"tile_n {tile_n} must be a power of two >= 16")
    common = dict(
        stride_kb=k_cache.stride(0), stride_ks=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vs=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_bt=block_table.stride(0),
    )
    splits = _pick_splits(cfg, num_seqs, num_kv_heads, max_seq_len, max_query_len, query.device)
    if splits > 1:
        block_m = max(16, group_p2)
        part_acc = torch.empty((num_seqs, num_heads, splits, head_dim), dtype=torch.float32,
                               device=query.device)
        part_m = torch.empty((num_seqs, num_heads, splits), dtype=torch.float32,
                             device=query.device)
        part_l = torch.empty_like(part_m)
        part_strides = dict(stride_ps=part_acc.stride(0), stride_ph=part_acc.stride(1),
                            stride_pp=part_acc.stride(2))
        split_kv_decode_kernel[(num_seqs, num_kv_heads, splits)](
            query, k_cache, v_cache, part_acc, part_m, part_l,
            query_start_loc, seq_lens, block_table,
            float(scale), float(k_scale), float(v_scale), splits,
            query.stride(0), query.stride(1),
            **common, **part_strides,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
            TILE_N=tile_n, DOT_PRECISION=precision,
            num_warps=cfg.num_warps or 4, num_stages=num_stages,
        )
        merge_splits_kernel[(num_seqs, num_heads)](
            part_acc, part_m, part_l, out, query_start_loc, splits,
            **part_strides, stride_ot=out.stride(0), stride_oh=out.stride(1),
            HEAD_DIM=head_dim, SPLITS_P2=next_power_of_2(splits), num_warps=4,
        )
        return out

    if cfg.block_m is not None:
        block_m = max(cfg.block_m, group_p2, 16)
    else:
        # Decodes waste every row but one token's heads, so keep their tile minimal.
        block_m = max(16, group_p2) if max_query_len <= 1 else max(64, group_p2)
    block_q = block_m // group_p2
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    unified_attention_kernel[grid](
        query, k_cache, v_cache, out,
        query_start_loc, seq_lens, block_table,
        float(scale), float(k_scale), float(v_scale), num_seqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        **common,
        GROUP=group, GROUP_P2=group_p2, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n, DOT_PRECISION=precision,
        num_warps=cfg.num_warps or 4, num_stages=num_stages,
    )
    return out
