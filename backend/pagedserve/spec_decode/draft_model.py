"""Draft-model proposer (``speculative_config`` method ``"draft_model"``): a second, small causal
LM over the target's vocabulary drafts k tokens greedily (argmax: a point-mass draft, which the
rejection sampler verifies losslessly whatever the draft predicts).

KV cache. The draft keeps its own per-layer caches, addressed by the target's block tables: the
same block ids and block size, so the scheduler's allocation, preemption and prefix caching
cover both models. The draft's caches hold the target's ``num_blocks`` blocks plus a few
scratch blocks per batch row (below).

Which draft positions are valid. Per row the proposer tracks ``computed``: the positions whose
draft KV holds the row's actual tokens. It is reset when the row's ``serial`` changes (a new or
resumed request: the blocks' draft KV, even of prefix-cache hits, was written for another
request or not at all). Drafting k tokens feeds the known tokens from ``computed`` on (a
per-row chunk; chunks of several rows run batched with varying query lengths), takes the argmax
at each row's last position as draft 0, then runs k - 1 one-token steps that feed the row's own
drafts. Those fed drafts are remembered; at the next call the positions whose fed draft turned
out to be the actual token stay valid, the rest are recomputed (their KV is overwritten).

Room. Drafting writes KV up to position ``num_tokens + k - 2``, which may lie past the row's
blocks: those positions go to the row's scratch blocks (see paged_drafting), and ``computed``
never counts them, so the next call recomputes them in real blocks.

Graphs. On CUDA (where the target's decode graphs are used) the k - 1 one-token steps replay
the draft's own CUDA graphs (draft_graphs); its catch-up, whose shape follows the chunks, runs
eagerly, as everything does on the CPU.
"""

from __future__ import annotations

from typing import Optional, Protocol

import numpy as np
import torch

from pagedserve.attention.base import AttentionMetadata
from pagedserve.attention.layer import allocate_kv_caches, kv_cache_block_bytes
from pagedserve.config import EngineConfig
from pagedserve.models.hub import resolve_checkpoint
from pagedserve.models.loader import load_model
from pagedserve.models.model_config import ModelConfig
from pagedserve.models.registry import model_class
from pagedserve.spec_decode.ngram_proposer import PLACEHOLDER_TOKEN_ID
from pagedserve.spec_decode.paged_drafting import (
    DecodeSteps,
    PagedBatch,
    ScratchBlocks,
    drafter_attention,
    ragged_arange,
    ragged_metadata,
    time_drafting_steps,
    use_dense_linears,
)


def load_draft_config(
    name: str, target: ModelConfig, max_model_len: int, *,
    download_dir: Optional[str] = None, trust_remote_code: bool = False,
) -> ModelConfig:
    """The draft checkpoint's config, checked against the target's; a draft that cannot serve
    is a ValueError naming speculative_config 'model'."""

    def bad(why: str) -> ValueError:
        return ValueError(f"speculative_config 'model' ({name!r}) {why}")

    try:
        path = resolve_checkpoint(name, what="speculative_config 'model'",
                                  download_dir=download_dir)
        draft = ModelConfig.from_pretrained(path, trust_remote_code)
        model_class(draft.architecture)
    except ValueError as e:
        raise bad(f"cannot serve as a draft model: {e}") from None
    if draft.vocab_size != target.vocab_size:
        raise bad(f"has vocab_size {draft.vocab_size}, the target model {target.vocab_size}: "
                  "a draft model must share the target's vocabulary")
    limit = draft.max_position_embeddings
    if draft.sliding_window:
        limit = min(limit, draft.sliding_window)
    if limit < max_model_len:
        raise bad(f"serves {limit} positions (max_position_embeddings / sliding_window), fewer "
                  f"than max_model_len ({max_model_len}); lower max_model_len")
    return draft


class DecodeGraphs(Protocol):
    """Replays a drafter's one-token steps (worker.draft_graphs.DraftDecodeGraphs)."""

    def holds(self, num_rows: int) -> bool: ...

    def run(self, ids: torch.Tensor, positions: np.ndarray,
            table: np.ndarray) -> torch.Tensor: ...


class DraftModelProposer:
    """Owns the draft model, its attention backend, its per-layer KV caches (on the target's
    block ids, plus per-row scratch blocks) and, per batch row, which positions of those caches
    hold the row's tokens (see the module docstring). Implements the runner's Proposer."""

    # Forwards per proposing call beyond its k drafting steps: none, the first drafting
    # forward also takes the tokens the last step accepted.
    EXTRA_FORWARDS = 0

    def __init__(
        self,
        config: EngineConfig,
        target: ModelConfig,
        dtype: torch.dtype,
        kv_cache_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        spec = config.speculative
        assert spec is not None and spec.model is not None
        args = config.args
        self.model_config = mc = load_draft_config(
            spec.model, target, config.max_model_len,
            download_dir=args.download_dir, trust_remote_code=args.trust_remote_code,
        )
        self.device = device
        self.block_size = bs = config.block_size
        self.kv_cache_dtype = kv_cache_dtype
        self.attn = drafter_attention(config, mc, device, kv_cache_dtype)
        self.model = load_model(mc, dtype, device, self.attn, mc.quant_config)
        use_dense_linears(self.model)
        self.max_model_len = config.max_model_len
        # The runner's, on CUDA: graphs of the one-token drafting steps (worker/draft_graphs).
        self.graphs: Optional[DecodeGraphs] = None
        # The draft's catch-up forwards stay within the target's largest step, which the
        # memory profile measured.
        self.max_tokens_per_forward = config.max_num_batched_tokens
        max_rows = config.max_num_seqs
        max_drafts = spec.num_speculative_tokens
        self.scratch = ScratchBlocks.for_drafts(max_drafts, bs)
        self.kv_caches: list[torch.Tensor] = []
        # Per batch row: the serial its state belongs to, its valid positions, and the drafts
        # it fed at positions fed_start.. (not yet known to be the actual tokens).
        self.serial = np.full(max_rows, -1, dtype=np.int64)
        self.computed = np.zeros(max_rows, dtype=np.int64)
        self.fed = np.zeros((max_rows, max(max_drafts - 1, 1)), dtype=np.int64)
        self.fed_start = np.zeros(max_rows, dtype=np.int64)
        self.num_fed = np.zeros(max_rows, dtype=np.int64)

    # ---- KV cache ------------------------------------------------------------------------

    def bytes_per_block(self) -> int:
        mc = self.model_config
        return kv_cache_block_bytes(mc.num_kv_heads, mc.head_dim, mc.num_layers, self.block_size,
                                    self.kv_cache_dtype)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """The draft's caches: the target's ``num_blocks`` block ids, then each batch row's
        scratch blocks (outside the KV budget: ``max_num_seqs * ceil(k / block_size)`` draft
        blocks)."""
        mc = self.model_config
        total = self.scratch.total_blocks(num_blocks, len(self.serial))
        self.kv_caches = allocate_kv_caches(mc.num_kv_heads, mc.head_dim, mc.num_layers, total,
                                            self.block_size, self.kv_cache_dtype, self.device)
        self.serial.fill(-1)

    @torch.inference_mode()
    def time_steps(self, sizes: list[int]) -> list[tuple[int, float]]:
        """Start-up timings of a drafting step over n requests, n in ``sizes`` (see
        paged_drafting.time_drafting_steps)."""
        def step(positions: np.ndarray, table: np.ndarray) -> None:
            n = len(positions)
            self._greedy_last(torch.zeros(n, dtype=torch.int64, device=self.device), positions,
                              table, np.ones(n, dtype=np.int64), positions + 1, write=False)

        return time_drafting_steps(step, sizes, self.max_model_len, self.kv_caches[0].shape[1],
                                   self.block_size, self.device)

    # ---- proposing -----------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, batch: PagedBatch, rows: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` greedy drafts for each of ``rows`` (every token of those rows known)."""
        n = len(rows)
        drafts = np.full((n, k), PLACEHOLDER_TOKEN_ID, dtype=np.int64)
        counts = np.zeros(n, dtype=np.int64)
        if n == 0 or k <= 0:
            return drafts, counts
        rows = np.asarray(rows, dtype=np.int64)
        start = self._valid_positions(batch, rows)
        num_tokens = batch.num_tokens[rows].astype(np.int64)
        alloc_end = batch.num_blocks[rows].astype(np.int64) * self.block_size
        # Drafts past max_model_len could never be verified; the last position written,
        # num_tokens + k - 2, must lie in the row's blocks or its scratch.
        k_rows = np.minimum(k, self.max_model_len - num_tokens)
        k_rows = np.minimum(k_rows, alloc_end + self.scratch.per_row * self.block_size
                            - num_tokens + 1)
        active = k_rows > 0
        if not active.any():
            return drafts, counts
        rows_a, start, num_tokens, alloc_end, k_rows = (
            a[active] for a in (rows, start, num_tokens, alloc_end, k_rows)
        )
        table = self.scratch.block_table(batch, rows_a, num_tokens + k_rows - 2, self.block_size)
        out = torch.empty(len(rows_a), k, dtype=torch.int64, device=self.device)
        out[:, 0] = self._catch_up(batch, rows_a, start, num_tokens, table)
        steps: Optional[DecodeSteps] = None
        # The rows left only shrink: if a graph holds them all, one holds every step.
        graphs = self.graphs
        if graphs is not None and not graphs.holds(len(rows_a)):
            graphs = None
        for j in range(1, k):
            (sel,) = np.nonzero(k_rows > j)
            if not len(sel):
                break
            every = len(sel) == len(rows_a)
            sel_t = None if every else torch.from_numpy(sel).to(self.device)
            ids = out[:, j - 1].contiguous() if every else out[sel_t, j - 1]
            if graphs is not None:
                hidden = graphs.run(ids, num_tokens[sel] + (j - 1), table[sel])
                greedy = self.model.compute_logits(hidden).argmax(dim=-1)
            else:
                # The same count is the same rows (their room or max_model_len ends), one
                # position on.
                if steps is None or len(sel) != len(steps.positions):
                    steps = DecodeSteps(num_tokens[sel] + (j - 1), table[sel],
                                        self.block_size, self.device)
                else:
                    steps.advance()
                greedy = self._greedy(ids, steps.positions_t, steps.meta)
            if every:
                out[:, j] = greedy
            else:
                out[sel_t, j] = greedy
        host = out.cpu().numpy()
        drafts[active] = np.where(np.arange(k)[None, :] < k_rows[:, None], host,
                                  PLACEHOLDER_TOKEN_ID)
        counts[active] = k_rows
        # Fed: the known tokens, then drafts 0..k-2 at num_tokens.. ; only positions inside
        # the row's own blocks are kept (the next call checks the drafts among them).
        width = min(k - 1, self.fed.shape[1])
        num_fed = np.clip(np.minimum(num_tokens + k_rows - 1, alloc_end) - num_tokens, 0, width)
        self.computed[rows_a] = np.minimum(num_tokens, alloc_end) + num_fed
        self.fed_start[rows_a] = num_tokens
        self.num_fed[rows_a] = num_fed
        if width > 0:
            self.fed[rows_a, :width] = host[:, :width]
        return drafts, counts

    def _valid_positions(self, batch: PagedBatch, rows: np.ndarray) -> np.ndarray:
        """Each row's count of leading positions whose draft KV holds its actual tokens, after
        resetting rows handed to a new request and checking the drafts fed last time."""
        serial = batch.serial[rows]
        fresh = self.serial[rows] != serial
        if fresh.any():
            new = rows[fresh]
            self.serial[new] = serial[fresh]
            self.computed[new] = 0
            self.num_fed[new] = 0
        (pending,) = np.nonzero(self.num_fed[rows] > 0)
        if len(pending):
            r = rows[pending]
            offsets = np.arange(self.fed.shape[1])
            positions = self.fed_start[r][:, None] + offsets[None, :]
            known = (offsets[None, :] < self.num_fed[r][:, None]) & (
                positions < batch.num_tokens[r][:, None])
            actual = batch.token_ids[r[:, None], np.minimum(positions, self.max_model_len - 1)]
            matched = np.cumprod(known & (actual == self.fed[r]), axis=1).sum(axis=1)
            self.computed[r] = self.fed_start[r] + matched
            self.num_fed[r] = 0
        # At least the last known token is fed: its logits give draft 0.
        self.computed[rows] = np.minimum(self.computed[rows], batch.num_tokens[rows] - 1)
        return self.computed[rows].copy()

    def _catch_up(self, batch: PagedBatch, rows: np.ndarray, start: np.ndarray,
                  end: np.ndarray, table: np.ndarray) -> torch.Tensor:
        """Feeds each row's known tokens ``[start, end)`` and returns the argmax after each
        row's last one. A chunk larger than one forward allows (a prompt the target prefilled
        in chunks) is fed over several forwards, the first rows first."""
        first = torch.empty(len(rows), dtype=torch.int64, device=self.device)
        done = start.copy()
        budget = self.max_tokens_per_forward
        while True:
            (todo,) = np.nonzero(done < end)
            if not len(todo):
                return first
            remaining = end[todo] - done[todo]
            take = np.clip(budget - (np.cumsum(remaining) - remaining), 0, remaining)
            sel, take = todo[take > 0], take[take > 0]
            owner = np.repeat(np.arange(len(sel)), take)
            positions = done[sel][owner] + ragged_arange(take)
            ids = torch.from_numpy(
                batch.token_ids[rows[sel][owner], positions].astype(np.int64)
            ).to(self.device)
            finish = done[sel] + take == end[sel]
            greedy = self._greedy_last(ids, positions, table[sel], take, done[sel] + take)
            first[torch.from_numpy(sel[finish]).to(self.device)] = greedy[
                torch.from_numpy(finish).to(self.device)]
            done[sel] += take

    def _greedy_last(self, ids: torch.Tensor, positions: np.ndarray, table: np.ndarray,
                     query_lens: np.ndarray, seq_lens: np.ndarray,
                     write: bool = True) -> torch.Tensor:
        """One draft forward over a ragged batch (row i: ``query_lens[i]`` tokens ending at
        context length ``seq_lens[i]``); the argmax at each row's last token. ``write=False``
        keeps the new keys and values out of the caches (a timing run)."""
        device = self.device
        meta, last = ragged_metadata(positions, table, query_lens, seq_lens, self.block_size,
                                     device)
        if not write:
            meta.slot_mapping.fill_(-1)
        ragged = len(positions) > len(query_lens)  # some row fed several tokens: its last one
        return self._greedy(ids, torch.from_numpy(positions).to(device), meta,
                            torch.from_numpy(last).to(device) if ragged else None)

    def _greedy(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                last: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One draft forward; the argmax at each of ``last`` (default: every token)."""
        self.attn.prepare(meta)
        hidden = self.model(ids, positions, self.kv_caches, meta)
        if last is not None:
            hidden = hidden[last]
        return self.model.compute_logits(hidden).argmax(dim=-1)

