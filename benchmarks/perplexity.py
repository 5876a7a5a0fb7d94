"""Held-out perplexity and next-token top-1 accuracy of a checkpoint, through the engine's
prompt_logprobs, and (with --compare hf) HF transformers' figures on the same windows.

    python benchmarks/perplexity.py --model DIR [--engine-arg KEY=JSON ...] [--windows N]
        [--window-len L] [--compare hf]

The windows come from the held-out split of the running Python's standard library
(``pagedserve.devtools.stdlib_corpus``): its files in sorted order, each tokenized without
special tokens, joined by EOS into one stream, cut into consecutive windows of L-1 tokens, of
which N evenly spaced ones are kept; each window is prefixed with BOS (when the tokenizer has
one). Every corpus token of a window is scored given the tokens before it in the window:
perplexity is exp of the mean negative logprob over those positions, top-1 accuracy the share
whose true token has rank 1. The engine gets each window as a prompt with
``prompt_logprobs=0, max_tokens=1``.

With --compare hf the engine runs in float32 unless an --engine-arg sets its dtype, HF runs in
float32, and both are held to fp32 noise: every position's logprob within ATOL + RTOL * |lp|
of HF's, and a top-1 verdict may differ only where HF's best token and the true one are within
ATOL of each other (a near-tie). The command exits 1 when a float32 engine misses that; an
engine in another dtype has its difference reported, not judged.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

ATOL = 1e-4  # nats
RTOL = 1e-5


@dataclass
class Scores:
    """Per scored position (windows in order): the true token's logprob and whether it ranks
    first. HF's scores also hold the gap between its best logprob and the true token's."""

    logprobs: np.ndarray  # float64
    top1: np.ndarray  # bool
    gap_to_best: Optional[np.ndarray] = None

    @property
    def perplexity(self) -> float:
        return math.exp(-float(self.logprobs.mean()))

    @property
    def accuracy(self) -> float:
        return float(self.top1.mean())


def parse_engine_args(items: list[str]) -> dict[str, Any]:
    """``KEY=JSON`` items (as benchmarks/serving.py takes them); a value that is not JSON is
    taken as a string, so ``dtype=float32`` works as well as ``dtype='"float32"'``."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-arg takes KEY=JSON, got {item!r}")
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return args


def heldout_windows(tokenizer: Any, num_windows: int, window_len: int) -> tuple[list, dict]:
    """The benchmark's windows (token id lists of ``window_len``) and what they came from."""
    from pagedserve.devtools.stdlib_corpus import source_files

    files = source_files("heldout")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    # One batched call: the fast tokenizer encodes the files in parallel.
    for ids in tokenizer([f.text for f in files], add_special_tokens=False).input_ids:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    body = window_len - len(bos)
    available = len(stream) // body
    if available < num_windows:
        raise SystemExit(f"the held-out split has {len(stream)} tokens: {available} windows of "
                         f"{body}, fewer than --windows {num_windows}")
    picks = [i * available // num_windows for i in range(num_windows)]
    windows = [bos + stream[i * body:(i + 1) * body] for i in picks]
    info = {"python": platform.python_version(), "files": len(files), "tokens": len(stream),
            "bos": bool(bos)}
    return windows, info


def engine_scores(
    model: str, engine_args: dict[str, Any], windows: list[list[int]]
) -> tuple[Scores, float]:
    """The engine's prompt logprobs of every window; also the time it took (seconds)."""
    from pagedserve import LLM, SamplingParams

    llm = LLM(model, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    logprobs, top1 = [], []
    for window, out in zip(windows, outputs):
        for position in range(1, len(window)):
            entry = out.prompt_logprobs[position][window[position]]
            logprobs.append(entry.logprob)
            top1.append(entry.rank == 1)
    return Scores(np.array(logprobs, dtype=np.float64), np.array(top1)), elapsed


def hf_scores(model: str, windows: list[list[int]], batch_size: int) -> Scores:
    """HF transformers' fp32 log-softmax of the same windows, a batch at a time."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device).eval()
    logprobs, top1, gaps = [], [], []
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[start:start + batch_size], device=device)
            lp = hf(input_ids=ids).logits[:, :-1].float().log_softmax(dim=-1)
            target = ids[:, 1:]
            chosen = lp.gather(-1, target[..., None])[..., 0]
            best = lp.max(dim=-1).values
            logprobs.append(chosen.flatten().double().cpu())
            top1.append(((lp > chosen[..., None]).sum(dim=-1) == 0).flatten().cpu())
            gaps.append((best - chosen).flatten().double().cpu())
    return Scores(torch.cat(logprobs).numpy(), torch.cat(top1).numpy(),
                  torch.cat(gaps).numpy())


def disagreements(engine: Scores, hf: Scores) -> dict[str, int]:
    """Positions where the engine and HF differ by more than fp32 noise (see the module doc)."""
    off = np.abs(engine.logprobs - hf.logprobs) > ATOL + RTOL * np.abs(hf.logprobs)
    flipped = (engine.top1 != hf.top1) & (hf.gap_to_best >= ATOL)
    return {"logprob": int(off.sum()), "top1": int(flipped.sum())}


def _line(name: str, s: Scores) -> str:
    return (f"{name:<7} perplexity {s.perplexity:.6g}  top-1 accuracy {100 * s.accuracy:.2f}%  "
            f"mean NLL {-float(s.logprobs.mean()):.5f} nats")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=JSON",
                        help="extra LLM() argument, e.g. --engine-arg max_num_batched_tokens=512")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows (default 64)")
    parser.add_argument("--window-len", type=int, default=None,
                        help="tokens per window, BOS included (default: 512, or less where the "
                             "model's context is shorter)")
    parser.add_argument("--compare", choices=["hf"], default=None)
    parser.add_argument("--hf-batch-size", type=int, default=8)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    from pagedserve.tokenizer.tokenizer import load_tokenizer

    engine_args = parse_engine_args(args.engine_arg)
    if args.compare == "hf":
        engine_args.setdefault("dtype", "float32")
    context = AutoConfig.from_pretrained(args.model).max_position_embeddings
    window_len = args.window_len or min(512, context - 1)
    if not 2 <= window_len < context:
        raise SystemExit(f"--window-len must be in [2, {context - 1}] (the model's context "
                         f"{context} holds the window and the one token generated)")
    tokenizer = load_tokenizer(engine_args.get("tokenizer", args.model))
    windows, info = heldout_windows(tokenizer, args.windows, window_len)
    positions = len(windows) * (window_len - 1)
    print(f"model {args.model}, engine arguments {engine_args}")
    print(f"{len(windows)} windows of {window_len} tokens ({'BOS + ' if info['bos'] else ''}"
          f"corpus) from the held-out split (Python {info['python']} stdlib: {info['files']} "
          f"files, {info['tokens']} tokens); {positions} positions scored")
    engine, seconds = engine_scores(args.model, engine_args, windows)
    print(f"{_line('engine', engine)}  ({positions / seconds:.0f} tokens/s)")
    result: dict[str, Any] = {
        "windows": len(windows), "window_len": window_len, "positions": positions,
        "engine": {"perplexity": engine.perplexity, "top1_accuracy": engine.accuracy},
    }
    status = 0
    if args.compare == "hf":
        hf = hf_scores(args.model, windows, args.hf_batch_size)
        print(_line("hf", hf))
        diff = np.abs(engine.logprobs - hf.logprobs)
        print(f"engine - hf: perplexity {engine.perplexity - hf.perplexity:+.2e} "
              f"({engine.perplexity / hf.perplexity - 1:+.2e} relative), top-1 accuracy "
              f"{100 * (engine.accuracy - hf.accuracy):+.3f} points; per-position |logprob "
              f"difference| max {diff.max():.2e}, mean {diff.mean():.2e}")
        off = disagreements(engine, hf)
        judged = engine_args["dtype"] == "float32"
        verdict = ("agree within fp32 noise" if not any(off.values()) else
                   f"DISAGREE: {off['logprob']} logprobs beyond {ATOL:g} + {RTOL:g}*|lp|, "
                   f"{off['top1']} top-1 verdicts away from a near-tie")
        print(f"{verdict} (tolerance: |difference| <= {ATOL:g} + {RTOL:g}*|logprob| per "
              f"position; top-1 may differ only where HF's best is within {ATOL:g})"
              + ("" if judged else f"; engine dtype {engine_args['dtype']}: reported, not "
                                   "judged"))
        result["hf"] = {"perplexity": hf.perplexity, "top1_accuracy": hf.accuracy}
        result["disagreements"] = off
        if judged and any(off.values()):
            status = 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
