"""EAGLE-3 draft heads in their published checkpoint format (``LlamaForCausalLMEagle3``).

A head drafts the target's next tokens from the target's own features. Its checkpoint holds
``fc`` (the concatenated residual streams of three target layers -> the head's hidden size),
one decoder layer ``midlayer`` whose q/k/v read ``[norm(embedding); norm(hidden)]`` (twice the
hidden size), the final ``norm``, an ``lm_head`` over a draft vocabulary of
``draft_vocab_size`` tokens, and ``d2t``, which maps draft ids to target ids
(``target = draft + d2t[draft]``). Without an ``embed_tokens`` tensor the head shares the
target's embedding.

Drafting, as vLLM does it: the first step feeds, at each of the target's positions ``p``, the
token at ``p + 1`` with ``fc(aux[p])`` (the target's features at ``p``), writing the head's KV at
``p``'s slot; every later step feeds the token just drafted with the head's own ``next_hidden``
at the next position. Logits come from ``logits_hidden``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from pagedserve.attention.base import AttentionBackend, AttentionMetadata
from pagedserve.layers.embedding import LMHead, VocabEmbedding
from pagedserve.layers.linear import LinearBase
from pagedserve.layers.norm import RMSNorm
from pagedserve.layers.quantization import QuantizationConfig
from pagedserve.models.llama import (
    LlamaAttention,
    LlamaMLP,
    copy_into_param,
    default_eagle3_aux_layers,
    stacked_name,
)
from pagedserve.models.model_config import ModelConfig

# The published heads' architecture name, and vLLM's name for the same class.
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
# How many target layers feed fc.
NUM_AUX_LAYERS = 3


@dataclasses.dataclass(frozen=True)
class Eagle3HeadFields:
    """What an EAGLE-3 config.json adds to a Llama config, read and checked on its own."""

    draft_vocab_size: int
    target_hidden_size: int
    # True: the residual carried past attention is the normed hidden (some trained heads).
    norm_before_residual: bool
    # The target layers whose input fc reads, as the checkpoint pins them (None: the default).
    aux_layer_ids: Optional[tuple[int, ...]]

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> Eagle3HeadFields:
        raw = config.raw
        where = f"EAGLE-3 head config {config.path / 'config.json'}"
        if config.num_layers != 1:
            raise ValueError(f"{where}: num_hidden_layers must be 1 (one midlayer), got "
                             f"{config.num_layers}")
        eagle = raw.get("eagle_config") or {}
        if eagle.get("use_aux_hidden_state", True) is not True:
            raise ValueError(f"{where}: eagle_config.use_aux_hidden_state must be true (an "
                             "EAGLE-3 head reads the target's auxiliary hidden states)")
        draft_vocab = raw.get("draft_vocab_size")
        draft_vocab = config.vocab_size if draft_vocab is None else draft_vocab
        if not _is_int(draft_vocab) or draft_vocab < 1:
            raise ValueError(f"{where}: draft_vocab_size must be a positive integer, got "
                             f"{draft_vocab!r}")
        if draft_vocab > config.vocab_size:
            raise ValueError(f"{where}: draft_vocab_size {draft_vocab} exceeds vocab_size "
                             f"{config.vocab_size} (the draft vocabulary is a subset of the "
                             "target's)")
        target_hidden = raw.get("target_hidden_size") or config.hidden_size
        if not _is_int(target_hidden) or target_hidden < 1:
            raise ValueError(f"{where}: target_hidden_size must be a positive integer, got "
                             f"{target_hidden!r}")
        ids = raw.get("eagle_aux_hidden_state_layer_ids",
                      eagle.get("eagle_aux_hidden_state_layer_ids"))
        if ids is not None and (not isinstance(ids, list) or len(ids) != NUM_AUX_LAYERS
                                or not all(_is_int(i) for i in ids)):
            raise ValueError(f"{where}: eagle_aux_hidden_state_layer_ids must be a list of "
                             f"{NUM_AUX_LAYERS} layer indices, got {ids!r}")
        return cls(draft_vocab, int(target_hidden), bool(raw.get("norm_before_residual", False)),
                   tuple(ids) if ids is not None else None)


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """An EAGLE-3 head checked against its target: the head's ModelConfig (one layer, its own
    heads and head_dim: what its KV cache needs; positions as far as the target's), its
    EAGLE-3 fields, and the target layers whose inputs feed fc."""

    model_config: ModelConfig
    fields: Eagle3HeadFields
    aux_layer_ids: tuple[int, ...]

    @property
    def draft_vocab_size(self) -> int:
        return self.fields.draft_vocab_size

    @classmethod
    def from_pretrained(cls, path: Path | str, target: ModelConfig) -> Eagle3Config:
        head = ModelConfig.from_pretrained(path)
        where = f"EAGLE-3 head config {head.path / 'config.json'}"
        if head.architecture not in EAGLE3_ARCHITECTURES:
            raise ValueError(f"{where}: architectures[0] is {head.architecture!r}, not an "
                             f"EAGLE-3 head ({', '.join(EAGLE3_ARCHITECTURES)})")
        if head.quant_config is not None:
            raise ValueError(f"{where}: quantization_config is not supported for EAGLE-3 "
                             "heads")
        fields = Eagle3HeadFields.from_model_config(head)
        if head.vocab_size != target.vocab_size:
            raise ValueError(f"{where}: vocab_size {head.vocab_size} differs from the target's "
                             f"vocab_size {target.vocab_size}")
        if fields.target_hidden_size != target.hidden_size:
            named = ("target_hidden_size" if "target_hidden_size" in head.raw
                     else "hidden_size (no target_hidden_size given)")
            raise ValueError(f"{where}: {named} {fields.target_hidden_size} differs from the "
                             f"target's hidden_size {target.hidden_size}")
        ids = fields.aux_layer_ids or default_eagle3_aux_layers(target.num_layers)
        bad = [i for i in ids if not 0 <= i < target.num_layers]
        if bad:
            source = ("its eagle_aux_hidden_state_layer_ids" if fields.aux_layer_ids
                      else "vLLM's default eagle_aux_hidden_state_layer_ids (2, n // 2, n - 3)")
            raise ValueError(f"{where}: {source} {list(ids)} fall outside the target's "
                             f"{target.num_layers} layers (ids 0 .. {target.num_layers - 1}); "
                             "pin eagle_aux_hidden_state_layer_ids in the head's config")
        # The head drafts at the target's positions: its rotary table must reach as far.
        reach = max(head.max_position_embeddings, target.max_position_embeddings)
        head = dataclasses.replace(head, max_position_embeddings=reach)
        return cls(head, fields, tuple(ids))


def split_aux(output: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A target forward's ``(hidden, aux)``: aux is None unless the target was told to return
    an EAGLE-3 head's aux hidden states (set_aux_hidden_state_layers)."""
    if isinstance(output, tuple):
        return output
    return output, None


class Eagle3Hidden(NamedTuple):
    """One head step's output: ``next_hidden`` (pre-norm) feeds the next draft step;
    ``logits_hidden`` (normed) goes to compute_draft_logits."""

    next_hidden: torch.Tensor
    logits_hidden: torch.Tensor


class Eagle3DecoderLayer(nn.Module):
    """The head's one decoder layer (``midlayer``): attention over [input_layernorm(embedding);
    hidden_norm(hidden)], then the gated MLP; the residual stream starts from the hidden input
    (normed first with norm_before_residual)."""

    def __init__(self, config: ModelConfig, attn: AttentionBackend, dtype: torch.dtype,
                 norm_before_residual: bool, prefix: str = "midlayer") -> None:
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(size, eps, dtype)
        self.hidden_norm = RMSNorm(size, eps, dtype)
        self.self_attn = LlamaAttention(config, attn, None, dtype, f"{prefix}.self_attn",
                                        input_size=2 * size)
        self.post_attention_layernorm = RMSNorm(size, eps, dtype)
        self.mlp = LlamaMLP(config, None, dtype, f"{prefix}.mlp")
        self.norm_before_residual = norm_before_residual

    def forward(
        self,
        positions: torch.Tensor,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        x = self.self_attn(positions, x, kv_cache, metadata)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def write_kv(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor,
                 kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Only the keys and values forward would store at these positions."""
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        _, k, v = self.self_attn.project(positions, x)
        self.self_attn.attn.write_kv(k, v, kv_cache, slot_mapping)


class Eagle3LlamaForCausalLM(nn.Module):
    """An EAGLE-3 head: owns fc, the midlayer (one layer of paged KV cache), the final norm,
    the draft-vocabulary LM head and the draft->target id map; the token embedding is its own
    when the checkpoint has one, else the target's (share_embedding)."""

    def __init__(
        self,
        config: ModelConfig,
        attn: AttentionBackend,
        quant_config: Optional[QuantizationConfig],
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        if quant_config is not None:
            raise ValueError("EAGLE-3 heads are served unquantized")
        self.config = config
        self.fields = Eagle3HeadFields.from_model_config(config)
        size = config.hidden_size
        self.draft_vocab_size = self.fields.draft_vocab_size
        # None after loading a checkpoint without one, until share_embedding.
        self.embed_tokens: Optional[VocabEmbedding] = VocabEmbedding(
            config.vocab_size, size, dtype)
        self.shares_embedding = False
        self.fc = LinearBase(NUM_AUX_LAYERS * self.fields.target_hidden_size, [size],
                             dtype=dtype, prefix="fc")
        self.midlayer = Eagle3DecoderLayer(config, attn, dtype, self.fields.norm_before_residual)
        self.norm = RMSNorm(size, config.rms_norm_eps, dtype)
        self.lm_head = LMHead(self.draft_vocab_size, size, dtype)
        # The checkpoint's offsets, and the target id of each draft id (arange + d2t).
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.long))
        self.register_buffer("draft_to_target",
                             torch.arange(self.draft_vocab_size, dtype=torch.long))

    @property
    def owns_embedding(self) -> bool:
        return self.embed_tokens is not None and not self.shares_embedding

    def share_embedding(self, embedding: VocabEmbedding) -> None:
        """Uses the target's token embedding (a head whose checkpoint has none)."""
        want = (self.config.vocab_size, self.config.hidden_size)
        if tuple(embedding.weight.shape) != want:
            raise ValueError(f"the target's embedding has shape {tuple(embedding.weight.shape)}"
                             f"; the EAGLE-3 head needs (vocab_size, hidden_size) = {want}")
        self.embed_tokens = embedding
        self.shares_embedding = True

    def combine_hidden_states(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's aux hidden states ``[tokens, 3 * target_hidden]`` -> the head's
        hidden ``[tokens, hidden]`` (the first draft step's hidden input)."""
        return self.fc(aux)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> Eagle3Hidden:
        """One draft step over a flat token batch: ``hidden_states`` ``[tokens, hidden]`` is
        combine_hidden_states(aux) on the first step, the previous step's next_hidden after.
        ``kv_caches`` holds the head's one layer."""
        if self.embed_tokens is None:
            raise RuntimeError("the EAGLE-3 head has no token embedding: its checkpoint holds "
                               "none, so call share_embedding(target embedding) first")
        embeds = self.embed_tokens(input_ids)
        x, residual = self.midlayer(positions, embeds, hidden_states, kv_caches[0], metadata)
        logits_hidden, next_hidden = self.norm(x, residual)
        return Eagle3Hidden(next_hidden, logits_hidden)

    def write_kv(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 hidden_states: torch.Tensor, kv_caches: list[torch.Tensor],
                 slot_mapping: torch.Tensor) -> None:
        """What forward writes to the cache at these positions, and nothing else: the cheap
        part of a step whose outputs are not read (no attention, MLP or logits)."""
        if self.embed_tokens is None:
            raise RuntimeError("the EAGLE-3 head has no token embedding: call "
                               "share_embedding(target embedding) first")
        self.midlayer.write_kv(positions, self.embed_tokens(input_ids), hidden_states,
                               kv_caches[0], slot_mapping)

    def compute_draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[tokens, draft_vocab_size]`` fp32 logits over the draft vocabulary."""
        return self.lm_head(hidden)

    def map_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids -> target-vocabulary ids (``draft + d2t[draft]``)."""
        return self.draft_to_target[draft_ids]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[tokens, vocab_size]`` fp32 logits over the target's vocabulary, -inf outside the
        draft vocabulary (for drafts sampled as target-vocabulary distributions)."""
        draft = self.compute_draft_logits(hidden)
        logits = draft.new_full((draft.shape[0], self.config.vocab_size), float("-inf"))
        logits[:, self.draft_to_target] = draft
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies the published tensors in; returns the parameter names loaded. Checks d2t
        (required when the draft vocabulary is smaller than the target's)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        d2t: Optional[torch.Tensor] = None
        for original, tensor in weights:
            name = _published_name(original)
            if name == "t2d" or "rotary_emb." in name:
                continue  # t2d is d2t's inverse as a mask; the rotary table is ours
            if name == "d2t":
                d2t = tensor
                continue
            if name == "lm_head.weight" and tensor.shape[0] != self.draft_vocab_size:
                raise ValueError(f"checkpoint tensor {original!r} has {tensor.shape[0]} rows; "
                                 f"the config's draft_vocab_size is {self.draft_vocab_size}")
            name, shard_id = stacked_name(name)
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {original!r} has no place in an EAGLE-3 "
                                 "head")
            copy_into_param(param, original, tensor, shard_id)
            loaded.add(name)
        if "embed_tokens.weight" not in loaded:
            self.embed_tokens = None
        self._load_d2t(d2t)
        return loaded

    def _load_d2t(self, d2t: Optional[torch.Tensor]) -> None:
        n, vocab = self.draft_vocab_size, self.config.vocab_size
        if d2t is None:
            if n < vocab:
                raise ValueError(f"EAGLE-3 head checkpoint {self.config.path} has no 'd2t' "
                                 f"tensor, which a draft_vocab_size ({n}) smaller than "
                                 f"vocab_size ({vocab}) needs")
            return  # the identity map
        if tuple(d2t.shape) != (n,) or d2t.is_floating_point() or d2t.dtype == torch.bool:
            raise ValueError(f"checkpoint tensor 'd2t' must be integer offsets of shape "
                             f"({n},) (draft_vocab_size), got {d2t.dtype} {tuple(d2t.shape)}")
        d2t = d2t.to(torch.long)
        targets = torch.arange(n, dtype=torch.long) + d2t
        if int(targets.min()) < 0 or int(targets.max()) >= vocab:
            raise ValueError(f"checkpoint tensor 'd2t' maps draft ids outside the target's "
                             f"vocabulary [0, {vocab})")
        if int(targets.unique().numel()) != n:
            raise ValueError("checkpoint tensor 'd2t' maps two draft ids to one target id")
        self.d2t.copy_(d2t)
        self.draft_to_target.copy_(targets)


def _published_name(name: str) -> str:
    """Our name for a head tensor: the published names are ours; vLLM-converted checkpoints
    put them under ``model.`` with ``layers.0`` for the midlayer."""
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("layers.0."):
        name = "midlayer." + name[len("layers.0."):]
    return name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
