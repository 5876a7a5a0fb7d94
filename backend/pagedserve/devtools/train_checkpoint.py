"""Writes a trained default model as a Hugging Face checkpoint with its README.

The weights are saved in float16: half the bytes of fp32, and more mantissa than bfloat16 for
weights this small. pagedserve's ``dtype: auto`` serves a float16 checkpoint in float32 on a
CPU (and in float16 on a GPU); transformers loads it as it is.
"""

from __future__ import annotations

import pathlib
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from pagedserve.devtools.tokenizers_builder import save_fast_tokenizer
from pagedserve.devtools.train_loop import EvalResult, LoopResult
from pagedserve.devtools.train_shapes import ModelShape


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint's README.md says about it."""

    title: str
    role: str  # one paragraph: what the model is for
    shape: ModelShape
    vocab_size: int
    context: int
    corpus: Dict[str, Any]  # stdlib_corpus.describe()
    command: str
    loop: LoopResult
    heldout: EvalResult
    heldout_windows: int
    curve_windows: int
    threads: int
    extra_lines: Optional[List[str]] = None


def save_checkpoint(model: Any, hf_tokenizer: Any, out: pathlib.Path, card: ModelCard) -> None:
    """Writes config.json, generation_config.json, model.safetensors (float16), the tokenizer
    files and README.md into `out`, replacing what was there only once all are written."""
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    model = model.to(torch.float16)
    model.config.dtype = torch.float16
    model.generation_config.bos_token_id = model.config.bos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(partial, safe_serialization=True)
    model.to(torch.float32)
    save_fast_tokenizer(hf_tokenizer, partial)
    (partial / "README.md").write_text(model_card_text(card))
    for path in partial.iterdir():
        # safetensors writes 0600 files; a server running as another user must read them.
        path.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def model_card_text(card: ModelCard) -> str:
    shape, corpus = card.shape, card.corpus
    mid = card.context // 2 - 1
    flops_mid = card.shape.flops_per_token(card.vocab_size, mid)
    flops_end = card.shape.flops_per_token(card.vocab_size, card.context - 1)
    train, heldout = corpus["train"], corpus["heldout"]
    lines = [
        f"# {card.title}",
        "",
        card.role,
        "",
        "## Architecture",
        "",
        f"`LlamaForCausalLM`: {shape.describe()}, vocabulary {card.vocab_size} (byte-level BPE), "
        f"context {card.context}, tied input embedding and LM head, RoPE (theta 10000), "
        "RMSNorm, SiLU-gated MLP. Weights in float16 (`model.safetensors`).",
        "",
        f"- parameters: {shape.params(card.vocab_size):,} "
        f"({shape.non_embedding_params():,} outside the embedding)",
        f"- forward FLOPs per token: {flops_mid / 1e6:.2f} M at position {mid} (the mean over a "
        f"full window), {flops_end / 1e6:.2f} M at position {card.context - 1}: "
        f"2 x {shape.non_embedding_params():,} layer weights + 2 x "
        f"{card.vocab_size * shape.hidden_size:,} LM-head weights + attention "
        f"(4 x keys x {shape.hidden_size} x {shape.num_layers} layers)",
        "",
        "## Training data",
        "",
        f"The `*.py` files of the CPython {corpus['python']} standard library "
        "(`pagedserve.devtools.stdlib_corpus`), which the Python Software Foundation License "
        "covers. Each file goes whole to one split by a hash of its path: "
        f"train {train['files']} files ({train['chars'] / 1e6:.1f} M characters), held-out "
        f"{heldout['files']} files ({heldout['chars'] / 1e6:.2f} M characters). Each file is "
        "`<s>` + its tokens + `</s>`; the files are concatenated in a seeded order and cut into "
        f"windows of {card.context} inputs (each window's labels are its inputs shifted by one "
        "token).",
        "",
        "## Training",
        "",
        "```bash",
        card.command,
        "```",
        "",
        f"- tokens seen: {card.loop.tokens / 1e6:.1f} M in {card.loop.seconds / 60:.1f} min of "
        f"wall time ({card.loop.tokens_per_s:,.0f} tokens/s after compilation), with "
        f"{card.threads} thread(s) on a 2-core CPU shared with other work, bf16 autocast",
    ]
    lines += [f"- {line}" for line in card.extra_lines or []]
    lines += [
        "",
        "## Held-out figures",
        "",
        f"Over {card.heldout_windows} windows spread evenly over the held-out files "
        f"({card.heldout.num_positions:,} predicted tokens), with these float16 weights "
        "computing in float32:",
        "",
        "| loss (nats/token) | perplexity | top-1 next-token accuracy |"
        + (" greedy agreement with the target |" if card.heldout.agreement is not None else ""),
        "| --- | --- | --- |" + (" --- |" if card.heldout.agreement is not None else ""),
        f"| {card.heldout.loss:.3f} | {card.heldout.perplexity:.2f} | "
        f"{100 * card.heldout.top1:.1f}% |"
        + (f" {100 * card.heldout.agreement:.1f}% |" if card.heldout.agreement is not None
           else ""),
        "",
        "Loss curve (train: mean cross-entropy since the previous line; held-out: "
        f"{card.curve_windows} windows):",
        "",
        "| step | tokens | train | held-out |",
        "| --- | --- | --- | --- |",
    ]
    for point in card.loop.curve:
        if point.heldout_loss is not None:
            lines.append(f"| {point.step} | {point.tokens / 1e6:.1f} M | "
                         f"{point.train_loss:.3f} | {point.heldout_loss:.3f} |")
    return "\n".join(lines) + "\n"
