"""Builds small random-weight Hugging Face checkpoints locally (no model hub).

`build_tiny_model` writes config.json, model.safetensors (or shards plus
model.safetensors.index.json) and the tokenizer files into one directory that
`AutoConfig` / `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load as they would a real
checkpoint. The CLI builds presets::

    python -m pagedserve.devtools.tiny_model OUT_DIR --arch llama --preset cpu-small
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any, Dict, Optional, Union

from pagedserve.devtools.tokenizers_builder import (
    BOS,
    EOS,
    PAD,
    TOKENIZER_KINDS,
    build_tokenizer,
    save_fast_tokenizer,
    wrap_fast_tokenizer,
)

ARCHITECTURES: Dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# Random weights with the usual std of 0.02 give nearly flat next-token distributions, so greedy
# decoding is full of near-ties and HF-parity tests would flake. A larger std (scaled with
# 1/sqrt(hidden_size), so each matmul keeps its gain at any width) plus a larger final-norm weight
# make the logits peaky. Measured on the tiny defaults (hidden 64), 10 x 8 prompts x 32 greedy
# tokens per arch: no top-2 logit gap below 1e-3 (min 1.2e-3) for llama/mistral/qwen2/qwen3,
# 27-30 distinct tokens per 32, mean chosen-token logprob about -0.3. (std 0.02: min 1e-4.)
DEFAULT_INITIALIZER_RANGE_AT_64 = 0.2
DEFAULT_FINAL_NORM_SCALE = 6.0

# Tokenizer vocab size used when neither vocab_size nor a preset says otherwise.
DEFAULT_TOKENIZER_VOCAB = 1024

PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": {},
    # Used by the CPU benchmarks.
    "cpu-small": dict(
        arch="llama",
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1408,
        vocab_size=8192,
        torch_dtype="float32",
    ),
    # A 1B-class Llama shape for the GPU benchmarks (random bf16 weights).
    "gpu-1b": dict(
        arch="llama",
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=32000,
        max_position_embeddings=4096,
        torch_dtype="bfloat16",
    ),
}

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _config_kwargs(arch: str, head_dim: int, overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Architecture-specific defaults that make the tiny configs look like real ones."""
    extra: Dict[str, Any] = {}
    if arch == "qwen2":
        # Qwen2 checkpoints have qkv bias built into the architecture; small ones tie embeddings.
        extra["tie_word_embeddings"] = True
    elif arch == "qwen3":
        # Qwen3's config class defaults head_dim to 128 regardless of hidden_size.
        extra["head_dim"] = head_dim
    elif arch == "mistral":
        # Mistral v0.2+ dropped the sliding window; a test can opt back in.
        extra["sliding_window"] = None
    extra.update(overrides)
    return extra


def _randomize_constant_params(
    model: Any, seed: int, initializer_range: float, final_norm_scale: float
) -> None:
    """HF initializes norm weights to 1 and biases to 0; random values make an engine that
    forgets a norm weight (q/k norm included) or a bias fail the parity tests."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5, generator=gen)
            elif name.endswith(".bias"):
                param.normal_(0.0, initializer_range, generator=gen)
        model.get_decoder().norm.weight.mul_(final_norm_scale)


def _write_legacy_rope_keys(config_path: pathlib.Path) -> None:
    """Rewrites config.json with `rope_theta` + `rope_scaling`, as hub checkpoints written by
    transformers < 5 have them, instead of transformers 5's `rope_parameters`."""
    cfg = json.loads(config_path.read_text())
    rope = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_tiny_model(
    out_dir: Union[str, pathlib.Path],
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: Optional[int] = None,
    max_position_embeddings: int = 1024,
    tokenizer: str = "bpe",
    tokenizer_vocab_size: Optional[int] = None,
    seed: int = 0,
    torch_dtype: str = "float32",
    initializer_range: Optional[float] = None,
    final_norm_scale: float = DEFAULT_FINAL_NORM_SCALE,
    max_shard_size: Optional[Union[int, str]] = None,
    legacy_rope_keys: bool = False,
    **config_overrides: Any,
) -> pathlib.Path:
    """Writes a random-weight `arch` checkpoint plus its tokenizer into `out_dir`; returns it.

    `tokenizer` is "bpe" (byte-level) or "sentencepiece" (Llama-2 style). The tokenizer is
    trained to `tokenizer_vocab_size` tokens (default: `vocab_size`, capped at 8192, or 1024); a
    `vocab_size` larger than the tokenizer's pads the embedding as real checkpoints do.
    `config_overrides` go to the config class (e.g. rope_scaling={"rope_type": "llama3", ...},
    rope_theta, tie_word_embeddings, sliding_window). `max_shard_size` (e.g. "200KB") produces a
    sharded checkpoint. `legacy_rope_keys` writes rope_theta/rope_scaling instead of
    transformers 5's rope_parameters. `initializer_range` defaults to 0.2 * sqrt(64 /
    hidden_size); norm weights are drawn from U(0.5, 1.5) and biases from N(0, initializer_range)
    (HF would leave them at 1 and 0), and the final norm weight is multiplied by
    `final_norm_scale`. The output depends only on the arguments.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    if tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {TOKENIZER_KINDS}")
    if arch == "qwen2" and tokenizer != "bpe":
        # transformers 5's AutoTokenizer forces Qwen2Tokenizer (byte-level) on model_type qwen2.
        raise ValueError("qwen2 checkpoints only load a byte-level tokenizer; use tokenizer='bpe'")
    if torch_dtype not in _DTYPES:
        raise ValueError(f"unknown torch_dtype {torch_dtype!r}; expected one of {sorted(_DTYPES)}")
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError("hidden_size must divide by heads, and heads by KV heads")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok_vocab = tokenizer_vocab_size or min(vocab_size or DEFAULT_TOKENIZER_VOCAB, 8192)
    hf_tok = wrap_fast_tokenizer(build_tokenizer(tokenizer, tok_vocab))
    num_tokens = len(hf_tok)
    if vocab_size is None:
        vocab_size = num_tokens
    elif vocab_size < num_tokens:
        raise ValueError(f"vocab_size {vocab_size} < the tokenizer's {num_tokens} tokens")

    head_dim = hidden_size // num_attention_heads
    if initializer_range is None:
        initializer_range = DEFAULT_INITIALIZER_RANGE_AT_64 * (64 / hidden_size) ** 0.5
    config = AutoConfig.for_model(
        arch,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=hf_tok.convert_tokens_to_ids(BOS),
        eos_token_id=hf_tok.convert_tokens_to_ids(EOS),
        pad_token_id=hf_tok.convert_tokens_to_ids(PAD),
        **_config_kwargs(arch, head_dim, config_overrides),
    )
    config.architectures = [ARCHITECTURES[arch]]

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_constant_params(model, seed, initializer_range, final_norm_scale)
    dtype = getattr(torch, _DTYPES[torch_dtype])
    model = model.to(dtype).eval()
    model.config.dtype = dtype
    # Sampling defaults in generation_config.json would leak into HF reference runs.
    model.generation_config.do_sample = False

    save_kwargs: Dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **save_kwargs)
    save_fast_tokenizer(hf_tok, out)
    if legacy_rope_keys:
        _write_legacy_rope_keys(out / "config.json")
    for path in out.iterdir():
        # safetensors writes 0600 files; a server running as another user must read them.
        if path.is_file():
            path.chmod(0o644)
    return out


def build_preset(out_dir: Union[str, pathlib.Path], preset: str = "tiny",
                 **overrides: Any) -> pathlib.Path:
    """`build_tiny_model` with the arguments of `PRESETS[preset]`, updated by `overrides`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    kwargs = {**PRESETS[preset], **overrides}
    return build_tiny_model(out_dir, **kwargs)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None)
    parser.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    parser.add_argument("--max-shard-size", default=None)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    overrides = {
        key: value
        for key, value in dict(
            arch=args.arch, tokenizer=args.tokenizer, seed=args.seed, torch_dtype=args.dtype,
            max_shard_size=args.max_shard_size,
        ).items()
        if value is not None
    }
    print(build_preset(args.out_dir, args.preset, **overrides))


if __name__ == "__main__":
    main()
