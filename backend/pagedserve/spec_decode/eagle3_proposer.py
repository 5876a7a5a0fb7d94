"""EAGLE-3 proposer (``speculative_config`` method ``"eagle3"``): a one-layer head drafts from
the target's own features (models/eagle3.py), greedily (argmax over its draft vocabulary, mapped
to target ids: a point-mass draft, which the rejection sampler verifies losslessly whatever the
head predicts).

The target returns, beside its hidden states, the residual streams entering three of its layers
(``aux``, set_aux_hidden_state_layers). Drafting at position N - 2 (fed the last known token with
the target's features there) needs the head's KV at the positions before it: at each position p
the KV the head would store when fed ``token[p + 1]`` with ``fc(aux[p])`` (the catch-up, only
keys and values: no attention, MLP or logits). The head catches up after a step only when the
engine drafts after it. While the controller drafts nothing the head is dormant: each step only
copies the aux of its positions into a per-row ring of the last ``ring_size`` positions (no
matmul), so that a speculative engine that does not draft costs what a plain one does. When
drafting resumes, the head writes the positions since its KV's end from the ring, which holds
them all after a short pause (the KV then has no gap, as if it had never paused); after a longer
one, it restarts from a window: from the first block boundary the ring still covers, at least
``_WINDOW`` positions before N - 2, and each of the row's drafting steps attends from there on
(DecodeSteps' context_start) instead of to the stale or missing keys before. An EAGLE head
leans on its recent context and the target's features, so the drafts change little (the
shipped head, k 3, batch 1, held-out code: a restart before every drafting step, the worst
case, took the mean acceptance length from 1.97 to 1.90), and they are verified losslessly
whatever they are. A request new to a
row (a new one, or one resumed after preemption) starts its context at its first position the
target computes: blocks reused from the prefix cache may hold no head KV (their request's head
may have been dormant).

Drafting runs k one-token head steps per row: the first at p = N - 2 gives draft 0, each later
one feeds the draft before with the head's own ``next_hidden`` at the next position (N - 1, N,
...). Those steps' KV past N - 2 is speculative: the target computes those positions in a later
step and the next catch-up overwrites it, so the head records only where its valid KV ends.
Positions past a row's blocks go to its scratch blocks (see paged_drafting).

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

# After a pause longer than its ring holds, the head drafts from at least this many positions
# of context (see the module docstring).
_WINDOW = 32


@dataclass
class StepFeatures:
    """What a target step leaves for the head: the rows it computed (in its token order), each
    row's first position and token count, the rows' serials then, the block ids the target
    wrote, and ``aux``, the target's features of the step's flat tokens ``[tokens, 3 * hidden]``
    on the device."""

    rows: np.ndarray
    starts: np.ndarray
    query_lens: np.ndarray
    serials: np.ndarray
    blocks: np.ndarray
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

    # Forwards of the head per proposing call beyond its k drafting steps: the catch-up over
    # the positions the last step accepted (the speculation controller prices calls by it).
    EXTRA_FORWARDS = 1

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
            self.head_config, target, target_config.path, dtype, device, self.attn)
        use_dense_linears(self.head)  # as a draft model's: small matmuls, per-call costs
        target.set_aux_hidden_state_layers(self.head_config.aux_layer_ids)
        self.max_model_len = config.max_model_len
        self.scratch = ScratchBlocks.for_drafts(spec.num_speculative_tokens, bs)
        self.kv_caches: list[torch.Tensor] = []
        # Per target block id: whether the head's KV there holds the keys and values of the
        # target's tokens in it (written while the head drafted; not while it was dormant), so
        # that a request that finds the block in the prefix cache, or an n > 1 sibling that
        # shares it, may attend to it.
        self.block_valid = np.zeros(0, dtype=bool)
        self.max_rows = config.max_num_seqs
        # After a drafting catch_up: per batch row, its index in _hidden (-1: nothing to draft
        # from), and fc of the target's features at its position num_tokens - 2.
        self._index = np.full(self.max_rows, -1, dtype=np.int64)
        self._hidden: Optional[torch.Tensor] = None
        # Per batch row: the serial its state belongs to; its head KV holds the row's actual
        # tokens at positions [kv_start, kv_end) (kv_start a block boundary: where its
        # drafting steps' attention starts); the ring holds the target's aux at positions
        # [ring_start, ring_end), position p at slot p % ring_size.
        self.serial = np.full(self.max_rows, -1, dtype=np.int64)
        self.kv_start = np.zeros(self.max_rows, dtype=np.int64)
        self.kv_end = np.zeros(self.max_rows, dtype=np.int64)
        self.ring_start = np.zeros(self.max_rows, dtype=np.int64)
        self.ring_end = np.zeros(self.max_rows, dtype=np.int64)
        # Room for a window of _WINDOW positions from a block boundary; allocated here, so
        # that a device's memory profile counts it.
        self.ring_size = _WINDOW + bs - 1
        self._ring = torch.zeros(self.max_rows * self.ring_size, self.head.fc.input_size,
                                 dtype=dtype, device=device)

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
        self.block_valid = np.zeros(num_blocks, dtype=bool)
        self.serial.fill(-1)

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

    def step_features(self, batch: PagedBatch, rows: np.ndarray, num_scheduled: np.ndarray,
                      slots: np.ndarray, aux: torch.Tensor) -> StepFeatures:
        """A target step's features, as it is launched (``batch`` before the step; ``slots``:
        the KV slot of each of its tokens)."""
        # The slots name the blocks the target writes, with no ragged walk of the block table.
        return StepFeatures(rows, batch.num_computed[rows].astype(np.int64),
                            num_scheduled.astype(np.int64), batch.serial[rows],
                            slots // self.block_size, aux)

    @torch.inference_mode()
    def catch_up(self, batch: PagedBatch, step: StepFeatures, drafting: bool) -> None:
        """Takes a target step's features for every position of ``step`` whose next token
        ``batch`` now knows. Dormant (``drafting`` False): only keeps their aux in the ring.
        Drafting: first brings the head's KV of each of the step's rows up to its last known
        position (from the ring, or from a window: see the module docstring), except, for each
        row whose known tokens it reached, the last one (num_tokens - 2), whose features it
        keeps: the drafting steps start there."""
        self._index[:] = -1
        self._hidden = None
        # The target wrote these blocks: the head's KV there is stale until it writes it too.
        self.block_valid[step.blocks] = False
        num_tokens = batch.num_tokens[step.rows].astype(np.int64)
        ends = np.minimum(step.starts + step.query_lens, num_tokens - 1)
        # A row still of the request it computed for, with a position whose next token is known.
        (keep,) = np.nonzero((batch.serial[step.rows] == step.serials) & (ends > step.starts))
        if not len(keep):
            return
        rows, starts, ends = step.rows[keep], step.starts[keep], ends[keep]
        first = (np.cumsum(step.query_lens) - step.query_lens)[keep]  # flat index of starts
        fresh = self._adopt(rows, step.serials[keep], starts)
        if drafting:
            self._write(batch, rows, starts, ends, first, ends == num_tokens[keep] - 1,
                        step.aux)
            self._mark_valid(batch, rows, self.kv_start[rows], ends)
        # After the writes: an n > 1 sibling may share blocks its first row wrote just now.
        self._extend_back(batch, rows[fresh], starts[fresh])
        self._retain(rows, starts, ends, first, step.aux)

    def _adopt(self, rows: np.ndarray, serials: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Resets the rows handed to another request (returned, as a mask): the head's KV
        starts and ends at the step's first position, and so does the ring. Likewise a ring
        that does not reach up to this step."""
        fresh = self.serial[rows] != serials
        new = rows[fresh]
        self.serial[new] = serials[fresh]
        self.kv_start[new] = self.kv_end[new] = starts[fresh]
        gap = self.ring_end[rows] != starts
        self.ring_start[rows[gap]] = self.ring_end[rows[gap]] = starts[gap]
        self.kv_end[rows] = np.minimum(self.kv_end[rows], starts)
        return fresh

    def _extend_back(self, batch: PagedBatch, rows: np.ndarray, starts: np.ndarray) -> None:
        """Starts the head's context of rows new to their request at the first of the blocks
        before their first position that all hold valid head KV (a prefix-cache hit's, an n > 1
        sibling's)."""
        bs = self.block_size
        for row, start in zip(rows.tolist(), starts.tolist()):  # once per request
            valid = self.block_valid[batch.block_table[row, :start // bs]]
            if start % bs == 0 and valid.size:
                run = int(np.argmin(valid[::-1])) if not valid.all() else valid.size
                self.kv_start[row] = start - run * bs

    def _mark_valid(self, batch: PagedBatch, rows: np.ndarray, lo: np.ndarray,
                    hi: np.ndarray) -> None:
        """Marks the rows' blocks that hold a position in [lo, hi) valid where the head's KV
        covers them whole."""
        bs = self.block_size
        first = np.maximum(lo // bs, -(-self.kv_start[rows] // bs))
        count = np.clip(np.minimum((hi - 1) // bs + 1, self.kv_end[rows] // bs) - first, 0, None)
        owner = np.repeat(np.arange(len(rows)), count)
        self.block_valid[batch.block_table[rows[owner], first[owner] + ragged_arange(count)]] = True

    def _retain(self, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                first: np.ndarray, aux: torch.Tensor) -> None:
        """Copies the aux of each row's last ``ring_size`` positions of the step into its
        ring."""
        size = self.ring_size
        begin = np.maximum(starts, ends - size)
        count = ends - begin
        owner = np.repeat(np.arange(len(rows)), count)
        positions = np.repeat(begin, count) + ragged_arange(count)
        source = first[owner] + positions - starts[owner]
        target = rows[owner] * size + positions % size
        device = self.device
        # index_copy_ and index_select: a third cheaper than indexing with tensors, per step.
        self._ring.index_copy_(0, torch.from_numpy(target).to(device),
                               aux.index_select(0, torch.from_numpy(source).to(device)))
        self.ring_end[rows] = ends
        self.ring_start[rows] = np.maximum(self.ring_start[rows], ends - size)

    def _write(self, batch: PagedBatch, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               first: np.ndarray, reached: np.ndarray, aux: torch.Tensor) -> None:
        """Writes the head's KV of each row from its KV's end up to ``ends`` (the last one
        left to the drafting steps where ``reached``): the positions before the step from the
        ring, the step's own from ``aux``; restarts a row from a window where the ring no
        longer holds its KV's end."""
        bs, size = self.block_size, self.ring_size
        begin = self.kv_end[rows]
        restart = begin < self.ring_start[rows]
        if restart.any():
            # The first block boundary the ring covers: it holds more than a block, so the
            # window reaches N - 2.
            window = -(-self.ring_start[rows[restart]] // bs) * bs
            # (Below the last position only if the ring does not reach up to the step, which
            # _adopt rules out for a row's steps in order; its keys before are then stale.)
            window = np.minimum(window, (ends[restart] - 1) // bs * bs)
            begin[restart] = self.kv_start[rows[restart]] = window
        write_end = ends - reached
        count = np.clip(write_end - begin, 0, None)
        self.kv_end[rows] = np.maximum(begin, write_end)
        device = self.device
        if reached.any():
            self._index[rows[reached]] = np.arange(int(reached.sum()))
            last = torch.from_numpy(first[reached] + ends[reached] - 1 - starts[reached])
            self._hidden = self.head.combine_hidden_states(aux[last.to(device)])
        if not count.any():
            return
        owner = np.repeat(np.arange(len(rows)), count)
        positions = np.repeat(begin, count) + ragged_arange(count)
        rows_w = rows[owner]
        in_step = positions >= starts[owner]
        features = torch.empty(len(positions), aux.shape[1], dtype=aux.dtype, device=device)
        if in_step.any():
            source = first[owner[in_step]] + positions[in_step] - starts[owner[in_step]]
            features[torch.from_numpy(np.nonzero(in_step)[0]).to(device)] = aux[
                torch.from_numpy(source).to(device)]
        if not in_step.all():
            ring = rows_w[~in_step] * size + positions[~in_step] % size
            features[torch.from_numpy(np.nonzero(~in_step)[0]).to(device)] = self._ring[
                torch.from_numpy(ring).to(device)]
        ids = torch.from_numpy(batch.token_ids[rows_w, positions + 1].astype(np.int64))
        # Every position written lies below the row's num_tokens - 1: in its own blocks.
        slots = batch.block_table[rows_w, positions // bs].astype(np.int64) * bs + positions % bs
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
        context_start = self.kv_start[rows_a]
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
                                    device, context_start[sel])
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
        self.kv_end[rows_a] = num_tokens - 1  # the first step wrote N - 2's actual KV
        self._mark_valid(batch, rows_a, num_tokens - 2, num_tokens - 1)
        return drafts, counts

    def _forward(self, ids: torch.Tensor, hidden: torch.Tensor,
                 steps: DecodeSteps) -> tuple[torch.Tensor, torch.Tensor]:
        """One one-token head step; each row's next_hidden and draft (a target id)."""
        self.attn.prepare(steps.meta)
        out = self.head(ids, steps.positions_t, hidden, self.kv_caches, steps.meta)
        draft = self.head.compute_draft_logits(out.logits_hidden).argmax(dim=-1)
        return out.next_hidden, self.head.map_to_target(draft)
