"""The runner's persistent per-request state: one row per request, kept in numpy arrays so that
each step's inputs come from a few vectorized gathers instead of a loop over requests."""

from __future__ import annotations

from collections.abc import Collection
from typing import Optional

import numpy as np
import torch

from pagedserve.core.scheduler_output import NewRequestData
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.prompt_logprobs import PromptLogprobsPlan
from pagedserve.worker.sampler import SamplingMetadata, seed_generator

_GREEDY_EPS = 1e-5


class InputBatch:
    """Owns the rows: tokens known and computed, block table, and sampling parameters."""

    def __init__(
        self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int, vocab_size: int
    ) -> None:
        self.max_num_reqs = max_num_reqs
        self.vocab_size = vocab_size
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int32)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int32)
        self.num_computed = np.zeros(max_num_reqs, dtype=np.int32)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int32)
        # Per row: index of its newest token in the latest launched step's device output, or
        # -1. Its value reaches token_ids only when that step is collected.
        self.pending_idx = np.full(max_num_reqs, -1, dtype=np.int64)
        # Bumped each time a row is given to a request, so late results can tell it changed.
        self.serial = np.zeros(max_num_reqs, dtype=np.int64)
        self._next_serial = 0
        self.row_of: dict[str, int] = {}
        self.req_id_of: list[Optional[str]] = [None] * max_num_reqs
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))
        # Sampling parameters per row.
        self.temperature = np.ones(max_num_reqs, dtype=np.float32)
        self.top_k = np.zeros(max_num_reqs, dtype=np.int64)  # 0 = off
        self.top_p = np.ones(max_num_reqs, dtype=np.float32)
        self.min_p = np.zeros(max_num_reqs, dtype=np.float32)
        self.repetition_penalty = np.ones(max_num_reqs, dtype=np.float32)
        self.presence_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.frequency_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.num_logprobs = np.full(max_num_reqs, -1, dtype=np.int32)
        self.min_tokens = np.zeros(max_num_reqs, dtype=np.int32)
        self.generators: dict[int, torch.Generator] = {}
        self.seeds: dict[int, int] = {}  # row -> the request's seed
        self.banned_until_min: dict[int, list[int]] = {}  # row -> EOS/stop ids for min_tokens
        self._penalized_rows: set[int] = set()
        # The rarer per-request parameters, kept only for the rows that have them.
        self.disallowed: dict[int, torch.Tensor] = {}  # row -> [vocab] bool, on the device
        self.logit_bias: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row -> (ids, values)
        # row -> (tokens always banned: one-token bad words, longer words as (prefix, last))
        self.bad_words: dict[int, tuple[list[int], list[tuple[list[int], int]]]] = {}
        # Rows whose sampling reads the tokens generated so far (penalties, longer bad words).
        self._history_rows: set[int] = set()
        # prompt_logprobs: top-k per row (-1: none), the first prompt position still to score,
        # and the rows with positions still to score (a row leaves once it has scored them).
        self.num_prompt_logprobs = np.full(max_num_reqs, -1, dtype=np.int32)
        self.prompt_logprobs_from = np.zeros(max_num_reqs, dtype=np.int32)
        self.prompt_logprob_rows: set[int] = set()

    def add(self, req: NewRequestData, device: torch.device) -> int:
        row = self._free_rows.pop()
        self.row_of[req.req_id] = row
        self.req_id_of[row] = req.req_id
        self._next_serial += 1
        self.serial[row] = self._next_serial
        n = len(req.token_ids)
        self.token_ids[row, :n] = req.token_ids
        self.num_tokens[row] = n
        self.num_prompt_tokens[row] = req.num_prompt_tokens
        self.num_computed[row] = req.num_computed_tokens
        self.num_blocks[row] = 0
        self.append_blocks(row, req.block_ids)
        self.num_prompt_logprobs[row] = req.num_prompt_logprobs
        self.prompt_logprobs_from[row] = req.prompt_logprobs_from
        if req.num_prompt_logprobs >= 0 and req.prompt_logprobs_from < req.num_prompt_tokens - 1:
            self.prompt_logprob_rows.add(row)
        self._set_sampling(row, req, device)
        return row

    def _set_sampling(self, row: int, req: NewRequestData, device: torch.device) -> None:
        p: SamplingParams = req.sampling_params
        self.temperature[row] = p.temperature
        # Any top_k or min_tokens beyond the vocabulary or the context means the same as
        # those bounds, which the arrays hold.
        self.top_k[row] = min(p.top_k, self.vocab_size)
        self.top_p[row] = p.top_p
        self.min_p[row] = p.min_p
        self.repetition_penalty[row] = p.repetition_penalty
        self.presence_penalty[row] = p.presence_penalty
        self.frequency_penalty[row] = p.frequency_penalty
        self.num_logprobs[row] = -1 if p.logprobs is None else p.logprobs
        self.min_tokens[row] = min(p.min_tokens, self.token_ids.shape[1])
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            self._penalized_rows.add(row)
            self._history_rows.add(row)
        if p.min_tokens > 0 and req.eos_token_ids:
            self.banned_until_min[row] = sorted(req.eos_token_ids)
        if p.allowed_token_ids is not None:
            allowed = _to_device(np.asarray(p.allowed_token_ids, dtype=np.int64), device)
            self.disallowed[row] = torch.ones(
                self.vocab_size, dtype=torch.bool, device=device
            ).index_fill_(0, allowed, False)
        if p.logit_bias:
            self.logit_bias[row] = (
                np.fromiter(p.logit_bias.keys(), np.int64, len(p.logit_bias)),
                np.fromiter(p.logit_bias.values(), np.float32, len(p.logit_bias)),
            )
        if p.bad_words_token_ids:
            single = sorted({w[0] for w in p.bad_words_token_ids if len(w) == 1})
            longer = [(list(w[:-1]), w[-1]) for w in p.bad_words_token_ids if len(w) > 1]
            self.bad_words[row] = (single, longer)
            if longer:
                self._history_rows.add(row)
        if req.seed is not None:
            self.generators[row] = torch.Generator(device=device)
            self.seeds[row] = req.seed

    def _seed_generators(self, rows: np.ndarray) -> list[tuple[int, int]]:
        """Seeds each seeded row's generator for the token it samples next (see
        ``seed_generator``), so however many draws came before (drafts verified, failed tries)
        do not matter. Returns (index in ``rows``, row) of the seeded rows."""
        found = _rows_among(rows, self.generators)
        for _, row in found:
            seed_generator(self.generators[row], self.seeds[row], int(self.num_tokens[row]))
        return found

    def rewind_generators(self, rows: np.ndarray) -> None:
        """Puts the seeded generators of ``rows`` back to their state before the current
        step's draw, e.g. after a sampling call that failed."""
        self._seed_generators(rows)

    def remove(self, req_id: str) -> None:
        row = self.row_of.pop(req_id, None)
        if row is None:
            return
        self.req_id_of[row] = None
        self.pending_idx[row] = -1
        self.generators.pop(row, None)
        self.seeds.pop(row, None)
        self.banned_until_min.pop(row, None)
        self._penalized_rows.discard(row)
        self.disallowed.pop(row, None)
        self.logit_bias.pop(row, None)
        self.bad_words.pop(row, None)
        self._history_rows.discard(row)
        self.prompt_logprob_rows.discard(row)
        self._free_rows.append(row)

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks[row])
        self.block_table[row, start:start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    def reserve_sampled(self, rows: np.ndarray) -> np.ndarray:
        """Counts a token the device is sampling for each row; returns where each goes.
        Its value comes later, by ``fill_sampled``."""
        positions = self.num_tokens[rows].copy()
        self.num_tokens[rows] += 1
        self.pending_idx.fill(-1)
        self.pending_idx[rows] = np.arange(len(rows))
        return positions

    def write_drafts(self, rows: np.ndarray, drafts: np.ndarray) -> None:
        """Puts each row's drafts (``[n, k_max]``, -1 past a row's own) after its known tokens,
        where the step reads its inputs; they stay uncounted (``num_tokens``) until accepted."""
        self._write_runs(rows, self.num_tokens[rows], drafts)

    def _write_runs(self, rows: np.ndarray, starts: np.ndarray, runs: np.ndarray) -> None:
        """Writes each row's run of tokens (``runs[i]``: its tokens, then -1) from ``starts[i]``
        on."""
        row, j = np.nonzero(runs >= 0)
        self.token_ids[rows[row], starts[row] + j] = runs[row, j]

    def fill_sampled(
        self,
        rows: np.ndarray,
        positions: np.ndarray,
        serials: np.ndarray,
        tokens: np.ndarray,
        num_drafts: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """Writes a step's tokens (``[n, W]``: per row its emitted tokens, then -1) into the
        rows that still hold the request they were sampled for (``serials``: the rows' serial
        numbers then; a row reused since has a new one), and returns each row's count.

        ``reserve_sampled`` counted one token per row; a row that verified drafts
        (``num_drafts``) gains its other accepted tokens here, and its rejected drafts leave
        ``num_computed``."""
        same = self.serial[rows] == serials
        if tokens.shape[1] == 1:
            self.token_ids[rows[same], positions[same]] = tokens[same, 0]
            counts = np.ones(len(rows), dtype=np.int64)
        else:  # each row's tokens, then -1
            counts = (tokens >= 0).sum(axis=1)
            mine = rows[same]
            self._write_runs(mine, positions[same], tokens[same])
            self.num_tokens[mine] += (counts[same] - 1).astype(np.int32)
        if num_drafts is not None:
            self.num_computed[rows[same]] -= (num_drafts[same] - (counts[same] - 1)).astype(
                np.int32
            )
        return counts

    def overwrite_sampled(self, rows: np.ndarray, tokens: np.ndarray,
                          own_counts: np.ndarray) -> None:
        """Replaces what ``fill_sampled`` gave each of ``rows`` at the latest step (its
        ``own_counts`` tokens) by another rank's tokens of that step (``tokens``, as
        ``fill_sampled`` takes them: ``[n, W]``, per row its emitted tokens then -1), leaving
        the rows as that rank's ``fill_sampled`` left its own: the tokens, ``num_tokens``, and
        ``num_computed``, which a verification step rolled back by the drafts it rejected (one
        fewer for each token more that the other rank accepted)."""
        counts = (tokens >= 0).sum(axis=1).astype(np.int32)
        own_counts = own_counts.astype(np.int32)
        starts = self.num_tokens[rows] - own_counts
        self._write_runs(rows, starts, tokens)
        self.num_tokens[rows] = starts + counts
        self.num_computed[rows] += counts - own_counts

    def prompt_logprobs_plan(
        self, rows: np.ndarray, num_sched: np.ndarray
    ) -> Optional[PromptLogprobsPlan]:
        """The prompt positions this step computes that still owe logprobs, for the rows of
        ``prompt_logprob_rows`` among ``rows`` (the step's rows, in order, with their scheduled
        token counts); None if there are none. Call it before the
        step's tokens are counted as computed. Rows that score their last positions leave
        ``prompt_logprob_rows``."""
        found = _rows_among(rows, self.prompt_logprob_rows)
        if not found:
            return None
        idx = np.array([i for i, _ in found], dtype=np.int64)
        mine = rows[idx]
        computed = self.num_computed[mine].astype(np.int64)
        first = np.maximum(computed, self.prompt_logprobs_from[mine])
        end = np.minimum(computed + num_sched[idx], self.num_prompt_tokens[mine] - 1)
        counts = np.maximum(end - first, 0)
        for row in mine[end >= self.num_prompt_tokens[mine] - 1].tolist():
            self.prompt_logprob_rows.discard(row)
        keep = counts > 0
        if not keep.any():
            return None
        idx, mine, computed, first, counts = (
            a[keep] for a in (idx, mine, computed, first, counts)
        )
        owner = np.repeat(np.arange(len(mine)), counts)
        within = np.arange(int(counts.sum())) - (np.cumsum(counts) - counts)[owner]
        positions = first[owner] + within
        step_start = (np.cumsum(num_sched) - num_sched)[idx]
        return PromptLogprobsPlan(
            req_ids=[self.req_id_of[row] for row in mine.tolist()],
            first_positions=first.tolist(),
            counts=counts.tolist(),
            num_logprobs=self.num_prompt_logprobs[mine].tolist(),
            token_index=(step_start[owner] + positions - computed[owner]).astype(np.int64),
            targets=self.token_ids[mine[owner], positions + 1].astype(np.int64),
        )

    @property
    def needs_output_tokens(self) -> bool:
        """Whether sampling reads the tokens generated so far (penalties, bad words of more
        than one token), so that a step still in flight must be collected first."""
        return bool(self._history_rows)

    def sampling_metadata(self, rows: np.ndarray, device: torch.device) -> SamplingMetadata:
        """Tensors for the rows that sample this step, in batch order."""
        temperature = self.temperature[rows]
        greedy = temperature < _GREEDY_EPS
        all_greedy = bool(greedy.all())
        top_k = top_p = min_p = None
        if not all_greedy:
            k = self.top_k[rows]
            if k.any():
                top_k = _to_device(np.where(k > 0, k, self.vocab_size), device)
            p = self.top_p[rows]
            if (p < 1.0).any():
                top_p = _to_device(p, device)
            m = self.min_p[rows]
            if m.any():
                min_p = _to_device(m, device)
        seeded = self._seed_generators(rows)
        generators = {i: self.generators[row] for i, row in seeded}
        meta = SamplingMetadata(
            temperature=None if all_greedy else _to_device(temperature, device),
            all_greedy=all_greedy,
            all_random=not greedy.any(),
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            generators=generators,
            output_counts=None,
            seen_mask=None,
            repetition_penalty=None,
            presence_penalty=None,
            frequency_penalty=None,
            banned_rows=None,
            banned_tokens=None,
            max_num_logprobs=int(self.num_logprobs[rows].max()) if len(rows) else -1,
            generator_seeds={i: (self.seeds[row], int(self.num_tokens[row])) for i, row in seeded},
        )
        if self._penalized_rows:
            self._add_penalties(meta, rows, device)
        if self.banned_until_min or self.bad_words:
            self._add_bans(meta, rows, device)
        if self.disallowed:
            self._add_allowed(meta, rows, device)
        if self.logit_bias:
            self._add_logit_bias(meta, rows, device)
        return meta

    def _add_penalties(self, meta: SamplingMetadata, rows: np.ndarray, device: torch.device):
        n = len(rows)
        counts = np.zeros((n, self.vocab_size), dtype=np.int32)
        seen = np.zeros((n, self.vocab_size), dtype=bool)
        for i, row in _rows_among(rows, self._penalized_rows):
            prompt, total = self.num_prompt_tokens[row], self.num_tokens[row]
            np.add.at(counts[i], self.token_ids[row, prompt:total], 1)
            seen[i, self.token_ids[row, :total]] = True
        meta.output_counts = torch.from_numpy(counts).to(device)
        meta.seen_mask = torch.from_numpy(seen).to(device)
        meta.repetition_penalty = torch.from_numpy(self.repetition_penalty[rows]).to(device)
        meta.presence_penalty = torch.from_numpy(self.presence_penalty[rows]).to(device)
        meta.frequency_penalty = torch.from_numpy(self.frequency_penalty[rows]).to(device)

    def _add_bans(self, meta: SamplingMetadata, rows: np.ndarray, device: torch.device):
        ban_rows: list[int] = []
        ban_tokens: list[int] = []
        for i, row in _rows_among(rows, self.banned_until_min):
            tokens = self.banned_until_min[row]
            num_out = self.num_tokens[row] - self.num_prompt_tokens[row]
            if num_out < self.min_tokens[row]:
                ban_rows.extend([i] * len(tokens))
                ban_tokens.extend(tokens)
        for i, row in _rows_among(rows, self.bad_words):
            single, longer = self.bad_words[row]
            tokens = list(single)
            if longer:
                start, total = int(self.num_prompt_tokens[row]), int(self.num_tokens[row])
                longest = max(len(prefix) for prefix, _ in longer)
                recent = self.token_ids[row, max(start, total - longest):total].tolist()
                for prefix, last in longer:
                    if len(prefix) <= len(recent) and recent[len(recent) - len(prefix):] == prefix:
                        tokens.append(last)
            ban_rows.extend([i] * len(tokens))
            ban_tokens.extend(tokens)
        if ban_rows:
            meta.banned_rows = _to_device(np.array(ban_rows, dtype=np.int64), device)
            meta.banned_tokens = _to_device(np.array(ban_tokens, dtype=np.int64), device)

    def _add_allowed(self, meta: SamplingMetadata, rows: np.ndarray, device: torch.device):
        found = _rows_among(rows, self.disallowed)
        if found:
            meta.allowed_rows = _to_device(np.array([i for i, _ in found], np.int64), device)
            meta.disallowed = torch.stack([self.disallowed[row] for _, row in found])

    def _add_logit_bias(self, meta: SamplingMetadata, rows: np.ndarray, device: torch.device):
        found = _rows_among(rows, self.logit_bias)
        if found:
            entries = [self.logit_bias[row] for _, row in found]
            sizes = [len(ids) for ids, _ in entries]
            meta.bias_rows = _to_device(np.repeat([i for i, _ in found], sizes), device)
            meta.bias_tokens = _to_device(np.concatenate([ids for ids, _ in entries]), device)
            meta.bias_values = _to_device(np.concatenate([v for _, v in entries]), device)


def _rows_among(rows: np.ndarray, wanted: Collection[int]) -> list[tuple[int, int]]:
    """(index in ``rows``, row) for the rows in ``wanted``: the few that need per-row work,
    found without a Python loop over the whole batch."""
    if not wanted:
        return []
    (idx,) = np.isin(rows, np.fromiter(wanted, np.int64, len(wanted))).nonzero()
    return list(zip(idx.tolist(), rows[idx].tolist()))


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # Staged through pinned memory and not blocking: a blocking copy, or one from pageable
    # memory, may wait for the step still running on the device. (PyTorch's pinned-memory
    # cache keeps the staging buffer until the copy is done.)
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor
