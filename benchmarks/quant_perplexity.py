"""What quantization costs the trained default model: held-out perplexity and top-1 accuracy
through the engine (benchmarks/perplexity.py's windows and scoring) for the unquantized model
and each quantized variant, side by side, as a Markdown table.

    python benchmarks/quant_perplexity.py [--model DIR] [--windows N] [--variants NAME ...]

Weight-only variants are checkpoints written by ``pagedserve.devtools.quantized_model`` in the
producer's own format (GPTQ v1, AWQ GEMM) with round-to-nearest per group, not GPTQ's or AWQ's
calibrated algorithms: the figures are an upper bound on what those producers lose. The default
model's down_proj has K = 688, a multiple of neither 128 nor the CPU kernel's 32, so the g128
variants are written as AutoRound does it (its auto_gptq and auto_awq packings, with an
``extra_config`` giving each down_proj 8 bits per channel in the GPTQ layout, and leaving it
unquantized in the AWQ layout, which has no 8-bit form). FP8 is the
engine's online ``quantization: "fp8"``; FP8 KV is ``kv_cache_dtype: "fp8"`` with unit scales.
Every variant runs in float32 activations, so the difference is the quantization's alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perplexity import engine_scores, heldout_windows  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "model_repository" / "llm" / "1" / "default_model"


def _gptq(bits: int, group: int) -> dict[str, Any]:
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": True,
            "desc_act": False, "checkpoint_format": "gptq"}


def _g128(packing: str, num_layers: int) -> dict[str, Any]:
    """4-bit g128 in AutoRound's config, each down_proj (its K is 688) 8-bit per channel in the
    GPTQ layout, unquantized in the AWQ one."""
    sym = packing.endswith("gptq")
    override = {"bits": 8, "group_size": -1} if sym else {"bits": 16}
    down = {f"model.layers.{i}.mlp.down_proj": override for i in range(num_layers)}
    config = {"quant_method": "auto-round", "packing_format": packing, "bits": 4,
              "group_size": 128, "sym": sym, "data_type": "int", "extra_config": down}
    return dict(fmt="gptq" if sym else "awq", quantization_config=config, bits=4,
                group_size=128, sym=sym, with_g_idx=False,
                **(dict(overrides=down) if sym else dict(skip=("mlp.down_proj",))))


# name -> (checkpoint writer arguments, an AutoRound packing for _g128, or None for the model
# itself; engine arguments)
VARIANTS: dict[str, tuple[Any, dict[str, Any]]] = {
    "unquantized": (None, {}),
    "W8A16 (GPTQ 8-bit, per channel)": (
        dict(fmt="gptq", quantization_config=_gptq(8, -1), bits=8, group_size=-1, sym=True), {}),
    "W4A16 g128, GPTQ layout": ("auto_round:auto_gptq", {}),
    "W4A16 g128, AWQ layout": ("auto_round:auto_awq", {}),
    "FP8 (online, per-channel weights, per-token activations)": (None, {"quantization": "fp8"}),
    "FP8 KV cache": (None, {"kv_cache_dtype": "fp8"}),
    "FP8 + FP8 KV cache": (None, {"quantization": "fp8", "kv_cache_dtype": "fp8"}),
}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--window-len", type=int, default=511)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    from pagedserve.devtools.quantized_model import write_quantized
    from pagedserve.tokenizer.tokenizer import load_tokenizer

    windows, info = heldout_windows(load_tokenizer(str(args.model)), args.windows,
                                    args.window_len)
    positions = len(windows) * (args.window_len - 1)
    print(f"model {args.model}: {len(windows)} held-out windows of {args.window_len} tokens "
          f"(Python {info['python']} stdlib), {positions} positions; float32 activations")
    rows = []
    baseline = None
    with tempfile.TemporaryDirectory() as work:
        for name in args.variants:
            writer, engine_args = VARIANTS[name]
            model = args.model
            if isinstance(writer, str):
                writer = _g128(writer, AutoConfig.from_pretrained(args.model).num_hidden_layers)
            if writer is not None:
                model = Path(work) / f"q{len(rows)}"
                write_quantized(args.model, model, Path(work) / f"twin{len(rows)}", **writer)
            scores, seconds = engine_scores(str(model), {"dtype": "float32", **engine_args},
                                            windows)
            if baseline is None:
                baseline = scores
            rows.append((name, scores, positions / seconds))
            print(f"{name}: perplexity {scores.perplexity:.4f}, top-1 "
                  f"{100 * scores.accuracy:.2f}%", flush=True)
    print()
    print("| variant | perplexity | vs unquantized | top-1 next token |")
    print("| --- | ---: | ---: | ---: |")
    for name, scores, _ in rows:
        change = scores.perplexity / baseline.perplexity - 1
        print(f"| {name} | {scores.perplexity:.3f} | {100 * change:+.2f}% | "
              f"{100 * scores.accuracy:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
