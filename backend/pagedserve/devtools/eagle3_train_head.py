"""An EAGLE-3 head in plain torch for training and for measuring it: the math of
models/eagle3.py (the published ``LlamaForCausalLMEagle3`` head) over whole sequences, with a
causal SDPA in place of the paged KV cache, unrolled over several draft steps as at inference.

Draft step 0 reads, at each row ``i`` of a target sequence, the token at ``i + 1`` with
``fc(aux[i])`` and predicts the target's greedy token at ``i + 2``. Step ``j > 0`` reads the
token at ``i + 1 + j`` with step ``j - 1``'s ``next_hidden`` at the same row, at position
``i + j``; its attention sees step 0's keys at rows ``<= i`` (the context the engine cached)
and each later step's key at row ``i`` only (the tokens drafted after it): exactly what the
engine's drafting attends to, so the unrolled forward is EAGLE-3's training-time test."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# Published tensor names of the head's trained parameters (d2t/t2d and the shared embedding
# are not trained).
TRAINED_TENSORS = (
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
)


class StepOutput(NamedTuple):
    """One draft step over whole sequences: ``next_hidden`` (pre-norm, feeds the next step)
    and the draft-vocabulary logits, both per row."""

    next_hidden: torch.Tensor
    logits: torch.Tensor


@dataclass(frozen=True)
class HeadShape:
    """What the forward needs from the head's config.json."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    norm_before_residual: bool

    @classmethod
    def from_config(cls, config: dict) -> HeadShape:
        if config.get("rope_scaling"):
            raise ValueError("the trainer's head supports the default rope only (rope_scaling "
                             f"{config['rope_scaling']!r})")
        heads = int(config["num_attention_heads"])
        head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
        return cls(heads, int(config.get("num_key_value_heads") or heads),
                   int(head_dim), float(config["rms_norm_eps"]),
                   float(config["rope_theta"]), bool(config.get("norm_before_residual", False)))


class PlainEagle3Head(nn.Module):
    """Owns the head's trainable tensors (published names, fp32) and the frozen target
    embedding it shares; runs draft steps over ``[batch, rows]`` sequences."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict,
                 embedding: torch.Tensor) -> None:
        super().__init__()
        self.shape = HeadShape.from_config(config)
        self.weights = nn.ParameterDict({
            name.replace(".", "__"): nn.Parameter(tensors[name].detach().float().clone())
            for name in TRAINED_TENSORS})
        self.register_buffer("embedding", embedding.detach().float().clone(), persistent=False)

    def w(self, name: str) -> torch.Tensor:
        return self.weights[name.replace(".", "__")]

    def published_tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.w(name).detach().clone() for name in TRAINED_TENSORS}

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's aux states ``[..., 3 * target_hidden]`` -> step 0's hidden input."""
        return aux @ self.w("fc.weight").T

    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.shape.rms_norm_eps)
        return self.w(name) * normed

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """HF's rotate-half rope on ``[batch, heads, rows, head_dim]``."""
        d = x.shape[-1]
        inv_freq = 1.0 / self.shape.rope_theta ** (
            torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles = positions.float()[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * cos + rotated * sin

    def step(self, input_ids: torch.Tensor, hidden: torch.Tensor, step: int,
             cache: list[tuple[torch.Tensor, torch.Tensor]]) -> StepOutput:
        """Draft step ``step`` over ``[batch, rows]``: ``input_ids`` are the tokens this step
        reads, ``hidden`` step 0's combine(aux) or the previous step's next_hidden. ``cache``
        holds the earlier steps' (keys, values) and gets this step's appended."""
        s = self.shape
        batch, rows = input_ids.shape
        p = "midlayer."
        embeds = self._rms(self.embedding[input_ids], p + "input_layernorm.weight")
        normed = self._rms(hidden, p + "hidden_norm.weight")
        residual = normed if s.norm_before_residual else hidden
        x = torch.cat([embeds, normed], -1)
        positions = torch.arange(rows) + step  # row i drafts at position i + step

        def heads(name: str, n: int) -> torch.Tensor:
            return (x @ self.w(p + f"self_attn.{name}_proj.weight").T).view(
                batch, rows, n, s.head_dim).transpose(1, 2)

        q = self._rope(heads("q", s.num_heads), positions)
        k = self._rope(heads("k", s.num_kv_heads), positions)
        v = heads("v", s.num_kv_heads)
        group = s.num_heads // s.num_kv_heads
        cache.append((k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
        attn = _attend(q, cache).transpose(1, 2).reshape(batch, rows, s.num_heads * s.head_dim)
        h = attn @ self.w(p + "self_attn.o_proj.weight").T + residual
        m = self._rms(h, p + "post_attention_layernorm.weight")
        gate = m @ self.w(p + "mlp.gate_proj.weight").T
        up = m @ self.w(p + "mlp.up_proj.weight").T
        pre = (F.silu(gate) * up) @ self.w(p + "mlp.down_proj.weight").T + h
        logits = self._rms(pre, "norm.weight") @ self.w("lm_head.weight").T
        return StepOutput(pre, logits)

    def unroll(self, tokens: torch.Tensor, aux: torch.Tensor, num_steps: int
               ) -> list[torch.Tensor]:
        """Draft-vocabulary logits of steps ``0 .. num_steps - 1`` at each row of a target
        sequence: ``tokens`` ``[batch, rows]`` (row ``i``'s step ``j`` reads token ``i + 1 + j``;
        past the end, token 0: those rows have no label and no later row attends to them),
        ``aux`` ``[batch, rows, 3 * target_hidden]`` the target's features at each row."""
        rows = aux.shape[1]
        padded = F.pad(tokens, (0, num_steps + 1))
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        hidden = self.combine(aux)
        out = []
        for j in range(num_steps):
            result = self.step(padded[:, 1 + j:1 + j + rows], hidden, j, cache)
            out.append(result.logits)
            hidden = result.next_hidden
        return out


def _attend(q: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention of the newest step's queries ``[batch, heads, rows, d]``: causal over step 0's
    keys, and each later step's key at the query's own row."""
    k0, v0 = cache[0]
    if len(cache) == 1:
        return F.scaled_dot_product_attention(q, k0, v0, is_causal=True)
    rows, scale = q.shape[2], q.shape[-1] ** -0.5
    causal = torch.ones(rows, rows, dtype=torch.bool).tril()
    scores = (q @ k0.transpose(-1, -2) * scale).masked_fill(~causal, -math.inf)
    diagonal = [(q * k).sum(-1, keepdim=True) * scale for k, _ in cache[1:]]
    probs = torch.cat([scores, *diagonal], -1).softmax(-1)
    out = probs[..., :rows] @ v0
    for i, (_, v) in enumerate(cache[1:]):
        out = out + probs[..., rows + i:rows + i + 1] * v
    return out
