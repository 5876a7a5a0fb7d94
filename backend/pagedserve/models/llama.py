"""The Llama decoder, which also covers Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm):
the differences are flags of ModelConfig.

The model computes hidden states for a flat batch of tokens; it knows the attention backend
interface and nothing about requests or scheduling.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Optional, Union

import torch
from torch import nn

from pagedserve.attention.base import AttentionBackend, AttentionMetadata
from pagedserve.attention.layer import Attention
from pagedserve.distributed import SINGLE_RANK, TensorParallelGroup
from pagedserve.layers.activation import SiluAndMul
from pagedserve.layers.embedding import LMHead, QuantizedLMHead, VocabEmbedding
from pagedserve.layers.linear import LinearBase, LinearMethod
from pagedserve.layers.norm import RMSNorm
from pagedserve.layers.quantization import QuantizationConfig
from pagedserve.layers.rotary import RotaryEmbedding
from pagedserve.models.model_config import ModelConfig


def linear_method(
    quant_config: Optional[QuantizationConfig], prefix: str
) -> Optional[LinearMethod]:
    """The method of our layer ``prefix`` from the checkpoint modules it merges."""
    if quant_config is None:
        return None
    parent, _, name = prefix.rpartition(".")
    shards = [f"{parent}.{ckpt}" for ckpt in _SHARDS_OF.get(name, [name])]
    return quant_config.linear_method(prefix, shards)


class LlamaAttention(nn.Module):
    """Owns one layer's q/k/v/o projections, rotary embedding and optional q/k norms.
    ``input_size`` is the width q/k/v read (default hidden_size; an EAGLE-3 head's layer reads
    twice that); o_proj always writes hidden_size."""

    def __init__(
        self,
        config: ModelConfig,
        attn: AttentionBackend,
        quant_config: Optional[QuantizationConfig],
        dtype: torch.dtype,
        prefix: str,
        input_size: Optional[int] = None,
        tp: TensorParallelGroup = SINGLE_RANK,
    ) -> None:
        super().__init__()
        # This rank's heads (all of them without tensor parallelism).
        self.num_heads = config.heads_per_rank
        self.num_kv_heads = config.kv_heads_per_rank
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        replicas = config.kv_head_replicas
        self.qkv_proj = LinearBase(
            input_size or config.hidden_size,
            [config.num_heads * self.head_dim, *[config.num_kv_heads * self.head_dim] * 2],
            bias=config.qkv_bias,
            shard_names=["q", "k", "v"],
            linear_method=linear_method(quant_config, f"{prefix}.qkv_proj"),
            dtype=dtype,
            prefix=f"{prefix}.qkv_proj",
            tp=tp, parallel="column", shard_replicas=[1, replicas, replicas],
        )
        self.o_proj = LinearBase(
            config.num_heads * self.head_dim, [config.hidden_size], bias=config.o_proj_bias,
            linear_method=linear_method(quant_config, f"{prefix}.o_proj"), dtype=dtype,
            prefix=f"{prefix}.o_proj", tp=tp, parallel="row",
        )
        self.rotary_emb = RotaryEmbedding(
            self.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, eps, dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps, dtype) if config.qk_norm else None
        self.attn = Attention(attn, f"{prefix}.attn")

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.project(positions, hidden)
        out = self.attn(q, k, v, kv_cache, metadata)
        return self.o_proj(out.reshape(-1, self.q_size))

    def project(self, positions: torch.Tensor,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [tokens, heads, head_dim] and k, v [tokens, kv_heads, head_dim], normed (qk_norm)
        and rotated: what attention reads and the KV cache stores."""
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return q, k, v


class LlamaMLP(nn.Module):
    """Owns the gated MLP: merged [gate; up] projection, SiLU-and-mul, down projection."""

    def __init__(
        self,
        config: ModelConfig,
        quant_config: Optional[QuantizationConfig],
        dtype: torch.dtype,
        prefix: str,
        tp: TensorParallelGroup = SINGLE_RANK,
    ) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = LinearBase(
            config.hidden_size, [size, size], bias=config.mlp_bias, shard_names=[0, 1],
            linear_method=linear_method(quant_config, f"{prefix}.gate_up_proj"), dtype=dtype,
            prefix=f"{prefix}.gate_up_proj", tp=tp, parallel="column",
        )
        self.down_proj = LinearBase(
            size, [config.hidden_size], bias=config.mlp_bias,
            linear_method=linear_method(quant_config, f"{prefix}.down_proj"), dtype=dtype,
            prefix=f"{prefix}.down_proj", tp=tp, parallel="row",
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """One pre-norm transformer block; carries the residual stream unnormalized."""

    def __init__(
        self,
        config: ModelConfig,
        attn: AttentionBackend,
        quant_config: Optional[QuantizationConfig],
        dtype: torch.dtype,
        prefix: str,
        tp: TensorParallelGroup = SINGLE_RANK,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(config, attn, quant_config, dtype, f"{prefix}.self_attn",
                                        tp=tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(config, quant_config, dtype, f"{prefix}.mlp", tp=tp)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: Optional[torch.Tensor],
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def default_eagle3_aux_layers(num_layers: int) -> tuple[int, ...]:
    """vLLM's choice of the target layers an EAGLE-3 head reads when its config names none:
    an early, a middle and a late one."""
    return (2, num_layers // 2, num_layers - 3)


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm; optionally also the residual stream entering
    chosen layers (``aux_hidden_state_layers``, for an EAGLE-3 head)."""

    def __init__(
        self,
        config: ModelConfig,
        attn: AttentionBackend,
        quant_config: Optional[QuantizationConfig],
        dtype: torch.dtype,
        tp: TensorParallelGroup = SINGLE_RANK,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, attn, quant_config, dtype, f"model.layers.{i}", tp)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        # Empty: forward returns the final hidden states only.
        self.aux_hidden_state_layers: tuple[int, ...] = ()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if self.aux_hidden_state_layers:
            return self._forward_with_aux(input_ids, positions, kv_caches, metadata)
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _forward_with_aux(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward, plus the residual stream entering each aux layer (layer i's input: HF's
        ``hidden_states[i]``), concatenated in the order asked: ``[tokens, n_aux * hidden]``.
        A loop of its own, so that the plain forward tests no layer index."""
        wanted = set(self.aux_hidden_state_layers)
        captured: dict[int, torch.Tensor] = {}
        hidden = self.embed_tokens(input_ids)
        residual = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            if i in wanted:
                captured[i] = hidden if residual is None else hidden + residual
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)
        aux = torch.cat([captured[i] for i in self.aux_hidden_state_layers], dim=-1)
        return hidden, aux


# Checkpoint module names that we store merged: (checkpoint name, our name, shard id).
_STACKED = [
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
]
# Our merged module -> the checkpoint modules (its shards, in order).
_SHARDS_OF = {
    ours: [ckpt for ckpt, merged, _ in _STACKED if merged == ours]
    for _, ours, _ in _STACKED
}
_SKIPPED = re.compile(r"rotary_emb\.inv_freq|rotary_emb\.cos_cached|rotary_emb\.sin_cached"
                      # Q stays in the model's dtype here: a checkpoint's query/softmax scales
                      # (FP8 attention, vLLM's FlashAttention-3 path) have no use.
                      r"|\.self_attn\.(q_scale|prob_scale)$")
# KV-cache scales as checkpoints name them (vLLM's accepted spellings) -> our attention's.
_KV_SCALE = re.compile(r"\.self_attn\.(?:(?P<kv>[kv])_scale|(?P<proj>[kv])_proj\.output_scale"
                       r"|(?P<both>kv)_scale)$")


def _kv_scale_targets(name: str) -> Optional[list[str]]:
    """Our parameter names for a checkpoint's KV-cache scale tensor ``name``, else None. The
    legacy single ``kv_scale`` serves as both."""
    m = _KV_SCALE.search(name)
    if m is None:
        return None
    base = name[: m.start()] + ".self_attn.attn."
    which = m.group("kv") or m.group("proj")
    return [base + f"{which}_scale"] if which else [base + "k_scale", base + "v_scale"]


class LlamaForCausalLM(nn.Module):
    """A causal LM of the Llama family: hidden states for a token batch, logits on request.
    With a ``tp`` group of several ranks (``config`` split for as many: with_tensor_parallel)
    it is this rank's part of the model; every rank gets the whole hidden states and logits."""

    def __init__(
        self,
        config: ModelConfig,
        attn: AttentionBackend,
        quant_config: Optional[QuantizationConfig],
        dtype: torch.dtype,
        tp: TensorParallelGroup = SINGLE_RANK,
    ) -> None:
        super().__init__()
        if config.tensor_parallel_size != tp.world_size:
            raise ValueError(
                f"the model config is split for tensor_parallel_size "
                f"{config.tensor_parallel_size}, the group has {tp.world_size} rank(s)"
            )
        self.config = config
        self.model = LlamaModel(config, attn, quant_config, dtype, tp)
        head_method = quant_config.lm_head_method() if quant_config is not None else None
        self.lm_head: nn.Module
        # A quantized head is stored on its own, even where config.json ties the embeddings.
        self.tied_head = config.tie_word_embeddings and head_method is None
        if head_method is not None:
            self.lm_head = QuantizedLMHead(config.vocab_size, config.hidden_size, dtype,
                                           head_method, tp)
        else:
            tied = self.model.embed_tokens if self.tied_head else None
            self.lm_head = LMHead(config.vocab_size, config.hidden_size, dtype, tied_to=tied,
                                  tp=tp)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The final hidden states ``[tokens, hidden]``; after set_aux_hidden_state_layers,
        ``(hidden, aux)`` with aux ``[tokens, n_aux * hidden]`` (an EAGLE-3 head's fc input)."""
        return self.model(input_ids, positions, kv_caches, metadata)

    def set_aux_hidden_state_layers(self, layers: Sequence[int]) -> None:
        """Makes forward also return the residual stream entering ``layers`` (vLLM's
        SupportsEagle3 hook); an empty sequence turns it off."""
        layers = tuple(int(i) for i in layers)
        bad = [i for i in layers if not 0 <= i < self.config.num_layers]
        if bad:
            raise ValueError(
                f"eagle_aux_hidden_state_layer_ids {list(layers)}: layer(s) {bad} out of range "
                f"for a target with {self.config.num_layers} layers (ids are 0 .. "
                f"{self.config.num_layers - 1})"
            )
        self.model.aux_hidden_state_layers = layers

    def get_eagle3_aux_hidden_state_layers(self) -> tuple[int, ...]:
        return default_eagle3_aux_layers(self.config.num_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies checkpoint tensors into parameters; returns the parameter names loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            original = name
            if _SKIPPED.search(name):
                continue
            if name.startswith("lm_head.") and self.tied_head:
                continue
            scale_targets = _kv_scale_targets(name)
            if scale_targets is not None:
                for target in scale_targets:
                    self._load_one(params, target, original, tensor, None)
                    loaded.add(target)
                continue
            name, shard_id = stacked_name(name)
            self._load_one(params, name, original, tensor, shard_id)
            loaded.add(name)
        if self.tied_head:
            loaded.add("lm_head.weight")
        elif self.config.tie_word_embeddings and not any(n.startswith("lm_head.") for n in loaded):
            raise ValueError(
                "config.json's tie_word_embeddings is true and the quantization config "
                "quantizes the LM head, but the checkpoint holds no lm_head tensors (a quantized "
                "head cannot share the embedding's weight)"
            )
        return loaded

    def _load_one(self, params: dict[str, nn.Parameter], name: str, original: str,
                  tensor: torch.Tensor, shard_id: object) -> None:
        """Copies checkpoint tensor ``original`` into our parameter ``name``."""
        param = params.get(name)
        if param is None:
            head = ""
            if name.startswith("lm_head."):
                head = (" (the quantization config quantizes the LM head)"
                        if isinstance(self.lm_head, QuantizedLMHead)
                        else " (the quantization config leaves the LM head unquantized)")
            raise ValueError(
                f"checkpoint tensor {original!r} has no place in {type(self).__name__}{head}"
            )
        copy_into_param(param, original, tensor, shard_id)


def stacked_name(name: str) -> tuple[str, object]:
    """A checkpoint module name as we store it: (our name, its shard id; None if unmerged)."""
    for ckpt, ours, shard in _STACKED:
        if f".{ckpt}." in name:
            return name.replace(f".{ckpt}.", f".{ours}."), shard
    return name, None


def copy_into_param(param: nn.Parameter, original: str, tensor: torch.Tensor,
                    shard_id: object) -> None:
    """Copies checkpoint tensor ``original`` into ``param`` through its weight_loader, if it
    has one, else whole (same shape)."""
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        if param.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {original!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(param.shape)}"
            )
        param.data.copy_(tensor)
        return
    try:
        loader(param, tensor, shard_id)
    except ValueError as e:
        raise ValueError(f"checkpoint tensor {original!r}: {e}") from None
