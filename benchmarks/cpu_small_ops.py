"""The CPU's small per-layer ops, C++ (``pagedserve_kernels.cpu_ops``) against their torch
references, microseconds per call at a few token counts, as a Markdown table.

    python benchmarks/cpu_small_ops.py [--model DIR] [--tokens 1 4 64] [--dtype float32]
        [--threads N] [--calls N]

Shapes come from ``--model``'s config.json (default: the shipped draft model, whose one-token
steps these ops dominate). Inputs are laid out as the layers get them: query, key and value
are views of one fused QKV projection, the key/value write goes to a paged cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path
from typing import Callable

import torch

from pagedserve.layers.rotary import RotaryEmbedding
from pagedserve_kernels import cpu_ops
from pagedserve_kernels import reference as ref

DRAFT = Path(__file__).resolve().parent.parent / "model_repository" / "llm" / "1" / "draft_model"


def cases(config: dict, tokens: int, dtype: torch.dtype) -> dict[str, Callable]:
    """One call of each op on fresh inputs of the model's shapes; each takes the ops module."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    x, residual = torch.randn(tokens, hidden, dtype=dtype), torch.randn(tokens, hidden, dtype=dtype)
    weight = torch.randn(hidden, dtype=dtype)
    gate_up = torch.randn(tokens, 2 * inter, dtype=dtype)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    cos_sin = RotaryEmbedding(head_dim, 4096, 10000.0).cos_sin_cache
    positions = torch.randint(0, 4096, (tokens,))
    kv_cache = torch.zeros(2, 256, 16, kv_heads, head_dim, dtype=dtype)
    slots = torch.randperm(256 * 16)[:tokens]
    return {
        "rms_norm": lambda m: m.rms_norm(x, weight, 1e-5),
        "fused_add_rms_norm": lambda m: m.fused_add_rms_norm(x, residual, weight, 1e-5),
        "rotary_embedding": lambda m: m.rotary_embedding(positions, q, k, cos_sin),
        "silu_and_mul": lambda m: m.silu_and_mul(gate_up),
        "reshape_and_cache": lambda m: m.reshape_and_cache(k, v, kv_cache, slots, True),
    }


def per_call_us(call: Callable, ops: object, calls: int) -> float:
    call(ops)
    return min(timeit.repeat(lambda: call(ops), number=calls, repeat=5)) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DRAFT)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 64])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    if cpu_ops.load() is None:
        print("the CPU small ops cannot be built here", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    config = json.loads((args.model / "config.json").read_text())
    dtype = getattr(torch, args.dtype)
    print(f"{args.model.name}, {args.dtype}, {args.threads} thread(s): us per call\n")
    print("| op | tokens | reference | C++ | speedup |")
    print("|---|---:|---:|---:|---:|")
    with torch.inference_mode():
        for tokens in args.tokens:
            for name, call in cases(config, tokens, dtype).items():
                before = per_call_us(call, ref, args.calls)
                after = per_call_us(call, cpu_ops, args.calls)
                print(f"| {name} | {tokens} | {before:.1f} | {after:.1f} | "
                      f"{before / after:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
