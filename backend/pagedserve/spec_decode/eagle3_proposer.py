"""EAGLE-3 proposer (``speculative_config`` method ``"eagle3"``): a one-layer head drafts from
the target's own features (models/eagle3.py), greedily (argmax over its draft vocabulary, mapped
to target ids: a point-mass draft, which the rejection sampler verifies losslessly whatever the
head predicts).

The target returns, beside its hidden states, the residual streams entering three of its layers
(``aux``, set_aux_hidden_state_layers). After a step, for every position p the target computed
whose next token is now known and whose input was an actual token (not a rejected draft), the
head is fed ``token[p + 1]`` with ``fc(aux[p])`` at p, writing its KV at p's slot: its catch-up.
A row's last such position p = num_tokens - 2 gives draft 0; then k - 1 one-token steps feed each
draft with the head's own ``next_hidden`` at the next position (N - 1, N, ...). Those steps'
KV is speculative: the target computes those positions in a later step and the catch-up then
overwrites it, so the head needs no record of which positions are valid, as a draft model does.
Positions past a row's blocks go to its scratch blocks (see paged_drafting).

The catch-up runs only on steps after which the head drafts: while the adaptive controller
(or disable_by_batch_size) keeps speculation off, the engine runs as if it were off, and the
positions computed meanwhile keep whatever head KV their slots held. That costs acceptance
once drafting resumes, never correctness.

The head runs eagerly, on the CPU and on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pagedserve.attention.base import AttentionMetadata
from pagedserve.attention.selector import get_attention_backend
from pagedserve.config import EngineConfig
from pagedserve.models.eagle3 import Eagle3Config, Eagle3LlamaForCausalLM
from pagedserve.models.hub import resolve_checkpoint
from pagedserve.models.loader import load_eagle3_head
from pagedserve.models.model_config import ModelConfig
from pagedserve.spec_decode.ngram_proposer import PLACEHOLDER_TOKEN_ID
from pagedserve.spec_decode.paged_drafting import (
    DecodeSteps,
    PagedBatch,
    ScratchBlocks,
    ragged_arange,
    ragged_metadata,
    use_dense_linears,
)


@dataclass
class StepFeatures:
    """What a target step leaves for the head: the rows it computed (in its token order), each
    row's first position and token count, the rows' serials then, and ``aux``, the target's
    features of the step's flat tokens ``[tokens, 3 * hidden]`` on the device."""

    rows: np.ndarray
    starts: np.ndarray
    query_lens: np.ndarray
    serials: np.ndarray
    aux: torch.Tensor


def load_eagle3_config(name: str, target: ModelConfig, *,
                       download_dir: Optional[str] = None) -> Eagle3Config:
    """The head's config checked against the target's; a head that cannot serve is a
    ValueError naming speculative_config 'model'."""
    try:
        path = resolve_checkpoint(name, what="speculative_config 'model'",
                                  download_dir=download_dir)
        return Eagle3Config.from_pretrained(path, target)
    except ValueError as e:
        raise ValueError(f"speculative_config 'model' ({name!r}) cannot serve as an EAGLE-3 "
                         f"head: {e}") from None


class Eagle3Proposer:
    """Owns the EAGLE-3 head, its attention backend, its one-layer KV cache (on the target's
    block ids, plus per-row scratch blocks) and, between a step's catch-up and the drafting
    after it, each row's last head state. Implements the runner's Proposer; the runner hands
    it each step's features first (``catch_up``)."""

    def __init__(
        self,
        config: EngineConfig,
        target_config: ModelConfig,
        target: torch.nn.Module,
        dtype: torch.dtype,
        kv_cache_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        spec = config.speculative
        assert spec is not None and spec.model is not None
        if not hasattr(target, "set_aux_hidden_state_layers"):
            raise ValueError(f"speculative_config method 'eagle3' needs a target that exposes "
                             f"its auxiliary hidden states; {target_config.architecture} "
                             "does not")
        self.head_config = load_eagle3_config(spec.model, target_config,
                                              download_dir=config.args.download_dir)
        mc = self.model_config = self.head_config.model_config
        self.device = device
        self.block_size = bs = config.block_size
        self.kv_cache_dtype = kv_cache_dtype
        self.attn = get_attention_backend(
            config.args.attention_backend, device,
            num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
            scale=mc.head_dim ** -0.5, block_size=bs, kv_cache_dtype=kv_cache_dtype,
        )
        self.head: Eagle3LlamaForCausalLM = load_eagle3_head(
            self.head_config, target, dtype, device, self.attn)
        use_dense_linears(self.head)  # as a draft model's: small matmuls, per-call costs
        target.set_aux_hidden_state_layers(self.head_config.aux_layer_ids)
        self.max_model_len = config.max_model_len
        self.scratch = ScratchBlocks.for_drafts(spec.num_speculative_tokens, bs)
        self.kv_caches: list[torch.Tensor] = []
        self.max_rows = config.max_num_seqs
        # After catch_up: per batch row, its index in the tensors below (-1: nothing to draft
        # from), the head's next_hidden at its last known position and draft 0.
        self._index = np.full(self.max_rows, -1, dtype=np.int64)
        self._hidden: Optional[torch.Tensor] = None
        self._first: Optional[torch.Tensor] = None

    # ---- KV cache ------------------------------------------------------------------------

    def bytes_per_block(self) -> int:
        mc = self.model_config
        element = torch.tensor([], dtype=self.kv_cache_dtype).element_size()
        return 2 * self.block_size * mc.num_kv_heads * mc.head_dim * element

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """The head's one layer of cache: the target's ``num_blocks`` block ids, then each
        batch row's scratch blocks (outside the KV budget)."""
        mc = self.model_config
        total = self.scratch.total_blocks(num_blocks, self.max_rows)
        shape = (2, total, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)]

    # ---- catch-up ------------------------------------------------------------------------

    @torch.inference_mode()
    def catch_up(self, batch: PagedBatch, step: StepFeatures) -> None:
        """Feeds the head every position of ``step`` whose next token ``batch`` now knows and
        keeps, for each row whose known tokens it reached, draft 0 and the head's state."""
        self._index[:] = -1
        self._hidden = self._first = None
        alive = batch.serial[step.rows] == step.serials
        num_tokens = batch.num_tokens[step.rows].astype(np.int64)
        ends = np.minimum(step.starts + step.query_lens, num_tokens - 1)
        fed = np.where(alive, np.clip(ends - step.starts, 0, None), 0)
        (keep,) = np.nonzero(fed > 0)
        if not len(keep):
            return
        rows, starts, ends, fed = step.rows[keep], step.starts[keep], ends[keep], fed[keep]
        flat_first = (np.cumsum(step.query_lens) - step.query_lens)[keep]
        offsets = ragged_arange(fed)
        positions = np.repeat(starts, fed) + offsets
        ids = torch.from_numpy(batch.token_ids[np.repeat(rows, fed), positions + 1]
                               .astype(np.int64)).to(self.device)
        features = step.aux[torch.from_numpy(np.repeat(flat_first, fed) + offsets)
                            .to(self.device)]
        # Every position fed lies below the row's num_tokens - 1: in its own blocks.
        table = batch.block_table[rows, : int(ends.max() - 1) // self.block_size + 1]
        hidden, first = self._step(ids, positions, self.head.combine_hidden_states(features),
                                   table.astype(np.int64), fed, ends)
        (reached,) = np.nonzero(ends == num_tokens[keep] - 1)
        self._index[rows[reached]] = np.arange(len(reached))
        picked = torch.from_numpy(reached).to(self.device)
        self._hidden, self._first = hidden[picked], first[picked]

    # ---- proposing -----------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, batch: PagedBatch, rows: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` greedy drafts for each of ``rows``, from the state the last catch_up
        left (a row it did not reach gets none)."""
        n = len(rows)
        drafts = np.full((n, k), PLACEHOLDER_TOKEN_ID, dtype=np.int64)
        counts = np.zeros(n, dtype=np.int64)
        if n == 0 or k <= 0:
            return drafts, counts
        rows = np.asarray(rows, dtype=np.int64)
        index = self._index[rows]
        num_tokens = batch.num_tokens[rows].astype(np.int64)
        alloc_end = batch.num_blocks[rows].astype(np.int64) * self.block_size
        # Draft j goes to position N + j (below max_model_len); the step feeding draft j - 1
        # writes position N - 2 + j, in the row's blocks or its scratch.
        k_rows = np.minimum(k, self.max_model_len - num_tokens)
        k_rows = np.minimum(k_rows, alloc_end + self.scratch.per_row * self.block_size
                            - num_tokens + 2)
        active = (index >= 0) & (k_rows > 0)
        if not active.any():
            return drafts, counts
        rows_a, index, num_tokens, k_rows = (a[active] for a in (rows, index, num_tokens,
                                                                 k_rows))
        picked = torch.from_numpy(index).to(self.device)
        out = torch.empty(len(rows_a), k, dtype=torch.int64, device=self.device)
        out[:, 0] = self._first[picked]
        hidden = self._hidden[picked]
        if k > 1:
            table = self.scratch.block_table(batch, rows_a, num_tokens + k_rows - 3,
                                             self.block_size)
        steps: Optional[DecodeSteps] = None
        for j in range(1, k):
            (sel,) = np.nonzero(k_rows > j)
            if not len(sel):
                break
            # The rows left only shrink: the same count is the same rows, one position on.
            if steps is None or len(sel) != len(steps.positions):
                steps = DecodeSteps(num_tokens[sel] + (j - 2), table[sel], self.block_size,
                                    self.device)
            else:
                steps.advance()
            if len(sel) == len(rows_a):
                hidden, out[:, j] = self._forward(out[:, j - 1].contiguous(), steps.positions_t,
                                                  hidden, steps.meta)
            else:
                sel_t = torch.from_numpy(sel).to(self.device)
                hidden_j, out[sel_t, j] = self._forward(out[sel_t, j - 1], steps.positions_t,
                                                        hidden[sel_t], steps.meta)
                hidden[sel_t] = hidden_j
        host = out.cpu().numpy()
        drafts[active] = np.where(np.arange(k)[None, :] < k_rows[:, None], host,
                                  PLACEHOLDER_TOKEN_ID)
        counts[active] = k_rows
        return drafts, counts

    def _step(self, ids: torch.Tensor, positions: np.ndarray, hidden: torch.Tensor,
              table: np.ndarray, query_lens: np.ndarray,
              seq_lens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One head forward over a ragged batch (row i: ``query_lens[i]`` tokens ending at
        context length ``seq_lens[i]``); each row's next_hidden at its last token and the
        target id of its draft there."""
        meta, last = ragged_metadata(positions, table, query_lens, seq_lens, self.block_size,
                                     self.device)
        ragged = len(positions) > len(query_lens)
        return self._forward(ids, torch.from_numpy(positions).to(self.device), hidden, meta,
                             torch.from_numpy(last).to(self.device) if ragged else None)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                 meta: AttentionMetadata,
                 last: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One head forward; next_hidden and the draft (a target id) at each of ``last``
        (default: every token)."""
        self.attn.prepare(meta)
        out = self.head(ids, positions, hidden, self.kv_caches, meta)
        next_hidden, logits_hidden = out.next_hidden, out.logits_hidden
        if last is not None:
            next_hidden, logits_hidden = next_hidden[last], logits_hidden[last]
        draft = self.head.compute_draft_logits(logits_hidden).argmax(dim=-1)
        return next_hidden, self.head.map_to_target(draft)
