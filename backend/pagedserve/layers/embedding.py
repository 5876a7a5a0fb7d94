"""Token embedding, the LM head that may share its weight, and the quantized LM head."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.layers.linear import LinearBase, LinearMethod, onednn_linear, onednn_pack


def _load_full(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        # Checkpoints may pad the vocabulary differently from config.vocab_size.
        rows = min(param.shape[0], loaded.shape[0])
        if param.shape[1:] != loaded.shape[1:] or rows != loaded.shape[0]:
            raise ValueError(
                f"embedding shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}"
            )
        param.data[:rows].copy_(loaded)
        return
    param.data.copy_(loaded)


class VocabEmbedding(nn.Module):
    """Owns the [vocab, hidden] embedding table."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = _load_full

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits; ties to an embedding when asked."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        tied_to: Optional[VocabEmbedding] = None,
    ) -> None:
        super().__init__()
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype),
                                       requires_grad=False)
            self.weight.weight_loader = _load_full
        self.onednn_weight: Optional[torch.Tensor] = None

    def process_weights_after_loading(self) -> None:
        # oneDNN's matmul on the CPU, as for the linear layers; a tied weight stays dense for
        # the embedding, so then this is a second copy.
        self.onednn_weight = onednn_pack(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Logits in fp32: sampling and logprobs need the precision, and the reference does it too.
        if self.onednn_weight is not None:
            logits = onednn_linear(hidden, self.onednn_weight, None)
        else:
            logits = F.linear(hidden, self.weight)
        return logits.float()


class QuantizedLMHead(LinearBase):
    """The LM head of a checkpoint that quantized it (GPTQ's ``lm_head``, AutoRound's
    ``extra_config``): a linear layer named ``lm_head`` run by its LinearMethod; never tied, since
    a quantized head is stored apart from the embedding. Logits in fp32, as LMHead's."""

    def __init__(
        self, vocab_size: int, hidden_size: int, dtype: torch.dtype, linear_method: LinearMethod
    ) -> None:
        super().__init__(hidden_size, [vocab_size], linear_method=linear_method, dtype=dtype,
                         prefix="lm_head")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden).float()
