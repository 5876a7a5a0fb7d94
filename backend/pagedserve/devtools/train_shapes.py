"""The shapes of the trained default models, and the arithmetic that compares them.

A `ModelShape` is a Llama network without its vocabulary; `llama_config` adds the tokenizer's
vocabulary, the training context and the special token ids. The embedding is tied to the LM
head (one matrix: half the file, and no loss in quality at this size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict


@dataclass(frozen=True)
class ModelShape:
    """One Llama network's widths and depth (the vocabulary comes from the tokenizer)."""

    hidden_size: int
    num_layers: int
    head_dim: int
    num_kv_heads: int
    intermediate_size: int

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "head_dim", "num_kv_heads",
                     "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.head_dim:
            raise ValueError(f"ModelShape.hidden_size {self.hidden_size} must be a multiple of "
                             f"head_dim {self.head_dim}")
        if self.head_dim < 16 or self.head_dim & (self.head_dim - 1):
            # The GPU attention kernels take power-of-two head sizes from 16 up.
            raise ValueError(f"ModelShape.head_dim must be a power of two >= 16, got "
                             f"{self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelShape.num_kv_heads {self.num_kv_heads} must divide the "
                             f"{self.num_heads} attention heads")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer: q/o, k/v (grouped), the gated MLP, two norms."""
        d, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        return 2 * d * d + 2 * d * kv + 3 * d * self.intermediate_size + 2 * d

    def non_embedding_params(self) -> int:
        return self.num_layers * self.layer_params() + self.hidden_size  # + the final norm

    def params(self, vocab_size: int) -> int:
        """All parameters, the tied embedding / LM head counted once."""
        return self.non_embedding_params() + vocab_size * self.hidden_size

    def flops_per_token(self, vocab_size: int, position: int) -> int:
        """Forward FLOPs for one token at `position` (0-based) of its sequence: 2 per weight of
        the layers, 2 per weight of the LM head, and attention's QK^T and AV over the
        `position + 1` keys (2 * 2 * keys * hidden per layer). Embedding lookups are free."""
        attention = 4 * (position + 1) * self.hidden_size * self.num_layers
        return 2 * self.non_embedding_params() + 2 * vocab_size * self.hidden_size + attention

    def describe(self) -> str:
        layers = "1 layer" if self.num_layers == 1 else f"{self.num_layers} layers"
        return (f"{layers}, hidden {self.hidden_size}, {self.num_heads} heads of "
                f"{self.head_dim} ({self.num_kv_heads} KV heads), MLP {self.intermediate_size}")


# The committed pair (see the checkpoints' README.md for the figures) and the --quick pair.
SHAPES: Dict[str, ModelShape] = {
    "target": ModelShape(hidden_size=256, num_layers=6, head_dim=64, num_kv_heads=4,
                         intermediate_size=688),
    "draft": ModelShape(hidden_size=96, num_layers=2, head_dim=32, num_kv_heads=3,
                        intermediate_size=384),
    # Candidates measured before choosing: the targets with --bench, the drafts with short
    # distillation runs (--skip-target --draft-shape NAME --draft-tokens N).
    "target-l8": ModelShape(hidden_size=256, num_layers=8, head_dim=64, num_kv_heads=4,
                            intermediate_size=688),
    "target-d320": ModelShape(hidden_size=320, num_layers=6, head_dim=64, num_kv_heads=5,
                              intermediate_size=864),
    "draft-mlp256": ModelShape(hidden_size=96, num_layers=2, head_dim=32, num_kv_heads=3,
                               intermediate_size=256),
    "draft-d64l4": ModelShape(hidden_size=64, num_layers=4, head_dim=32, num_kv_heads=2,
                              intermediate_size=256),
    "quick-target": ModelShape(hidden_size=64, num_layers=2, head_dim=32, num_kv_heads=2,
                               intermediate_size=172),
    "quick-draft": ModelShape(hidden_size=16, num_layers=1, head_dim=16, num_kv_heads=1,
                              intermediate_size=48),
}


def llama_config(shape: ModelShape, vocab_size: int, context: int,
                 special_ids: Dict[str, int]) -> Any:
    """A `transformers.LlamaConfig` for `shape` with tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        vocab_size=vocab_size,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=special_ids["bos"],
        eos_token_id=special_ids["eos"],
        pad_token_id=special_ids["pad"],
        architectures=["LlamaForCausalLM"],
    )
