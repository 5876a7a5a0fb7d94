"""Decode-attention bandwidth of the Triton kernels on one CUDA GPU, plus the other kernels vs
their torch references.

    python benchmarks/attention_bench.py [--json PATH] [--sweep]

Attention: batch {1, 8, 32} x context {4096, 16384}, head_dim 128, 32 query / 8 KV heads, bf16,
block_size 16, random (non-contiguous) block tables. Achieved bandwidth counts the K+V bytes
read; it is compared with a measured device-to-device copy (read + write bytes). Times are
medians of ``triton.testing.do_bench`` (L2 flushed between runs); the ``graph`` column replays the
call in a CUDA graph (how the engine runs decodes), which removes the host launch overhead.
``--sweep`` also times a few launch configurations of the split-KV path at 16k context.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

import torch

BATCHES = (1, 8, 32)
CONTEXTS = (4096, 16384)
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16


def _bench(fn: Callable[[], Any]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _bench_graph(fn: Callable[[], Any]) -> float:
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))
    except Exception as e:  # a capture failure should not cost the rest of the table
        print(f"  (cuda graph timing failed: {type(e).__name__}: {e})", file=sys.stderr)
        return float("nan")


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def _decode_problem(batch: int, ctx: int) -> dict[str, Any]:
    blocks_per_seq = ctx // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE,
                           device="cuda")
    perm = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
    return dict(
        query=torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda"),
        kv_cache=kv_cache,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device="cuda"),
        block_table=perm.view(batch, blocks_per_seq).contiguous(),
        scale=HEAD_DIM ** -0.5, max_query_len=1, max_seq_len=ctx,
    )


def bench_attention(copy_gbps: float, sweep: bool) -> list[dict[str, Any]]:
    from pagedserve_kernels.attention import AttentionConfig, _pick_splits
    from pagedserve_kernels.ops import unified_attention

    rows = []
    print(f"\n{'batch':>5} {'ctx':>6} {'path':>12} {'splits':>6} {'ms':>8} {'GB/s':>7} "
          f"{'%copy':>6} {'graph ms':>9} {'graph %':>7}")
    for ctx in CONTEXTS:
        for batch in BATCHES:
            p = _decode_problem(batch, ctx)
            out = torch.empty_like(p["query"])
            kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * p["kv_cache"].element_size()
            auto_splits = _pick_splits(AttentionConfig(), batch, NUM_KV_HEADS, ctx, 1,
                                       torch.device("cuda"))
            variants = [("auto", AttentionConfig())]
            if auto_splits > 1:
                variants.append(("unified", AttentionConfig(num_splits=1)))
            for name, cfg in variants:
                def fn(p=p, cfg=cfg, out=out):
                    return unified_attention(**p, out=out, config=cfg)

                fn()
                ms = _bench(fn)
                graph_ms = _bench_graph(fn)
                splits = auto_splits if name == "auto" else 1
                gbps = kv_bytes / (ms * 1e-3) / 1e9
                graph_gbps = kv_bytes / (graph_ms * 1e-3) / 1e9
                row = dict(batch=batch, context=ctx, path=name, num_splits=splits, ms=ms,
                           gbps=gbps, pct_of_copy=100 * gbps / copy_gbps, graph_ms=graph_ms,
                           graph_pct_of_copy=100 * graph_gbps / copy_gbps, kv_bytes=kv_bytes)
                rows.append(row)
                print(f"{batch:>5} {ctx:>6} {name:>12} {splits:>6} {ms:>8.4f} {gbps:>7.0f} "
                      f"{row['pct_of_copy']:>5.1f}% {graph_ms:>9.4f} "
                      f"{row['graph_pct_of_copy']:>6.1f}%", flush=True)
            if sweep and ctx == 16384 and batch in (1, 8):
                rows += _sweep(p, out, kv_bytes, copy_gbps)
            del p
            torch.cuda.empty_cache()
    return rows


def _sweep(p: dict[str, Any], out: torch.Tensor, kv_bytes: int,
           copy_gbps: float) -> list[dict[str, Any]]:
    from pagedserve_kernels.attention import AttentionConfig
    from pagedserve_kernels.ops import unified_attention

    configs = [AttentionConfig(tile_n=t, num_warps=w, num_stages=s, min_split_len=m)
               for t, w, s in ((32, 4, 3), (64, 4, 2), (64, 4, 4), (64, 8, 3), (128, 4, 2),
                               (128, 8, 3))
               for m in (512,)]
    configs += [AttentionConfig(min_split_len=m) for m in (256, 1024, 2048)]
    rows = []
    for cfg in configs:
        def fn(cfg=cfg):
            return unified_attention(**p, out=out, config=cfg)

        try:
            fn()
            ms = _bench(fn)
        except Exception as e:  # e.g. out of shared memory for a big tile
            print(f"  sweep {cfg}: failed ({type(e).__name__})")
            continue
        gbps = kv_bytes / (ms * 1e-3) / 1e9
        print(f"  sweep tile_n={cfg.tile_n} warps={cfg.num_warps} stages={cfg.num_stages} "
              f"min_split_len={cfg.min_split_len}: {ms:.4f} ms {100 * gbps / copy_gbps:.1f}%")
        rows.append(dict(batch=p["query"].shape[0], context=p["max_seq_len"], path="sweep",
                         config=repr(cfg), ms=ms, gbps=gbps, pct_of_copy=100 * gbps / copy_gbps))
    return rows


def bench_other_kernels() -> list[dict[str, Any]]:
    from pagedserve.layers.rotary import build_cos_sin_cache, rope_inv_freq
    from pagedserve_kernels import ops
    from pagedserve_kernels import reference as ref

    t, hidden, inter = 4096, 4096, 14336
    x = torch.randn(t, hidden, dtype=DTYPE, device="cuda")
    res = torch.randn_like(x)
    w = torch.randn(hidden, dtype=DTYPE, device="cuda")
    gate_up = torch.randn(t, 2 * inter, dtype=DTYPE, device="cuda")
    q = torch.randn(t, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    k = torch.randn(t, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    cache = build_cos_sin_cache(rope_inv_freq(HEAD_DIM, 500000.0), 8192).cuda()
    pos = torch.randint(0, 8192, (t,), device="cuda")
    kv_cache = torch.zeros(2, t // BLOCK_SIZE + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                           dtype=DTYPE, device="cuda")
    slots = torch.randperm(t, device="cuda")
    cases = [
        ("rms_norm", lambda: ops.rms_norm(x, w, 1e-6), lambda: ref.rms_norm(x, w, 1e-6)),
        ("fused_add_rms_norm", lambda: ops.fused_add_rms_norm(x, res, w, 1e-6),
         lambda: ref.fused_add_rms_norm(x, res, w, 1e-6)),
        ("silu_and_mul", lambda: ops.silu_and_mul(gate_up), lambda: ref.silu_and_mul(gate_up)),
        ("rotary_embedding", lambda: ops.rotary_embedding(pos, q, k, cache),
         lambda: ref.rotary_embedding(pos, q, k, cache)),
        ("reshape_and_cache", lambda: ops.reshape_and_cache(k, k, kv_cache, slots),
         lambda: ref.reshape_and_cache(k, k, kv_cache, slots)),
    ]
    rows = []
    print(f"\n{'kernel (4096 tokens, bf16)':<28} {'triton ms':>10} {'torch ms':>10} {'speedup':>8}")
    for name, kern, torch_ref in cases:
        kern()
        k_ms, r_ms = _bench(kern), _bench(torch_ref)
        rows.append(dict(kernel=name, triton_ms=k_ms, torch_ms=r_ms, speedup=r_ms / k_ms))
        print(f"{name:<28} {k_ms:>10.4f} {r_ms:>10.4f} {r_ms / k_ms:>7.2f}x", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--sweep", action="store_true",
                        help="time a few split-KV launch configurations (adds ~30 s)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.time()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth()
    print(f"device: {name}; measured copy bandwidth {copy_gbps:.0f} GB/s (read + write)")
    attention = bench_attention(copy_gbps, args.sweep)
    kernels = bench_other_kernels()
    best16k = max((r["pct_of_copy"] for r in attention
                   if r["context"] == 16384 and r["path"] == "auto"), default=0.0)
    print(f"\nbest 16k-context decode (auto path): {best16k:.1f}% of copy bandwidth "
          f"(target >= 60%); total {time.time() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, copy_gbps=copy_gbps, attention=attention,
                           kernels=kernels, torch=torch.__version__), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
