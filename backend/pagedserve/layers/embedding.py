"""Token embedding, the LM head that may share its weight, and the quantized LM head."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.distributed import SINGLE_RANK, TensorParallelGroup
from pagedserve.layers.linear import LinearBase, LinearMethod, onednn_linear, onednn_pack


def _vocab_loader(tp: TensorParallelGroup, rows_per_rank: int, vocab_size: int):
    """Copies a rank's rows of a [vocab, hidden] checkpoint table. Checkpoints may pad the
    vocabulary differently from config.vocab_size: rows past the checkpoint's stay zero."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.shape[1:] != loaded.shape[1:] or loaded.shape[0] > vocab_size:
            raise ValueError(
                f"embedding shape {tuple(loaded.shape)} does not fit "
                f"{(vocab_size, *param.shape[1:])}"
            )
        start = tp.rank * rows_per_rank
        rows = max(0, min(rows_per_rank, loaded.shape[0] - start))
        param.data[:rows].copy_(loaded[start:start + rows])

    return load


def vocab_rows_per_rank(vocab_size: int, tp: TensorParallelGroup) -> int:
    """Each rank's rows of the vocabulary: an equal share, the last rank's padded."""
    return -(-vocab_size // tp.world_size)


class VocabEmbedding(nn.Module):
    """Owns the [vocab, hidden] embedding table; under tensor parallelism, its rank's rows
    (``vocab_rows_per_rank``): each rank embeds the tokens it holds, zeros for the others, and
    the ranks' rows are summed."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                 tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.rows = vocab_rows_per_rank(vocab_size, tp)
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = _vocab_loader(tp, self.rows, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.tp.rank * self.rows
        outside = (local < 0) | (local >= self.rows)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)
        hidden.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(hidden)


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits; ties to an embedding when asked. Under
    tensor parallelism each rank computes its rows' logits and every rank gathers them all."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        tied_to: Optional[VocabEmbedding] = None,
        tp: TensorParallelGroup = SINGLE_RANK,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            rows = vocab_rows_per_rank(vocab_size, tp)
            self.weight = nn.Parameter(torch.zeros(rows, hidden_size, dtype=dtype),
                                       requires_grad=False)
            self.weight.weight_loader = _vocab_loader(tp, rows, vocab_size)
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
        return _gathered(logits.float(), self.tp, self.vocab_size)


def _gathered(logits: torch.Tensor, tp: TensorParallelGroup, vocab_size: int) -> torch.Tensor:
    """Every rank's logits side by side, the padding past ``vocab_size`` dropped."""
    if tp.world_size == 1:
        return logits
    return tp.all_gather(logits, dim=-1)[..., :vocab_size]


class QuantizedLMHead(LinearBase):
    """The LM head of a checkpoint that quantized it (GPTQ's ``lm_head``, AutoRound's
    ``extra_config``): a linear layer named ``lm_head`` run by its LinearMethod; never tied, since
    a quantized head is stored apart from the embedding. Logits in fp32, as LMHead's."""

    def __init__(
        self, vocab_size: int, hidden_size: int, dtype: torch.dtype, linear_method: LinearMethod,
        tp: TensorParallelGroup = SINGLE_RANK,
    ) -> None:
        # Column-parallel: each rank its equal share of the vocabulary, which must divide.
        super().__init__(hidden_size, [vocab_size], linear_method=linear_method, dtype=dtype,
                         prefix="lm_head", tp=tp, parallel="column")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _gathered(super().forward(hidden).float(), self.tp, self.full_output_sizes[0])
