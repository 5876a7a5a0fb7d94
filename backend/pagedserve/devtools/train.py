"""Trains the default model pair on the CPU: a byte-level BPE tokenizer, a Llama target and a
draft with at most 1/8 of its FLOPs per token, distilled from it, on the Python standard
library's sources (`stdlib_corpus`)::

    python -m pagedserve.devtools.train                  # the committed pair (about an hour)
    python -m pagedserve.devtools.train --quick --target-out /tmp/t --draft-out /tmp/d
    python -m pagedserve.devtools.train --skip-target    # the draft again, from the target
    python -m pagedserve.devtools.train --bench target target-l8   # tokens/s of some shapes

It prints tokens/s, the loss curve and the held-out figures, and writes each model as a
checkpoint with its README (`train_checkpoint`). Seeded: the data order and the
initialization are the same on every run; the CPU kernels may still round differently.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import platform
import random
import shlex
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from pagedserve.devtools import stdlib_corpus
from pagedserve.devtools.train_data import batches, encode_files, pack
from pagedserve.devtools.train_shapes import SHAPES, ModelShape

# backend/pagedserve/devtools/train.py -> the repository root.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
MODEL_DIR = REPO_ROOT / "model_repository" / "llm" / "1"


@dataclass(frozen=True)
class TrainConfig:
    """Every choice of a training run, validated here."""

    target_out: pathlib.Path = MODEL_DIR / "default_model"
    draft_out: pathlib.Path = MODEL_DIR / "draft_model"
    target_shape: str = "target"
    draft_shape: str = "draft"
    vocab_size: int = 4096
    context: int = 512
    batch_size: int = 16
    target_tokens: int = 20_000_000
    draft_tokens: int = 20_000_000
    target_lr: float = 2e-3
    draft_lr: float = 3e-3
    warmup_fraction: float = 0.03
    distill_weight: float = 1.0
    eval_windows: int = 200
    curve_eval_windows: int = 64
    log_every: int = 50
    eval_every: int = 250
    seed: int = 0
    threads: int = 1
    bf16: bool = True
    compile: bool = True
    skip_target: bool = False
    # --quick: this many training files and a tenth as many held-out files (all when None).
    max_train_files: Optional[int] = None
    command: str = "python -m pagedserve.devtools.train"

    def __post_init__(self) -> None:
        for name in ("target_shape", "draft_shape"):
            if getattr(self, name) not in SHAPES:
                raise ValueError(f"{name} must be one of {sorted(SHAPES)}, got "
                                 f"{getattr(self, name)!r}")
        if not 300 <= self.vocab_size <= 65536:
            raise ValueError(f"vocab_size must be in [300, 65536], got {self.vocab_size}")
        for name in ("context", "batch_size", "target_tokens", "draft_tokens", "eval_windows",
                     "curve_eval_windows", "log_every", "eval_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("target_lr", "draft_lr"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        for name in ("warmup_fraction", "distill_weight"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_train_files is not None and self.max_train_files < 10:
            raise ValueError(f"max_train_files must be >= 10, got {self.max_train_files}")
        target, draft = self.shape("target"), self.shape("draft")
        for position in (self.context // 2 - 1, self.context - 1):
            ratio = (draft.flops_per_token(self.vocab_size, position)
                     / target.flops_per_token(self.vocab_size, position))
            if ratio > 1 / 8:
                raise ValueError(f"draft_shape {self.draft_shape!r} costs {ratio:.3f} of the "
                                 f"target's FLOPs per token at position {position}; at most "
                                 "1/8 is allowed")

    def shape(self, which: str) -> ModelShape:
        return SHAPES[self.target_shape if which == "target" else self.draft_shape]

    def steps(self, tokens: int) -> int:
        return math.ceil(tokens / (self.batch_size * self.context))


QUICK = dict(
    target_shape="quick-target", draft_shape="quick-draft", vocab_size=512, context=64,
    batch_size=8, target_tokens=100_000, draft_tokens=40_000, target_lr=1e-2, draft_lr=1e-2,
    eval_windows=16, curve_eval_windows=8, log_every=20, eval_every=40, compile=False,
    max_train_files=60, threads=1,
)


@dataclass
class ModelReport:
    """One trained model's run (`LoopResult`) and final held-out figures (`EvalResult`)."""

    loop: Any
    heldout: Any


@dataclass
class RunReport:
    """What `run` trained, for the caller (and the test)."""

    vocab_size: int
    target: Optional[ModelReport] = None
    draft: Optional[ModelReport] = None
    corpus: Dict[str, Any] = field(default_factory=dict)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _subset(files: List[Any], count: Optional[int]) -> List[Any]:
    if count is None or count >= len(files):
        return files
    return files[:: len(files) // count][:count]


def _corpus(config: TrainConfig):
    train = _subset(stdlib_corpus.source_files("train"), config.max_train_files)
    heldout_count = None if config.max_train_files is None else config.max_train_files // 10
    heldout = _subset(stdlib_corpus.source_files("heldout"), heldout_count)
    described = {
        "python": platform.python_version(),
        "train": {"files": len(train), "chars": sum(len(f.text) for f in train)},
        "heldout": {"files": len(heldout), "chars": sum(len(f.text) for f in heldout)},
    }
    return train, heldout, described


def _new_model(shape: ModelShape, config: TrainConfig, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    from pagedserve.devtools.tokenizers_builder import BOS, EOS, PAD, SPECIAL_TOKENS
    from pagedserve.devtools.train_shapes import llama_config

    ids = {"bos": SPECIAL_TOKENS.index(BOS), "eos": SPECIAL_TOKENS.index(EOS),
           "pad": SPECIAL_TOKENS.index(PAD)}
    torch.manual_seed(seed)
    hf_config = llama_config(shape, config.vocab_size, config.context, ids)
    return LlamaForCausalLM(hf_config).float()


def _settings(config: TrainConfig, tokens: int, lr: float, distill_weight: float):
    from pagedserve.devtools.train_loop import LoopSettings

    steps = config.steps(tokens)
    return LoopSettings(
        num_steps=steps, lr=lr, warmup_steps=max(1, round(steps * config.warmup_fraction)),
        log_every=config.log_every, eval_every=config.eval_every, bf16=config.bf16,
        compile=config.compile, distill_weight=distill_weight,
    )


def run(config: TrainConfig) -> RunReport:
    """Trains the tokenizer (unless `skip_target`), the target and the draft, and writes them."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from pagedserve.devtools.tokenizers_builder import (
        BOS,
        EOS,
        SPECIAL_TOKENS,
        train_byte_level_bpe,
        wrap_fast_tokenizer,
    )
    from pagedserve.devtools.train_checkpoint import ModelCard, save_checkpoint
    from pagedserve.devtools.train_loop import evaluate, fp16_round_trip, train

    torch.set_num_threads(config.threads)
    _seed_everything(config.seed)
    train_files, heldout_files, corpus = _corpus(config)
    _log(f"corpus: Python {corpus['python']}, train {corpus['train']}, "
         f"heldout {corpus['heldout']}")
    start = time.monotonic()
    if config.skip_target:
        tokenizer = Tokenizer.from_file(str(config.target_out / "tokenizer.json"))
    else:
        tokenizer = train_byte_level_bpe((f.text for f in train_files), config.vocab_size)
    vocab = tokenizer.get_vocab_size()
    if vocab != config.vocab_size:
        raise ValueError(f"the tokenizer has {vocab} tokens, not vocab_size {config.vocab_size}")
    hf_tokenizer = wrap_fast_tokenizer(tokenizer)
    bos, eos = SPECIAL_TOKENS.index(BOS), SPECIAL_TOKENS.index(EOS)
    train_windows = pack(encode_files(tokenizer, [f.text for f in train_files], bos, eos),
                         config.context, shuffle_seed=config.seed)
    heldout_windows = pack(encode_files(tokenizer, [f.text for f in heldout_files], bos, eos),
                           config.context)
    _log(f"tokenizer: {vocab} tokens; train {train_windows.num_tokens:,} tokens "
         f"({corpus['train']['chars'] / train_windows.num_tokens:.2f} chars/token, "
         f"{len(train_windows.windows):,} windows of {config.context}); heldout "
         f"{heldout_windows.num_tokens:,} tokens ({time.monotonic() - start:.0f} s)")
    eval_set = heldout_windows.evenly_spaced(config.eval_windows)
    curve_set = heldout_windows.evenly_spaced(config.curve_eval_windows)
    report = RunReport(vocab_size=vocab, corpus=corpus)

    def card(title: str, role: str, which: str, loop: Any, heldout: Any,
             extra: Optional[List[str]] = None) -> ModelCard:
        return ModelCard(title=title, role=role, shape=config.shape(which), vocab_size=vocab,
                         context=config.context, corpus=corpus, command=config.command,
                         loop=loop, heldout=heldout, heldout_windows=len(eval_set),
                         curve_windows=len(curve_set), threads=config.threads,
                         extra_lines=extra)

    if config.skip_target:
        target = AutoModelForCausalLM.from_pretrained(config.target_out, dtype=torch.float32)
        target_eval = evaluate(target, eval_set)
        _log(f"target (loaded): heldout loss {target_eval.loss:.3f}, "
             f"top-1 {100 * target_eval.top1:.1f}%")
    else:
        target = _new_model(config.shape("target"), config, config.seed)
        settings = _settings(config, config.target_tokens, config.target_lr, 0.0)
        _log(f"target: {config.shape('target').describe()}, "
             f"{config.shape('target').params(vocab):,} parameters; {settings.num_steps} steps "
             f"of {config.batch_size} x {config.context} tokens")
        loop = train(target, batches(train_windows.windows, config.batch_size, config.seed,
                                     settings.num_steps),
                     settings, heldout=curve_set, log=_log)
        target_eval = evaluate(fp16_round_trip(target), eval_set)
        _log(f"target: {loop.tokens:,} tokens in {loop.seconds:.0f} s "
             f"({loop.tokens_per_s:,.0f} tok/s); heldout loss {target_eval.loss:.3f}, "
             f"perplexity {target_eval.perplexity:.2f}, top-1 {100 * target_eval.top1:.1f}%")
        save_checkpoint(target, hf_tokenizer, config.target_out, card(
            "pagedserve default model (target)",
            "A small Python-code model trained from scratch for pagedserve's demo and "
            "benchmarks; its draft (for speculative decoding) is `../draft_model`.",
            "target", loop, target_eval))
        report.target = ModelReport(loop, target_eval)

    draft = _new_model(config.shape("draft"), config, config.seed + 1)
    settings = _settings(config, config.draft_tokens, config.draft_lr, config.distill_weight)
    _log(f"draft: {config.shape('draft').describe()}, "
         f"{config.shape('draft').params(vocab):,} parameters; {settings.num_steps} steps, "
         f"distilled from the target (KL weight {config.distill_weight})")
    loop = train(draft, batches(train_windows.windows, config.batch_size, config.seed + 1,
                                settings.num_steps),
                 settings, heldout=curve_set, teacher=target, log=_log)
    draft_eval = evaluate(fp16_round_trip(draft), eval_set, reference=target_eval.predictions)
    _log(f"draft: {loop.tokens:,} tokens in {loop.seconds:.0f} s ({loop.tokens_per_s:,.0f} "
         f"tok/s); heldout loss {draft_eval.loss:.3f}, perplexity {draft_eval.perplexity:.2f}, "
         f"top-1 {100 * draft_eval.top1:.1f}%, greedy agreement with the target "
         f"{100 * draft_eval.agreement:.1f}%")
    mid = config.context // 2 - 1
    ratio = (config.shape("draft").flops_per_token(vocab, mid)
             / config.shape("target").flops_per_token(vocab, mid))
    save_checkpoint(draft, hf_tokenizer, config.draft_out, card(
        "pagedserve default draft model",
        "The draft of `../default_model` for speculative decoding: the same tokenizer, "
        f"{ratio:.3f} of its FLOPs per token, trained on the same data with a loss that is "
        f"{config.distill_weight:g} x KL(target || draft) + {1 - config.distill_weight:g} x "
        "cross-entropy.",
        "draft", loop, draft_eval,
        [f"target's held-out top-1 on the same windows: {100 * target_eval.top1:.1f}%"]))
    report.draft = ModelReport(loop, draft_eval)
    return report


def bench(config: TrainConfig, shapes: Sequence[str], steps: int) -> Dict[str, float]:
    """Training tokens/s of each shape over `steps` steps of random tokens (after two
    warm-up steps, which hold the compilation)."""
    import torch

    from pagedserve.devtools.train_loop import train

    torch.set_num_threads(config.threads)
    rates = {}
    for name in shapes:
        _seed_everything(config.seed)
        shape = SHAPES[name]
        model = _new_model(shape, config, config.seed)
        windows = np.random.default_rng(0).integers(
            4, config.vocab_size, (config.batch_size * 4, config.context + 1), dtype=np.uint16)
        settings = replace(_settings(config, 1, 1e-3, 0.0), num_steps=steps + 2, log_every=2,
                           eval_every=10**9)
        result = train(model, batches(windows, config.batch_size, 0, steps + 2), settings,
                       log=lambda _: None)
        rates[name] = result.tokens_per_s
        flops = shape.flops_per_token(config.vocab_size, config.context // 2 - 1)
        _log(f"{name}: {shape.describe()}; {shape.params(config.vocab_size):,} parameters, "
             f"{flops / 1e6:.2f} MFLOPs/token; {result.tokens_per_s:,.0f} tok/s -> "
             f"{config.target_tokens / result.tokens_per_s / 60:.0f} min for "
             f"{config.target_tokens / 1e6:.0f}M tokens")
    return rates


def _parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a minutes-long version: corpus subset, tiny models, few steps")
    parser.add_argument("--target-out", type=pathlib.Path, default=None,
                        help=f"default {defaults.target_out}")
    parser.add_argument("--draft-out", type=pathlib.Path, default=None,
                        help=f"default {defaults.draft_out}")
    parser.add_argument("--skip-target", action="store_true",
                        help="load the target (and its tokenizer) from --target-out, train "
                             "only the draft")
    parser.add_argument("--bench", nargs="+", choices=sorted(SHAPES), default=None,
                        help="measure the training tokens/s of these shapes and exit")
    parser.add_argument("--bench-steps", type=int, default=8)
    for name in ("target_shape", "draft_shape"):
        parser.add_argument("--" + name.replace("_", "-"), choices=sorted(SHAPES), default=None)
    for name, kind in (("vocab_size", int), ("context", int), ("batch_size", int),
                       ("target_tokens", int), ("draft_tokens", int), ("target_lr", float),
                       ("draft_lr", float), ("distill_weight", float), ("eval_windows", int),
                       ("seed", int), ("threads", int)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"default {getattr(defaults, name)}")
    parser.add_argument("--no-bf16", action="store_true", help="train in fp32")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile")
    return parser


def config_from_args(argv: Optional[Sequence[str]] = None) -> tuple[TrainConfig, Any]:
    args = _parser().parse_args(argv)
    values: Dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in TrainConfig.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is not None and name not in ("bf16", "compile"):
            values[name] = value
    if args.no_bf16:
        values["bf16"] = False
    if args.no_compile:
        values["compile"] = False
    values["skip_target"] = args.skip_target
    command = ["python -m pagedserve.devtools.train", *map(shlex.quote, argv or [])]
    values["command"] = " ".join(command)
    return TrainConfig(**values), args


def main(argv: Optional[Sequence[str]] = None) -> RunReport | Dict[str, float]:
    import sys

    from pagedserve.layers.linear import onednn_bf16_supported

    argv = list(sys.argv[1:] if argv is None else argv)
    config, args = config_from_args(argv)
    if config.bf16 and not onednn_bf16_supported():
        _log("this CPU has no bf16 support: training in fp32")
        config = replace(config, bf16=False)
    if args.bench:
        return bench(config, args.bench, args.bench_steps)
    return run(config)


if __name__ == "__main__":
    main()
