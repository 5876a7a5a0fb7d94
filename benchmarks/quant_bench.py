"""Decode throughput of quantized checkpoints on the CPU, side by side:

    python benchmarks/quant_bench.py [--preset cpu-small] [--batch 1 16] [--tokens 64] [--threads N]

The preset's checkpoint runs dense in float32 and bfloat16, and quantized W8A16 (compressed-
tensors pack-quantized, 8 bit channel-wise) and W4A16 (GPTQ, 4 bit, group 128), in bfloat16
activations, which torch's CPU weight-only kernels are vectorized for; W8A8 (compressed-tensors
int-quantized, int8 channel-wise weights, dynamic per-token int8 activations: torch._int_mm) and
online FP8 (``quantization="fp8"``: the CPU fp8 kernel reads the weights' bytes) in float32.
Decode tok/s = batch * (tokens - 1) / (time of ``tokens`` tokens - time of 1 token), best of
``--repeats`` interleaved rounds (the machine may be shared).
"""

from __future__ import annotations

import argparse
import pathlib
import time
from typing import Any

import torch

from pagedserve import LLM, SamplingParams
from pagedserve.devtools.quantized_model import write_quantized
from pagedserve.devtools.workload import model_dir

W8A16 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
         "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                       "weights": {"num_bits": 8, "type": "int",
                                                   "symmetric": True, "strategy": "channel"}}}}
W8A8 = {"quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                  "strategy": "token", "dynamic": True}}}}
W4A16 = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
         "checkpoint_format": "gptq"}


def quantized_checkpoints(base: pathlib.Path) -> dict[str, pathlib.Path]:
    """W8A16, W4A16 and W8A8 versions of ``base``, built once next to it."""
    out = {}
    for name, fmt, config, bits, group in (
        ("w8a16", "pack_quantized", W8A16, 8, -1), ("w4a16", "gptq", W4A16, 4, 128),
        ("w8a8", "int_quantized", W8A8, 8, -1),
    ):
        path = base.parent / f"{base.name}-{name}"
        if not (path / "config.json").is_file():
            write_quantized(base, path, base.parent / f"{base.name}-{name}-twin", fmt, config,
                            bits=bits, group_size=group, sym=True)
        out[name] = path
    return out


def decode_rate(llm: LLM, batch: int, tokens: int, prompt_len: int = 32) -> float:
    prompts = [{"prompt_token_ids": [4 + (i * 7 + j) % 1000 for j in range(prompt_len)]}
               for i in range(batch)]

    def run(max_tokens: int) -> float:
        llm.reset_prefix_cache()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    return batch * (tokens - 1) / max(run(tokens) - run(1), 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = model_dir(args.preset)
    quantized = quantized_checkpoints(base)
    configs: dict[str, tuple[pathlib.Path, str, dict[str, Any]]] = {
        "fp32": (base, "float32", {}), "bf16": (base, "bfloat16", {}),
        "w8a16": (quantized["w8a16"], "bfloat16", {}),
        "w4a16": (quantized["w4a16"], "bfloat16", {}),
        "w8a8": (quantized["w8a8"], "float32", {}),
        "fp8": (base, "float32", {"quantization": "fp8"}),
    }
    engines: dict[str, Any] = {
        name: LLM(str(path), dtype=dtype, kv_cache_memory_bytes=256 << 20,
                  max_num_seqs=max(args.batch), **extra)
        for name, (path, dtype, extra) in configs.items()
    }
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.repeats):
        for batch in args.batch:
            for name, llm in engines.items():
                rate = decode_rate(llm, batch, args.tokens)
                best[name, batch] = max(best.get((name, batch), 0.0), rate)
    print(f"decode tok/s, {args.preset}, {args.tokens} tokens, best of {args.repeats}")
    print(f"{'batch':>5} " + " ".join(f"{n:>14}" for n in engines))
    for batch in args.batch:
        fp32 = best["fp32", batch]
        cells = [f"{best[n, batch]:7.1f} ({best[n, batch] / fp32:4.2f}x)" for n in engines]
        print(f"{batch:>5} " + " ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()
