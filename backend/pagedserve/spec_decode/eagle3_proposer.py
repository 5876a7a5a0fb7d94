"""EAGLE-3 proposer (``speculative_config`` method ``"eagle3"``): a one-layer head drafts from
the target's own features (models/eagle3.py), greedily (argmax over its draft vocabulary, mapped
to target ids: a point-mass draft, which the rejection sampler verifies losslessly whatever the
head predicts).

The target returns, beside its hidden states, the residual streams entering three of its layers
(``aux``, set_aux_hidden_state_layers). After every step, drafting or not, the head catches up:
for every position p the target computed whose next token is now known and whose input was an
actual token (not a rejected draft), it writes the KV it would store at p when fed
``token[p + 1]`` with ``fc(aux[p])``; only keys and values, no attention, MLP or logits, which
is cheap enough that while the adaptive controller drafts nothing the engine runs as if
speculation were off, yet the head's KV has no gaps when drafting resumes. Drafting then runs k
one-token head steps per row: the first at p = num_tokens - 2 (fed the last known token with
the target's features there) gives draft 0, each later one feeds the draft before with the
head's own ``next_hidden`` at the next position (N - 1, N, ...). Those steps' KV past N - 2 is
speculative: the target computes those positions in a later step and the catch-up then
overwrites it, so the head needs no record of which positions are valid, as a draft model
does. Positions past a row's blocks go to its scratch blocks (see paged_drafting).

The head runs eagerly, on the CPU and on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pagedserve.attention.layer import allocate_kv_caches, kv_cache_block_bytes
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
    drafter_attention,
    ragged_arange,
    time_drafting_steps,
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
        self.device, self.dtype = device, dtype
        self.block_size = bs = config.block_size
        self.kv_cache_dtype = kv_cache_dtype
        self.attn = drafter_attention(config, mc, device, kv_cache_dtype)
        self.head: Eagle3LlamaForCausalLM = load_eagle3_head(
            self.head_config, target, dtype, device, self.attn)
        use_dense_linears(self.head)  # as a draft model's: small matmuls, per-call costs
        target.set_aux_hidden_state_layers(self.head_config.aux_layer_ids)
        self.max_model_len = config.max_model_len
        self.scratch = ScratchBlocks.for_drafts(spec.num_speculative_tokens, bs)
        self.kv_caches: list[torch.Tensor] = []
        self.max_rows = config.max_num_seqs
        # After a drafting catch_up: per batch row, its index in _hidden (-1: nothing to draft
        # from), and fc of the target's features at its position num_tokens - 2.
        self._index = np.full(self.max_rows, -1, dtype=np.int64)
        self._hidden: Optional[torch.Tensor] = None

    # ---- KV cache ------------------------------------------------------------------------

    def bytes_per_block(self) -> int:
        mc = self.model_config
        return kv_cache_block_bytes(mc.num_kv_heads, mc.head_dim, mc.num_layers, self.block_size,
                                    self.kv_cache_dtype)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """The head's one layer of cache: the target's ``num_blocks`` block ids, then each
        batch row's scratch blocks (outside the KV budget)."""
        mc = self.model_config
        total = self.scratch.total_blocks(num_blocks, self.max_rows)
        self.kv_caches = allocate_kv_caches(mc.num_kv_heads, mc.head_dim, mc.num_layers, total,
                                            self.block_size, self.kv_cache_dtype, self.device)

    @torch.inference_mode()
    def time_steps(self, sizes: list[int]) -> list[tuple[int, float]]:
        """Start-up timings of a drafting step over n requests, n in ``sizes`` (see
        paged_drafting.time_drafting_steps)."""
        width = self.model_config.hidden_size

        def step(positions: np.ndarray, table: np.ndarray) -> None:
            n = len(positions)
            steps = DecodeSteps(positions, table, self.block_size, self.device)
            steps.meta.slot_mapping.fill_(-1)  # writes nothing
            self._forward(torch.zeros(n, dtype=torch.int64, device=self.device),
                          torch.zeros(n, width, dtype=self.dtype, device=self.device), steps)

        return time_drafting_steps(step, sizes, self.max_model_len, self.kv_caches[0].shape[1],
                                   self.block_size, self.device)

    # ---- catch-up ------------------------------------------------------------------------

    @torch.inference_mode()
    def catch_up(self, batch: PagedBatch, step: StepFeatures, drafting: bool) -> None:
        """Writes the head's KV at every position of ``step`` whose next token ``batch`` now
        knows. ``drafting``: except, for each row whose known tokens it reached, the last one
        (num_tokens - 2), whose features it keeps: the drafting steps start there."""
        self._index[:] = -1
        self._hidden = None
        alive = batch.serial[step.rows] == step.serials
        num_tokens = batch.num_tokens[step.rows].astype(np.int64)
        ends = np.minimum(step.starts + step.query_lens, num_tokens - 1)
        fed = np.where(alive, np.clip(ends - step.starts, 0, None), 0)
        (keep,) = np.nonzero(fed > 0)
        if not len(keep):
            return
        rows, starts, ends, fed = step.rows[keep], step.starts[keep], ends[keep], fed[keep]
        flat = np.repeat((np.cumsum(step.query_lens) - step.query_lens)[keep], fed)
        offsets = ragged_arange(fed)
        positions = np.repeat(starts, fed) + offsets
        owner = np.repeat(np.arange(len(rows)), fed)
        reached = ends == num_tokens[keep] - 1
        write = ~(drafting & reached[owner] & (positions == ends[owner] - 1))
        if drafting and reached.any():
            self._index[rows[reached]] = np.arange(int(reached.sum()))
            last = torch.from_numpy(flat[~write] + offsets[~write]).to(self.device)
            self._hidden = self.head.combine_hidden_states(step.aux[last])
        if not write.any():
            return
        positions, flat, owner = positions[write], flat[write] + offsets[write], owner[write]
        rows_w = rows[owner]
        ids = torch.from_numpy(batch.token_ids[rows_w, positions + 1].astype(np.int64))
        bs = self.block_size
        # Every position written lies below the row's num_tokens - 1: in its own blocks.
        slots = batch.block_table[rows_w, positions // bs].astype(np.int64) * bs + positions % bs
        device = self.device
        features = step.aux[torch.from_numpy(flat).to(device)]
        self.head.write_kv(ids.to(device), torch.from_numpy(positions).to(device),
                           self.head.combine_hidden_states(features), self.kv_caches,
                           torch.from_numpy(slots).to(device))

    # ---- proposing -----------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, batch: PagedBatch, rows: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` greedy drafts for each of ``rows``, from the state the last drafting
        catch_up left (a row it did not reach gets none): k one-token head steps, the first at
        num_tokens - 2 feeding the last known token with the target's features there, each
        later one the draft before with the head's own next_hidden."""
        n = len(rows)
        drafts = np.full((n, k), PLACEHOLDER_TOKEN_ID, dtype=np.int64)
        counts = np.zeros(n, dtype=np.int64)
        if n == 0 or k <= 0:
            return drafts, counts
        rows = np.asarray(rows, dtype=np.int64)
        index = self._index[rows]
        num_tokens = batch.num_tokens[rows].astype(np.int64)
        alloc_end = batch.num_blocks[rows].astype(np.int64) * self.block_size
        # Draft j goes to position N + j (below max_model_len); step j writes position
        # N - 2 + j, in the row's blocks or its scratch.
        k_rows = np.minimum(k, self.max_model_len - num_tokens)
        k_rows = np.minimum(k_rows, alloc_end + self.scratch.per_row * self.block_size
                            - num_tokens + 2)
        active = (index >= 0) & (k_rows > 0)
        if not active.any():
            return drafts, counts
        rows_a, index, num_tokens, k_rows = (a[active] for a in (rows, index, num_tokens,
                                                                 k_rows))
        device = self.device
        hidden = self._hidden[torch.from_numpy(index).to(device)]
        table = self.scratch.block_table(batch, rows_a, num_tokens + k_rows - 3,
                                         self.block_size)
        out = torch.empty(len(rows_a), k + 1, dtype=torch.int64, device=device)
        out[:, 0] = torch.from_numpy(batch.token_ids[rows_a, num_tokens - 1].astype(np.int64))
        steps: Optional[DecodeSteps] = None
        for j in range(k):
            (sel,) = np.nonzero(k_rows > j)
            if not len(sel):
                break
            # The rows left only shrink: the same count is the same rows, one position on.
            if steps is None or len(sel) != len(steps.positions):
                steps = DecodeSteps(num_tokens[sel] + (j - 2), table[sel], self.block_size,
                                    device)
            else:
                steps.advance()
            if len(sel) == len(rows_a):
                hidden, out[:, j + 1] = self._forward(out[:, j].contiguous(), hidden, steps)
            else:
                sel_t = torch.from_numpy(sel).to(device)
                hidden_j, out[sel_t, j + 1] = self._forward(out[sel_t, j], hidden[sel_t],
                                                            steps)
                hidden[sel_t] = hidden_j
        host = out[:, 1:].cpu().numpy()
        drafts[active] = np.where(np.arange(k)[None, :] < k_rows[:, None], host,
                                  PLACEHOLDER_TOKEN_ID)
        counts[active] = k_rows
        return drafts, counts

    def _forward(self, ids: torch.Tensor, hidden: torch.Tensor,
                 steps: DecodeSteps) -> tuple[torch.Tensor, torch.Tensor]:
        """One one-token head step; each row's next_hidden and draft (a target id)."""
        self.attn.prepare(steps.meta)
        out = self.head(ids, steps.positions_t, hidden, self.kv_caches, steps.meta)
        draft = self.head.compute_draft_logits(out.logits_hidden).argmax(dim=-1)
        return out.next_hidden, self.head.map_to_target(draft)
