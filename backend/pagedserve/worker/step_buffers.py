"""Per-step input tensors, allocated once."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


class StepBuffers:
    """Owns the flattened batch's inputs: a host side (pinned on CUDA, so copies are async)
    written through numpy views, and a device side that the model reads. On the CPU the two
    are the same memory. CUDA graphs are captured on slices of the device side, so a replay
    needs no copies of its own."""

    def __init__(
        self,
        max_tokens: int,
        max_reqs: int,
        max_logits: int,
        max_blocks: int,
        device: torch.device,
    ) -> None:
        self.device = device
        self.max_blocks = max_blocks
        self._pinned = device.type == "cuda"
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.input_ids = self._pair(max_tokens, torch.int64)
        self.positions = self._pair(max_tokens, torch.int64)
        self.slot_mapping = self._pair(max_tokens, torch.int64)
        self.logits_indices = self._pair(max(max_reqs, max_logits), torch.int64)
        self.query_start_loc = self._pair(max_reqs + 1, torch.int32)
        self.seq_lens = self._pair(max_reqs, torch.int32)
        # Decode inputs still on the device: flat token index, and index into the sampled ids.
        self.pending_dst = self._pair(max_reqs, torch.int64)
        self.pending_src = self._pair(max_reqs, torch.int64)
        # Host side: a contiguous [reqs, width] staging area; device side: full-width rows.
        self._block_table_host = torch.zeros(max_reqs * max_blocks, dtype=torch.int32,
                                             pin_memory=self._pinned)
        self.block_table = (
            torch.zeros(max_reqs, max_blocks, dtype=torch.int32, device=device)
            if self._pinned else None
        )
        self._uploaded: Optional[torch.cuda.Event] = None

    def _pair(self, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        host = torch.zeros(size, dtype=dtype, pin_memory=self._pinned)
        device = torch.zeros(size, dtype=dtype, device=self.device) if self._pinned else host
        pair = (host, device)
        self._pairs.append(pair)
        return pair

    @staticmethod
    def host(pair: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
        return pair[0].numpy()

    def block_table_host(self, num_reqs: int, width: int) -> np.ndarray:
        return self._block_table_host[: num_reqs * width].numpy().reshape(num_reqs, width)

    def block_table_for(self, num_reqs: int, width: int) -> torch.Tensor:
        """The block table the model reads this step (on the CPU, the staging area itself)."""
        if not self._pinned:
            return self._block_table_host[: num_reqs * width].view(num_reqs, width)
        return self.block_table[:num_reqs, :width]

    def upload(
        self, num_tokens: int, num_rows: int, num_logits: int, num_reqs: int, width: int,
        num_pending: int = 0,
    ) -> None:
        """Copies the written prefix of every host buffer to the device (no-op on the CPU).

        ``num_rows`` counts request rows including CUDA-graph padding; the block table holds
        only the ``num_reqs`` real ones (padding rows keep earlier, valid block ids).
        """
        if not self._pinned:
            return
        sizes = (num_tokens, num_tokens, num_tokens, num_logits, num_rows + 1, num_rows,
                 num_pending, num_pending)
        for (host, device), size in zip(self._pairs, sizes):
            if size:
                device[:size].copy_(host[:size], non_blocking=True)
        self.block_table[:num_reqs, :width].copy_(
            self._block_table_host[: num_reqs * width].view(num_reqs, width), non_blocking=True
        )
        if self._uploaded is None:
            self._uploaded = torch.cuda.Event()
        self._uploaded.record()

    def wait_for_upload(self) -> None:
        """Blocks until the last upload has read the host side, which may then be rewritten.
        (With async scheduling the host prepares a step while the previous one is queued.)"""
        if self._uploaded is not None:
            self._uploaded.synchronize()
